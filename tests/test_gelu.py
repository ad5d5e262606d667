"""gelu (exact and tanh): finite differences, PyTorch parity (F.gelu), large inputs, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.gelu import gelu_backward, gelu_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(5,), (3, 7), (2, 3, 5), (2, 1, 3, 4)]
APPROXIMATIONS = ["none", "tanh"]


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", [(1,), (4, 3), (2, 3, 5), (3, 1, 2, 3)])
def test_finite_differences(approximate, shape):
    x = np.random.default_rng(len(shape) + 60).standard_normal(shape) * 2.2 - 0.35
    inputs = {"x": x, "approximate": approximate}
    assert_gradcheck_passes(check_pair("gelu", gelu_forward, gelu_backward, inputs, ("x",)))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_parity(approximate, dtype, shape):
    rng = np.random.default_rng(sum(shape) + 2)
    x = (rng.standard_normal(shape) * 3 + 0.25).astype(dtype)
    y, cache = gelu_forward(x, approximate)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = gelu_backward(dy, cache)

    xt = to_torch(x, True)
    yt = F.gelu(xt, approximate=approximate)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, f"y ({approximate})")
    assert_close(dx, xt.grad, dtype, f"dx ({approximate})")


def test_exact_and_tanh_forms_differ():
    # The parity tests would not notice a swap if the forms agreed to 1e-10; they do not.
    x = np.linspace(-4.0, 4.0, 81)
    exact, _ = gelu_forward(x, "none")
    approx, _ = gelu_forward(x, "tanh")
    gap = np.max(np.abs(exact - approx))
    assert 1e-4 < gap < 1e-3
    assert gelu_forward(np.array([1.0]))[0][0] == pytest.approx(0.5 * (1 + math.erf(2**-0.5)))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_inputs(approximate, dtype):
    x = np.array([1e4, -1e4, 300.0, -300.0, 30.0, -30.0], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = gelu_forward(x, approximate)
        dx = gelu_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y[[0, 2]], x[[0, 2]])
    np.testing.assert_array_equal(y[[1, 3]], 0.0)
    np.testing.assert_array_equal(dx[:4], np.array([1.0, 0.0, 1.0, 0.0], dtype=dtype))
    xt = to_torch(x, True)
    F.gelu(xt, approximate=approximate).sum().backward()
    assert_close(y, F.gelu(to_torch(x), approximate=approximate), dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype, huge", [(np.float32, 1e20), (np.float64, 1e200)])
def test_huge_inputs_give_the_limits_not_nan(approximate, dtype, huge):
    # x² overflows here (the tanh form's backward used to return 0 · inf = NaN): the limits
    # are y = x, dy/dx = 1 for large positive x and y = 0, dy/dx = 0 for large negative x
    x = np.array([huge, -huge], dtype=dtype)
    with np.errstate(over="ignore"):
        y, cache = gelu_forward(x, approximate)
        dx = gelu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(y, np.array([huge, 0.0], dtype=dtype))
    np.testing.assert_array_equal(dx, np.array([1.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_zero_dim_input(approximate):
    y, cache = gelu_forward(np.array(0.8), approximate)
    dx = gelu_backward(np.array(1.0), cache)
    xt = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    yt = F.gelu(xt, approximate=approximate)
    yt.backward()
    assert isinstance(y, np.ndarray) and y.shape == () and isinstance(dx, np.ndarray)
    assert_close(y, yt, np.float64, "y")
    assert_close(dx, xt.grad, np.float64, "dx")


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"approximate must be one of 'none', 'tanh'.*'erf'"):
        gelu_forward(np.ones(3), approximate="erf")
    with pytest.raises(ValueError, match="approximate must be one of"):
        gelu_forward(np.ones(3), approximate=None)
    with pytest.raises(ValueError, match="floating-point"):
        gelu_forward(np.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        gelu_forward(np.array([0.5, np.nan]))
    _, cache = gelu_forward(np.ones((2, 3)), "tanh")
    with pytest.raises(ValueError, match="dy must have shape"):
        gelu_backward(np.ones((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        gelu_backward(np.ones((2, 3), dtype=np.float32), cache)
