"""linear: finite differences, PyTorch parity (F.linear), bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.linear import linear_backward, linear_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(5,), (3, 7), (2, 3, 5), (2, 1, 3, 4)]  # leading dims of x (the last is "in")


@pytest.mark.parametrize("name", ["linear", "linear_nobias"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3), (3, 1, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_finite_differences(lead, with_bias):
    rng = np.random.default_rng(len(lead) * 10 + with_bias)
    inputs = {
        "x": rng.standard_normal(lead + (6,)) * 2.3 - 0.7,
        "weight": rng.standard_normal((5, 6)),
        "bias": rng.standard_normal(5) if with_bias else None,
    }
    names = ("x", "weight", "bias" if with_bias else None)
    assert_gradcheck_passes(check_pair("linear", linear_forward, linear_backward, inputs, names))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_parity(dtype, shape, with_bias):
    rng = np.random.default_rng(sum(shape))
    out_features = 9
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(dtype)
    w = rng.standard_normal((out_features, shape[-1])).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype) if with_bias else None
    y, cache = linear_forward(x, w, b)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = linear_backward(dy, cache)

    xt, wt = to_torch(x, True), to_torch(w, True)
    bt = to_torch(b, True) if with_bias else None
    yt = F.linear(xt, wt, bt)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    assert_close(dw, wt.grad, dtype, "dweight")
    if with_bias:
        assert_close(db, bt.grad, dtype, "dbias")
    else:
        assert db is None


def test_bad_inputs():
    x = np.ones((2, 3))
    w = np.ones((4, 3))
    with pytest.raises(ValueError, match="input features"):
        linear_forward(np.ones((2, 5)), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_forward(x, w, np.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        linear_forward(np.ones((2, 3), dtype=np.int64), w)
    with pytest.raises(ValueError, match="NaN"):
        linear_forward(np.array([[1.0, np.nan, 0.0]]), w)
    with pytest.raises(ValueError, match="share one dtype"):
        linear_forward(x.astype(np.float32), w)
    with pytest.raises(ValueError, match="2-D"):
        linear_forward(x, np.ones((4, 3, 1)))
    _, cache = linear_forward(x, w)
    with pytest.raises(ValueError, match="dy must have shape"):
        linear_backward(np.ones((2, 5)), cache)
    with pytest.raises(ValueError, match="dtype"):
        linear_backward(np.ones((2, 4), dtype=np.float32), cache)
