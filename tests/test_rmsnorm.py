"""rmsnorm: finite differences, PyTorch parity (F.rms_norm and the explicit formula),
stability, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.rmsnorm import rmsnorm_backward, rmsnorm_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(7,), (3, 5), (2, 3, 5), (2, 1, 3, 4)]  # shapes of x (the last axis is C)


def _inputs(rng, shape, with_weight, dtype=np.float64):
    return {
        "x": (rng.standard_normal(shape) * 2.1 - 0.6).astype(dtype),
        "weight": (rng.standard_normal(shape[-1]) * 0.7 + 1.1).astype(dtype) if with_weight
        else None,
    }


def _torch_formula(xt, wt, eps):
    """Llama's RMSNorm written out: x · rsqrt(mean(x²) + eps) · w."""
    yt = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)
    return yt * wt if wt is not None else yt


def _torch_builtin(xt, wt, eps):
    return F.rms_norm(xt, (xt.shape[-1],), wt, eps=eps)


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["rmsnorm"]))


# C = 1 only with a large eps: with eps = 1e-6, y = x / √(x² + eps) is flat (≈ sign x) and its
# gradient ~eps/|x|³ drowns in the finite-difference rounding noise
FD_CASES = [(shape, eps) for shape in SHAPES for eps in (1e-6, 0.4)] + [((3, 1), 0.4)]


@pytest.mark.parametrize("shape, eps", FD_CASES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_finite_differences(shape, with_weight, eps):
    rng = np.random.default_rng(sum(shape) + 10 * with_weight)
    inputs = dict(_inputs(rng, shape, with_weight), eps=eps)
    names = ("x", "weight" if with_weight else None)
    assert_gradcheck_passes(check_pair("rmsnorm", rmsnorm_forward, rmsnorm_backward, inputs,
                                       names))


@pytest.mark.parametrize("reference", [_torch_builtin, _torch_formula], ids=["F.rms_norm",
                                                                             "formula"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_torch_parity(reference, dtype, shape, with_weight):
    rng = np.random.default_rng(sum(shape) + 3 * with_weight)
    inputs = _inputs(rng, shape, with_weight, dtype)
    x, w = inputs["x"], inputs["weight"]
    eps = 1e-6
    y, cache = rmsnorm_forward(x, w, eps=eps)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw = rmsnorm_backward(dy, cache)

    xt = to_torch(x, True)
    wt = to_torch(w, True) if with_weight else None
    yt = reference(xt, wt, eps)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    if with_weight:
        assert dw.dtype == dtype
        assert_close(dw, wt.grad, dtype, "dweight")
    else:
        assert dw is None


def test_eps_is_inside_the_square_root():
    x = np.array([[0.3, -1.1, 2.0, 0.4]])
    eps = 0.5
    y, _ = rmsnorm_forward(x, eps=eps)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x * x) + eps), rtol=1e-14)
    assert not np.allclose(y, x / (np.sqrt(np.mean(x * x)) + eps))


def test_output_rows_have_unit_rms():
    rng = np.random.default_rng(8)
    y, _ = rmsnorm_forward(rng.standard_normal((4, 9)) * 5 + 3, eps=1e-12)
    np.testing.assert_allclose(np.mean(y * y, axis=-1), 1, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale, offset", [(1e4, 0.0), (1.0, 1e4), (3e3, -1e4)])
def test_large_inputs_match_float64_reference(dtype, scale, offset):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 2, 11)) * scale + offset).astype(dtype)
    w = (rng.standard_normal(11) * 0.5 + 1.0).astype(dtype)
    dy = rng.standard_normal((3, 2, 11)).astype(dtype)
    y, cache = rmsnorm_forward(x, w)
    dx, dw = rmsnorm_backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))

    xt = to_torch(x.astype(np.float64), True)  # the reference is always float64
    wt = to_torch(w.astype(np.float64), True)
    yt = F.rms_norm(xt, (11,), wt, eps=1e-6)
    yt.backward(to_torch(dy.astype(np.float64)))
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    assert_close(dw, wt.grad, dtype, "dweight")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_row_is_finite(dtype):
    x = np.zeros((2, 5), dtype=dtype)
    y, cache = rmsnorm_forward(x, np.full(5, 1.5, dtype=dtype))
    dx, dw = rmsnorm_backward(np.ones((2, 5), dtype=dtype), cache)
    np.testing.assert_array_equal(y, 0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    # at x = 0, r = √eps, so dx = dy ⊙ w / √eps
    np.testing.assert_allclose(dx, 1.5 / np.sqrt(1e-6), rtol=1e-6)


def test_two_calls_give_independent_caches():
    rng = np.random.default_rng(9)
    x1, x2, dy = (rng.standard_normal((2, 5)) * 2 + 1 for _ in range(3))
    w = rng.standard_normal(5) + 1
    _, cache1 = rmsnorm_forward(x1, w)
    expected = rmsnorm_backward(dy, cache1)
    _, cache2 = rmsnorm_forward(x2, w)
    got = rmsnorm_backward(dy, cache1)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(rmsnorm_backward(dy, cache2)[0], expected[0])


def test_output_does_not_alias_the_cache():
    x = np.array([[1.0, 2.0, 4.0]])
    y, cache = rmsnorm_forward(x)
    dy = np.array([[0.5, -1.0, 0.25]])
    expected = rmsnorm_backward(dy, cache)[0]
    y[...] = 0.0
    np.testing.assert_array_equal(rmsnorm_backward(dy, cache)[0], expected)


def test_bad_inputs():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        rmsnorm_forward(x, np.ones(4))
    with pytest.raises(ValueError, match="floating-point"):
        rmsnorm_forward(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="floating-point"):
        rmsnorm_forward(x, np.ones(3, dtype=np.int32))
    with pytest.raises(ValueError, match="NaN"):
        rmsnorm_forward(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        rmsnorm_forward(x, np.array([1.0, np.inf, 0.0]))
    with pytest.raises(ValueError, match="share one dtype"):
        rmsnorm_forward(x.astype(np.float32), np.ones(3))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        rmsnorm_forward(x, eps=-1e-6)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        rmsnorm_forward(np.array(1.0))
    with pytest.raises(ValueError, match="at least one channel"):
        rmsnorm_forward(np.ones((2, 0)))
    _, cache = rmsnorm_forward(x, np.ones(3))
    with pytest.raises(ValueError, match="dy must have shape"):
        rmsnorm_backward(np.ones((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm_backward(np.ones((2, 3), dtype=np.float32), cache)


def test_mean_square_that_overflows_is_refused_not_zero():
    # finite float32 values near 1e20: x² overflows, and 1/√inf would make every output 0,
    # a wrong answer; the layer refuses. Values of 1e18 still work (1e36 fits)
    with pytest.raises(ValueError, match=r"rmsnorm: the mean of x² overflows float32 in 1"):
        rmsnorm_forward(np.array([[1e20, -1e20, 3e19, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32))
    x = np.array([[1e18, -1e18, 3e17, 0.0]], np.float32)
    y, _ = rmsnorm_forward(x)
    expected, _ = rmsnorm_forward(x.astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
