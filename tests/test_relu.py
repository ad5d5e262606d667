"""relu: finite differences, PyTorch parity (F.relu), the kink at 0, large inputs, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.relu import relu_backward, relu_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(5,), (3, 7), (2, 3, 5), (2, 1, 3, 4)]


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["relu"]))


@pytest.mark.parametrize("shape", [(1,), (4, 3), (2, 3, 5), (3, 1, 2, 3)])
def test_finite_differences(shape):
    rng = np.random.default_rng(len(shape) + 40)
    x = rng.standard_normal(shape) * 2.3 - 0.4
    x = np.sign(x) * (np.abs(x) + 0.05)  # away from the kink at 0
    assert_gradcheck_passes(check_pair("relu", relu_forward, relu_backward, {"x": x}, ("x",)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_parity(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(dtype)
    x.reshape(-1)[::3] = 0.0  # exact zeros: the derivative there is 0, as in torch
    y, cache = relu_forward(x)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = relu_backward(dy, cache)

    xt = to_torch(x, True)
    yt = F.relu(xt)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


def test_derivative_at_zero_is_zero():
    x = np.array([-1.5, 0.0, -0.0, 2.5])
    y, cache = relu_forward(x)
    dx = relu_backward(np.array([0.3, 0.7, 1.1, -0.9]), cache)
    np.testing.assert_array_equal(y, [0.0, 0.0, 0.0, 2.5])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0, -0.9])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_inputs(dtype):
    x = np.array([1e4, -1e4, 3e3, -3e3], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = relu_forward(x)
        dx = relu_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, np.array([1e4, 0.0, 3e3, 0.0], dtype=dtype))
    np.testing.assert_array_equal(dx, np.array([1.0, 0.0, 1.0, 0.0], dtype=dtype))


def test_zero_dim_input_and_independent_caches():
    y, cache = relu_forward(np.array(-0.7))
    assert isinstance(y, np.ndarray) and y.shape == () and y == 0.0
    assert relu_backward(np.array(1.3), cache) == 0.0
    x1 = np.array([1.2, -0.4])
    _, cache1 = relu_forward(x1)
    _, _ = relu_forward(np.array([-1.2, 0.4]))  # a second call must not touch cache1
    np.testing.assert_array_equal(relu_backward(np.array([2.0, 3.0]), cache1), [2.0, 0.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        relu_forward(np.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        relu_forward(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="numpy.ndarray"):
        relu_forward([0.5, 1.0])
    _, cache = relu_forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dy must have shape"):
        relu_backward(np.ones((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        relu_backward(np.ones((2, 3), dtype=np.float32), cache)
