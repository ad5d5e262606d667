"""layernorm: finite differences, PyTorch parity (F.layer_norm), stability, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.layernorm import layernorm_backward, layernorm_forward
from npformer.gradcheck import check_pair, run_checks

SHAPES = [(7,), (3, 5), (2, 3, 5), (2, 1, 3, 4)]  # shapes of x (the last axis is C)
AFFINE = [(True, True), (True, False), (False, False), (False, True)]  # (weight, bias)


def _inputs(rng, shape, with_weight, with_bias, dtype=np.float64):
    channels = shape[-1]
    return {
        "x": (rng.standard_normal(shape) * 2.3 + 0.7).astype(dtype),
        "weight": (rng.standard_normal(channels) * 0.8 + 1.2).astype(dtype) if with_weight
        else None,
        "bias": (rng.standard_normal(channels) * 0.6 - 0.4).astype(dtype) if with_bias else None,
    }


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["layernorm"]))


@pytest.mark.parametrize("shape", SHAPES + [(3, 1)])
@pytest.mark.parametrize("with_weight, with_bias", AFFINE)
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_finite_differences(shape, with_weight, with_bias, eps):
    rng = np.random.default_rng(sum(shape) + 10 * with_weight + 3 * with_bias)
    inputs = dict(_inputs(rng, shape, with_weight, with_bias), eps=eps)
    names = ("x", "weight" if with_weight else None, "bias" if with_bias else None)
    assert_gradcheck_passes(check_pair("layernorm", layernorm_forward, layernorm_backward,
                                       inputs, names))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_weight, with_bias", AFFINE)
def test_torch_parity(dtype, shape, with_weight, with_bias):
    rng = np.random.default_rng(sum(shape) + 5 * with_weight + with_bias)
    inputs = _inputs(rng, shape, with_weight, with_bias, dtype)
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    y, cache = layernorm_forward(x, w, b, eps=1e-5)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = layernorm_backward(dy, cache)

    xt = to_torch(x, True)
    wt = to_torch(w, True) if with_weight else None
    bt = to_torch(b, True) if with_bias else None
    yt = F.layer_norm(xt, (shape[-1],), wt, bt, eps=1e-5)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    if with_weight:
        assert dw.dtype == dtype
        assert_close(dw, wt.grad, dtype, "dweight")
    else:
        assert dw is None
    if with_bias:
        assert db.dtype == dtype
        assert_close(db, bt.grad, dtype, "dbias")
    else:
        assert db is None


def test_eps_is_inside_the_square_root():
    # with a large eps the two conventions differ visibly; torch puts eps inside
    x = np.array([[0.3, -1.1, 2.0, 0.4]])
    eps = 0.5
    y, _ = layernorm_forward(x, eps=eps)
    centred = x - x.mean()
    np.testing.assert_allclose(y, centred / np.sqrt(centred.var() + eps), rtol=1e-14)
    assert not np.allclose(y, centred / (centred.std() + eps))
    assert_close(y, F.layer_norm(to_torch(x), (4,), eps=eps), np.float64, "y, eps=0.5")


def test_output_rows_are_normalised():
    rng = np.random.default_rng(8)
    y, _ = layernorm_forward(rng.standard_normal((4, 9)) * 5 + 3, eps=1e-12)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), 1, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale, offset", [(1e4, 0.0), (1.0, 1e4), (3e3, -1e4)])
def test_large_inputs_match_float64_reference(dtype, scale, offset):
    # magnitude 1e4, as a spread or as an offset on O(1) deviations (the case where a
    # one-pass variance, or a float32 mean, loses the deviations)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 2, 11)) * scale + offset).astype(dtype)
    w = (rng.standard_normal(11) * 0.5 + 1.0).astype(dtype)
    b = (rng.standard_normal(11) * 0.3).astype(dtype)
    dy = rng.standard_normal((3, 2, 11)).astype(dtype)
    y, cache = layernorm_forward(x, w, b)
    dx, dw, db = layernorm_backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    for t in (y, dx, dw, db):
        assert np.all(np.isfinite(t))

    # the reference is float64 torch on the very same (rounded) inputs
    xt = to_torch(x.astype(np.float64), True)
    wt = to_torch(w.astype(np.float64), True)
    bt = to_torch(b.astype(np.float64), True)
    yt = F.layer_norm(xt, (11,), wt, bt, eps=1e-5)
    yt.backward(to_torch(dy.astype(np.float64)))
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    assert_close(dw, wt.grad, dtype, "dweight")
    assert_close(db, bt.grad, dtype, "dbias")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_row_is_finite(dtype):
    # zero variance: σ = √eps, x̂ = 0, y = bias, and a finite gradient
    x = np.full((2, 5), 3.25, dtype=dtype)
    b = np.arange(5, dtype=dtype)
    y, cache = layernorm_forward(x, np.ones(5, dtype=dtype), b)
    dx, dw, db = layernorm_backward(np.ones((2, 5), dtype=dtype), cache)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (2, 5)))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))


def test_two_calls_give_independent_caches():
    rng = np.random.default_rng(9)
    x1, x2, dy = (rng.standard_normal((2, 5)) * 2 + 1 for _ in range(3))
    w = rng.standard_normal(5) + 1
    _, cache1 = layernorm_forward(x1, w)
    expected = layernorm_backward(dy, cache1)
    _, cache2 = layernorm_forward(x2, w)
    got = layernorm_backward(dy, cache1)
    for a, b in zip(got[:2], expected[:2]):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(layernorm_backward(dy, cache2)[0], expected[0])


def test_output_does_not_alias_the_cache():
    x = np.array([[1.0, 2.0, 4.0]])
    y, cache = layernorm_forward(x)
    dy = np.array([[0.5, -1.0, 0.25]])
    expected = layernorm_backward(dy, cache)[0]
    y[...] = 0.0
    np.testing.assert_array_equal(layernorm_backward(dy, cache)[0], expected)


def test_bad_inputs():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        layernorm_forward(x, np.ones(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        layernorm_forward(x, np.ones(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match="floating-point"):
        layernorm_forward(np.ones((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="floating-point"):
        layernorm_forward(x, np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        layernorm_forward(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="share one dtype"):
        layernorm_forward(x.astype(np.float32), np.ones(3))
    with pytest.raises(ValueError, match="share one dtype"):
        layernorm_forward(x, None, np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        layernorm_forward(x, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a number"):
        layernorm_forward(x, eps="1e-5")
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layernorm_forward(np.array(1.0))
    with pytest.raises(ValueError, match="at least one channel"):
        layernorm_forward(np.ones((2, 0)))
    _, cache = layernorm_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="dy must have shape"):
        layernorm_backward(np.ones((2, 4)), cache)
    with pytest.raises(ValueError, match="dtype"):
        layernorm_backward(np.ones((2, 3), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        layernorm_backward(np.full((2, 3), np.nan), cache)


def test_variance_that_overflows_is_refused_not_zero():
    # finite float32 values near 1e20: (x − μ)² overflows, and 1/√inf would make every
    # output 0, a wrong answer; the layer refuses. Values of 1e18 still work (1e36 fits)
    with pytest.raises(ValueError, match=r"layernorm: the variance of x overflows float32 in 1"):
        layernorm_forward(np.array([[1e20, -1e20, 3e19, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32))
    x = np.array([[1e18, -1e18, 3e17, 0.0]], np.float32)
    y, _ = layernorm_forward(x)
    expected, _ = layernorm_forward(x.astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_errors_have_their_own_type():
    # NaN inputs and overflows raise NonFiniteError (a ValueError): the trainer reports them
    # as a divergence, and other ValueErrors (bad shapes, bad options) as what they are
    from npformer._validate import NonFiniteError

    with pytest.raises(NonFiniteError):
        layernorm_forward(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(NonFiniteError):
        layernorm_forward(np.array([[1e20, -1e20, 0.0]], np.float32))
    with pytest.raises(ValueError) as shape_error:
        layernorm_forward(np.ones((2, 3)), weight=np.ones(4))
    assert not isinstance(shape_error.value, NonFiniteError)
