"""silu: finite differences, PyTorch parity (F.silu), large inputs without overflow, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.silu import silu_backward, silu_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(5,), (3, 7), (2, 3, 5), (2, 1, 3, 4)]


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["silu"]))


@pytest.mark.parametrize("shape", [(1,), (4, 3), (2, 3, 5), (3, 1, 2, 3)])
def test_finite_differences(shape):
    x = np.random.default_rng(len(shape) + 50).standard_normal(shape) * 2.7 + 0.3
    assert_gradcheck_passes(check_pair("silu", silu_forward, silu_backward, {"x": x}, ("x",)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_parity(dtype, shape):
    rng = np.random.default_rng(sum(shape) + 1)
    x = (rng.standard_normal(shape) * 4 - 0.5).astype(dtype)
    y, cache = silu_forward(x)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = silu_backward(dy, cache)

    xt = to_torch(x, True)
    yt = F.silu(xt)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_inputs(dtype):
    # exp(-x) overflows float32 at x < -89 and float64 at x < -710: the naive sigmoid would warn
    x = np.array([1e4, -1e4, 800.0, -800.0, 100.0, -100.0], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = silu_forward(x)
        dx = silu_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_array_equal(y[[0, 2]], x[[0, 2]])  # σ(x) = 1 exactly
    np.testing.assert_array_equal(y[[1, 3]], 0.0)  # x σ(x) underflows to 0
    np.testing.assert_array_equal(dx[[0, 1, 2, 3]], np.array([1.0, 0.0, 1.0, 0.0], dtype=dtype))
    xt = to_torch(x, True)
    F.silu(xt).sum().backward()
    assert_close(y, F.silu(to_torch(x)), dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


def test_zero_dim_input():
    y, cache = silu_forward(np.array(1.5))
    assert isinstance(y, np.ndarray) and y.shape == ()
    assert y == pytest.approx(1.5 / (1.0 + np.exp(-1.5)), rel=1e-15)
    dx = silu_backward(np.array(1.0), cache)
    assert isinstance(dx, np.ndarray) and dx.shape == ()
    s = 1.0 / (1.0 + np.exp(-1.5))
    assert dx == pytest.approx(s * (1.0 + 1.5 * (1.0 - s)), rel=1e-14)


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        silu_forward(np.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        silu_forward(np.array([0.5, np.nan]))
    _, cache = silu_forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dy must have shape"):
        silu_backward(np.ones((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        silu_backward(np.ones((2, 3), dtype=np.float32), cache)
