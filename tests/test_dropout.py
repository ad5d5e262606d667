"""dropout: finite differences, reproducibility, independent caches, keep rate, PyTorch parity
(F.dropout with its mask recovered), bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.dropout import DropoutCache, dropout_backward, dropout_forward
from npformer.gradcheck import check_gradients, check_pair, run_checks

SHAPES = [(7,), (3, 5), (2, 3, 5), (2, 1, 3, 4)]


def _seeded_dropout(x, p, seed, training=True):
    """The same mask on every call (finite differences call the forward many times)."""
    return dropout_forward(x, p, np.random.default_rng(seed), training=training)


def _x(rng, shape, dtype=np.float64):
    """Random values with no zeros, so a zero in the output always means "dropped"."""
    x = rng.standard_normal(shape) * 1.7 + 0.3
    return (np.sign(x) * (np.abs(x) + 0.1)).astype(dtype)


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["dropout"]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p, training", [(0.1, True), (0.5, True), (0.9, True), (0.0, True),
                                         (1.0, True), (0.5, False)])
def test_finite_differences(shape, p, training):
    rng = np.random.default_rng(sum(shape))
    inputs = {"x": _x(rng, shape), "p": p, "seed": 3, "training": training}
    reports = check_pair("dropout", _seeded_dropout, dropout_backward, inputs, ("x",))
    if p == 1.0:  # everything dropped: both gradients are exactly 0
        assert reports[0].max_abs_err == 0.0
    else:
        assert_gradcheck_passes(reports)


def test_same_seed_same_mask_and_different_seeds_differ():
    x = _x(np.random.default_rng(0), (4, 50))
    y1, cache1 = dropout_forward(x, 0.4, np.random.default_rng(123))
    y2, cache2 = dropout_forward(x, 0.4, np.random.default_rng(123))
    y3, cache3 = dropout_forward(x, 0.4, np.random.default_rng(124))
    np.testing.assert_array_equal(cache1.mask, cache2.mask)
    np.testing.assert_array_equal(y1, y2)
    assert np.any(cache1.mask != cache3.mask)


def test_two_calls_give_independent_caches():
    # DESIGN habit 1: a module that calls dropout twice must not overwrite the first mask
    rng = np.random.default_rng(8)
    x = _x(rng, (3, 40))
    dy = rng.standard_normal((3, 40))
    p, scale = 0.5, 2.0
    gen = np.random.default_rng(77)  # one generator, two draws: two different masks
    y1, cache1 = dropout_forward(x, p, gen)
    y2, cache2 = dropout_forward(x, p, gen)
    assert np.any(cache1.mask != cache2.mask)
    np.testing.assert_array_equal(y1, x * cache1.mask * scale)
    np.testing.assert_array_equal(y2, x * cache2.mask * scale)
    # after the second call, each backward still uses its own call's mask
    np.testing.assert_array_equal(dropout_backward(dy, cache1), dy * cache1.mask * scale)
    np.testing.assert_array_equal(dropout_backward(dy, cache2), dy * cache2.mask * scale)


def test_dropout_used_twice_in_one_loss_by_finite_differences():
    # L = Σ dropout_a(x) ⊙ u + Σ dropout_b(x) ⊙ v, both drawn from one generator; the gradient
    # needs both masks, which a single "last mask" slot would get wrong
    rng = np.random.default_rng(9)
    x = _x(rng, (2, 3, 5))
    u, v = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))

    def forward():
        gen = np.random.default_rng(5)  # fresh each call: the same two masks every time
        ya, cache_a = dropout_forward(x, 0.3, gen)
        yb, cache_b = dropout_forward(x, 0.3, gen)
        return ya, cache_a, yb, cache_b

    def loss():
        ya, _, yb, _ = forward()
        return float(np.sum(ya * u) + np.sum(yb * v))

    _, cache_a, _, cache_b = forward()
    assert np.any(cache_a.mask != cache_b.mask)
    dx = dropout_backward(u, cache_a) + dropout_backward(v, cache_b)
    assert_gradcheck_passes(check_gradients("dropout twice", loss, {"x": x}, {"x": dx}))
    wrong = dropout_backward(u, cache_b) + dropout_backward(v, cache_b)  # the stale-mask bug
    assert not check_gradients("dropout stale mask", loss, {"x": x}, {"x": wrong})[0].passed


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_and_mean(p):
    n = 200_000
    x = np.full(n, 1.5)
    y, cache = dropout_forward(x, p, np.random.default_rng(int(p * 100)))
    kept = cache.mask.mean()
    sigma = np.sqrt(p * (1 - p) / n)  # standard deviation of the keep rate
    assert abs(kept - (1 - p)) < 5 * sigma
    np.testing.assert_array_equal(cache.mask, y != 0)
    np.testing.assert_allclose(y[cache.mask], 1.5 / (1 - p), rtol=1e-15)
    # inverted dropout is unbiased: E[y] = x
    assert abs(y.mean() - 1.5) < 5 * 1.5 * np.sqrt(p / ((1 - p) * n))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, False), (1.0, False)])
def test_identity_cases(dtype, p, training):
    x = _x(np.random.default_rng(1), (3, 4), dtype)
    gen = np.random.default_rng(2)
    y, cache = dropout_forward(x, p, gen, training=training)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(y, x)
    dy = np.ones((3, 4), dtype=dtype)
    dx = dropout_backward(dy, cache)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, dy)
    assert not np.shares_memory(dx, dy)
    # nothing was drawn: the generator is where a fresh one starts
    assert gen.random() == np.random.default_rng(2).random()
    xt = to_torch(x)
    assert_close(y, F.dropout(xt, p, training=training), dtype, "identity y")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_p_one_gives_zeros_without_division_by_zero(dtype):
    x = _x(np.random.default_rng(1), (3, 4), dtype)
    with np.errstate(all="raise"):
        y, cache = dropout_forward(x, 1.0, np.random.default_rng(0))
        dx = dropout_backward(np.ones((3, 4), dtype=dtype), cache)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(dx, 0)
    xt = to_torch(x, True)
    yt = F.dropout(xt, 1.0, training=True)
    yt.backward(torch.ones(3, 4, dtype=xt.dtype))
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.85])
def test_torch_parity(dtype, shape, p):
    """Recover torch's mask from its output, then compare our pair under that mask.

    Dropout with a fixed mask is the diagonal linear map a ↦ a ⊙ m / (1 − p), and forward and
    backward both apply it; so applying our pair's map (through a cache holding torch's mask)
    to x must give torch's y, and to dy torch's autograd gradient.
    """
    rng = np.random.default_rng(sum(shape) + int(100 * p))
    x = _x(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)

    torch.manual_seed(sum(shape))
    xt = to_torch(x, True)
    yt = F.dropout(xt, p, training=True)
    yt.backward(to_torch(dy))
    mask = yt.detach().numpy() != 0  # x has no zeros, so y = 0 exactly where dropped
    assert 0 < mask.sum() < mask.size or mask.size < 8

    torch_cache = DropoutCache(mask, 1.0 / (1.0 - p), shape, np.dtype(dtype))
    y_with_torch_mask = dropout_backward(x, torch_cache)  # x ⊙ m / (1 − p)
    dx_with_torch_mask = dropout_backward(dy, torch_cache)
    assert y_with_torch_mask.dtype == dtype and dx_with_torch_mask.dtype == dtype
    assert_close(y_with_torch_mask, yt, dtype, "y (torch's mask)")
    assert_close(dx_with_torch_mask, xt.grad, dtype, "dx (torch's mask)")

    # and our own forward is that same map under its own mask
    y, cache = dropout_forward(x, p, np.random.default_rng(4))
    dx = dropout_backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype
    assert cache.mask.dtype == bool
    assert_close(y, x * cache.mask / dtype(1 - p), dtype, "y (own mask)")
    assert_close(dx, dy * cache.mask / dtype(1 - p), dtype, "dx (own mask)")
    assert_close(y, dropout_backward(x, cache), dtype, "forward = backward map")


def test_zero_dim_input():
    y, cache = dropout_forward(np.array(2.5), 0.5, np.random.default_rng(0))
    assert isinstance(y, np.ndarray) and y.shape == ()
    assert float(y) in (0.0, 5.0)
    dx = dropout_backward(np.array(1.0), cache)
    assert isinstance(dx, np.ndarray) and dx.shape == ()


def test_bad_inputs():
    x = np.ones((2, 3))
    gen = np.random.default_rng(0)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator.*RandomState"):
        dropout_forward(x, 0.5, np.random.RandomState(0))
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator.*int"):
        dropout_forward(x, 0.5, 0)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator.*NoneType"):
        dropout_forward(x, 0.5, None)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got 1.5"):
        dropout_forward(x, 1.5, gen)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got -0.1"):
        dropout_forward(x, -0.1, gen)
    with pytest.raises(ValueError, match="p must be a number"):
        dropout_forward(x, "0.1", gen)
    with pytest.raises(ValueError, match=r"p must lie in"):
        dropout_forward(x, float("nan"), gen)
    with pytest.raises(ValueError, match="training must be True or False"):
        dropout_forward(x, 0.5, gen, training="yes")
    with pytest.raises(ValueError, match="floating-point"):
        dropout_forward(np.ones((2, 3), dtype=np.int64), 0.5, gen)
    with pytest.raises(ValueError, match="NaN"):
        dropout_forward(np.array([1.0, np.nan]), 0.5, gen)
    _, cache = dropout_forward(x, 0.5, gen)
    with pytest.raises(ValueError, match="dy must have shape"):
        dropout_backward(np.ones((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        dropout_backward(np.ones((2, 3), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        dropout_backward(np.full((2, 3), np.nan), cache)
