"""softmax, softmax_jacobian, log_softmax: finite differences, PyTorch parity, stability,
masks, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.softmax import (
    log_softmax_backward,
    log_softmax_forward,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
)
from npformer.gradcheck import check_pair, run_checks

# (shape of x, axis): odd sizes, 1-3 leading dims, softmax over the last and other axes
CASES = [((7,), -1), ((3, 5), -1), ((3, 5), 0), ((2, 3, 5), -1), ((2, 3, 5), 1),
         ((2, 1, 3, 4), -1), ((2, 1, 3, 4), 2), ((2, 1, 3, 4), -4)]

PAIRS = {
    "softmax": (softmax_forward, softmax_backward, F.softmax),
    "log_softmax": (log_softmax_forward, log_softmax_backward, F.log_softmax),
}


def _x(rng, shape, dtype=np.float64):
    return (rng.standard_normal(shape) * 2.7 - 0.9).astype(dtype)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, axis", CASES)
def test_finite_differences(name, shape, axis):
    forward, backward, _ = PAIRS[name]
    rng = np.random.default_rng(sum(shape) + 7 * (axis % len(shape)))
    inputs = {"x": _x(rng, shape), "axis": axis}
    assert_gradcheck_passes(check_pair(name, forward, backward, inputs, ("x",)))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", CASES)
def test_torch_parity(name, dtype, shape, axis):
    forward, backward, torch_fn = PAIRS[name]
    rng = np.random.default_rng(sum(shape) - axis)
    x = _x(rng, shape, dtype)
    y, cache = forward(x, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = backward(dy, cache)

    xt = to_torch(x, True)
    yt = torch_fn(xt, dim=axis)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, f"{name} y")
    assert_close(dx, xt.grad, dtype, f"{name} dx")


@pytest.mark.parametrize("shape, axis", CASES)
def test_jacobian_times_dy_is_the_backward(shape, axis):
    rng = np.random.default_rng(len(shape) + axis + 40)
    p, cache = softmax_forward(_x(rng, shape), axis=axis)
    dp = rng.standard_normal(shape)
    J = softmax_jacobian(p, axis=axis)  # (..., n, n), softmax axis moved last
    n = shape[axis]
    p_last = np.moveaxis(p, axis, -1)
    assert J.shape == p_last.shape + (n,)
    np.testing.assert_array_equal(J, np.swapaxes(J, -1, -2))  # symmetric
    np.testing.assert_allclose(J.sum(axis=-1), 0.0, atol=1e-15)  # rows sum to 0
    # J = diag(p) − p pᵀ
    diagonal = np.diagonal(J, axis1=-2, axis2=-1)
    np.testing.assert_allclose(diagonal, p_last * (1 - p_last), rtol=1e-12)
    dp_last = np.moveaxis(dp, axis, -1)[..., None]  # (..., n, 1)
    via_jacobian = np.moveaxis((J @ dp_last)[..., 0], -1, axis)
    np.testing.assert_allclose(softmax_backward(dp, cache), via_jacobian, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_jacobian_matches_torch_autograd(dtype):
    rng = np.random.default_rng(3)
    x = _x(rng, (6,), dtype)
    p, _ = softmax_forward(x)
    J = softmax_jacobian(p)
    Jt = torch.autograd.functional.jacobian(lambda t: F.softmax(t, dim=0), to_torch(x))
    assert J.dtype == dtype
    assert_close(J, Jt, dtype, "jacobian")


def test_jacobian_rejects_bad_axis():
    with pytest.raises(ValueError, match="axis must lie in"):
        softmax_jacobian(np.full((2, 3), 1 / 3), axis=2)


# --- stability -----------------------------------------------------------------------------

LARGE = [
    [1e4, -1e4, 0.0],
    [1e4, 1e4 - 1.0, 1e4 - 2.5],
    [-1e4, -1e4 + 0.5, -1e4 + 3.0],
    [-1e4, 1e4, 9999.0],
]


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_inputs_match_torch_float64(name, dtype):
    forward, backward, torch_fn = PAIRS[name]
    x = np.array(LARGE, dtype=dtype)  # every value is exact in float32
    dy = np.array([[0.3, -1.2, 0.7]] * 4, dtype=dtype)
    y, cache = forward(x)
    dx = backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))

    xt = to_torch(x.astype(np.float64), True)  # the reference is always float64
    yt = torch_fn(xt, dim=-1)
    yt.backward(to_torch(dy.astype(np.float64)))
    assert_close(y, yt, dtype, f"{name} y")
    assert_close(dx, xt.grad, dtype, f"{name} dx")


def test_large_inputs_exact_values():
    p, _ = softmax_forward(np.array([1e4, -1e4, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(p, np.array([1.0, 0.0, 0.0], dtype=np.float32))
    y, _ = log_softmax_forward(np.array([1e4, -1e4, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(y, np.array([0.0, -2e4, -1e4], dtype=np.float32))


# --- masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_masked_entries_are_exact_zeros(dtype):
    rng = np.random.default_rng(5)
    x = _x(rng, (3, 6), dtype)
    mask = np.zeros((3, 6), dtype=bool)
    mask[0, [1, 4]] = True
    mask[1, 0] = True
    mask[2, 1:] = True  # one entry left
    x[mask] = -np.inf
    dp = rng.standard_normal((3, 6)).astype(dtype)
    p, cache = softmax_forward(x)
    dx = softmax_backward(dp, cache)
    assert p.dtype == dtype and dx.dtype == dtype
    assert np.all(p[mask] == 0) and np.all(dx[mask] == 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-6)
    assert p[2, 0] == 1 and dx[2, 0] == 0  # a single survivor has p = 1 and no gradient
    # the same as a softmax over the unmasked entries alone
    for row in range(3):
        keep = ~mask[row]
        p_sub, cache_sub = softmax_forward(x[row, keep])
        np.testing.assert_allclose(p[row, keep], p_sub, rtol=1e-6)
        np.testing.assert_allclose(dx[row, keep], softmax_backward(dp[row, keep], cache_sub),
                                   rtol=1e-6, atol=1e-7)
    xt = to_torch(x, True)
    yt = F.softmax(xt, dim=-1)
    yt.backward(to_torch(dp))
    assert_close(p, yt, dtype, "masked p")
    assert_close(dx, xt.grad, dtype, "masked dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_slice_gives_zeros_not_nan(dtype):
    x = np.array([[0.5, -np.inf, 1.5], [-np.inf, -np.inf, -np.inf]], dtype=dtype)
    p, cache = softmax_forward(x)
    dx = softmax_backward(np.array([[0.1, 0.2, -0.3], [1.0, -2.0, 3.0]], dtype=dtype), cache)
    np.testing.assert_array_equal(p[1], 0)
    np.testing.assert_array_equal(dx[1], 0)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(p[0].sum(), 1.0, rtol=1e-6)
    # PyTorch returns NaN for a fully masked row: the difference is deliberate (DESIGN habit 7)
    assert torch.isnan(F.softmax(to_torch(x), dim=-1)[1]).all()
    # along another axis too: column 1 of x.T-shaped input is fully masked
    p_t, cache_t = softmax_forward(np.ascontiguousarray(x.T), axis=0)
    np.testing.assert_array_equal(p_t[:, 1], 0)
    np.testing.assert_array_equal(p_t, p.T)


def test_log_softmax_refuses_neg_inf_and_says_why():
    with pytest.raises(ValueError, match="log_softmax needs finite inputs"):
        log_softmax_forward(np.array([0.0, -np.inf, 1.0]))


# --- caches and bad input ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_two_calls_give_independent_caches(name):
    forward, backward, _ = PAIRS[name]
    rng = np.random.default_rng(9)
    x1, x2, dy = _x(rng, (2, 5)), _x(rng, (2, 5)), rng.standard_normal((2, 5))
    _, cache1 = forward(x1)
    expected = backward(dy, cache1)
    forward(x2)  # a second call must not touch the first cache
    np.testing.assert_array_equal(backward(dy, cache1), expected)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_bad_inputs(name):
    forward, backward, _ = PAIRS[name]
    x = np.array([[0.1, 0.4, -0.3], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="floating-point"):
        forward(np.array([[1, 2, 3]]))
    with pytest.raises(ValueError, match="NaN"):
        forward(np.array([0.2, np.nan, 0.1]))
    with pytest.raises(ValueError, match=r"\+inf"):
        forward(np.array([0.2, np.inf, 0.1]))
    with pytest.raises(ValueError, match="numpy.ndarray"):
        forward([0.1, 0.2])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        forward(np.array(1.5))
    with pytest.raises(ValueError, match=r"axis must lie in \[-2, 1\].*got 2"):
        forward(x, axis=2)
    with pytest.raises(ValueError, match="got -3"):
        forward(x, axis=-3)
    with pytest.raises(ValueError, match="axis must be an integer"):
        forward(x, axis=1.0)
    with pytest.raises(ValueError, match="length 0"):
        forward(np.ones((2, 0)))
    _, cache = forward(x)
    with pytest.raises(ValueError, match="must have shape"):
        backward(np.ones((2, 4)), cache)
    with pytest.raises(ValueError, match="dtype"):
        backward(np.ones((2, 3), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        backward(np.array([[0.0, np.nan, 0.0], [0.0, 0.0, 0.0]]), cache)
