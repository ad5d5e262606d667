"""cross_entropy (fused) and nll (atomic): finite differences, fused == log_softmax + nll,
PyTorch parity (F.cross_entropy), stability, the all-ignored case, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.cross_entropy import (
    cross_entropy_backward,
    cross_entropy_forward,
    nll_backward,
    nll_forward,
)
from npformer.functional.softmax import log_softmax_backward, log_softmax_forward
from npformer.gradcheck import check_pair, run_checks

LEADS = [(), (5,), (2, 3), (2, 1, 3)]  # leading dims of logits (the last is V)
VOCAB = 7
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1, 1.0]


def _logits(rng, lead, dtype=np.float64, vocab=VOCAB):
    return (rng.standard_normal(lead + (vocab,)) * 2.3 + 0.4).astype(dtype)


def _targets(rng, lead, ignore_index=-100, n_ignored=1, vocab=VOCAB, dtype=np.int64):
    targets = rng.integers(0, vocab, size=lead).astype(dtype)
    if targets.size > 1:  # keep at least one counted row
        flat = targets.reshape(-1)
        n = min(n_ignored, flat.size - 1)
        flat[rng.choice(flat.size, size=n, replace=False)] = ignore_index
    return targets


def _dloss(rng, reduction, lead, dtype):
    if reduction == "none":
        return (rng.standard_normal(lead) * 1.3 + 0.2).astype(dtype)
    return np.asarray(-0.7, dtype=dtype)


def _torch_cross_entropy(logits, targets, dloss, **kwargs):
    """F.cross_entropy on (N, V) rows; returns (loss, dlogits) reshaped like ours."""
    vocab = logits.shape[-1]
    xt = to_torch(logits, True)
    tt = torch.from_numpy(targets.astype(np.int64))
    loss = F.cross_entropy(xt.reshape(-1, vocab), tt.reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.reshape(targets.shape)
    loss.backward(torch.from_numpy(np.array(dloss)))  # (to_torch makes a 0-d array 1-d)
    return loss, xt.grad


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_smoothing"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_finite_differences(lead, reduction, label_smoothing):
    rng = np.random.default_rng(len(lead) * 7 + REDUCTIONS.index(reduction))
    inputs = {
        "logits": _logits(rng, lead),
        "targets": _targets(rng, lead, n_ignored=2),
        "label_smoothing": label_smoothing,
        "reduction": reduction,
    }
    assert_gradcheck_passes(check_pair("cross_entropy", cross_entropy_forward,
                                       cross_entropy_backward, inputs, ("logits",)))
    # the atomic nll on log-probabilities (any finite values: nll is linear in them)
    inputs["logp"] = rng.standard_normal(lead + (VOCAB,)) * 1.1 - 2.0
    del inputs["logits"]
    assert_gradcheck_passes(check_pair("nll", nll_forward, nll_backward, inputs, ("logp",)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
def test_fused_equals_log_softmax_then_nll(dtype, lead, reduction, label_smoothing):
    rng = np.random.default_rng(len(lead) + 11 * REDUCTIONS.index(reduction))
    logits = _logits(rng, lead, dtype)
    targets = _targets(rng, lead, ignore_index=3, n_ignored=2)  # ignore_index inside [0, V)
    dloss = _dloss(rng, reduction, lead, dtype)
    options = dict(ignore_index=3, label_smoothing=label_smoothing, reduction=reduction)

    loss, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)

    logp, cache_ls = log_softmax_forward(logits)
    loss_atomic, cache_nll = nll_forward(logp, targets, **options)
    dlogits_atomic = log_softmax_backward(nll_backward(dloss, cache_nll), cache_ls)

    assert loss.dtype == dtype and dlogits.dtype == dtype and loss_atomic.dtype == dtype
    assert loss.shape == (lead if reduction == "none" else ())
    tol = dict(rtol=1e-12, atol=0.0) if dtype == np.float64 else {}
    assert_close(loss, loss_atomic, dtype, "loss", **tol)
    assert_close(dlogits, dlogits_atomic, dtype, "dlogits", **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
def test_torch_parity(dtype, lead, reduction, label_smoothing):
    rng = np.random.default_rng(3 * len(lead) + 5 * REDUCTIONS.index(reduction))
    logits = _logits(rng, lead, dtype)
    targets = _targets(rng, lead, n_ignored=2, dtype=np.int32)
    dloss = _dloss(rng, reduction, lead, dtype)
    options = dict(label_smoothing=label_smoothing, reduction=reduction)

    loss, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    loss_t, dlogits_t = _torch_cross_entropy(logits, targets, dloss, **options)
    assert loss.dtype == dtype and dlogits.dtype == dtype
    assert loss.shape == tuple(loss_t.shape)
    assert_close(loss, loss_t, dtype, "loss")
    assert_close(dlogits, dlogits_t, dtype, "dlogits")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_parity_class_axis_layout(dtype):
    """The same numbers through torch's own (B, V, T) layout, with a custom ignore_index."""
    rng = np.random.default_rng(21)
    logits = _logits(rng, (2, 5), dtype)  # (B, T, V)
    targets = _targets(rng, (2, 5), ignore_index=-1, n_ignored=3)  # (B, T)
    loss, cache = cross_entropy_forward(logits, targets, ignore_index=-1, label_smoothing=0.2)
    dlogits = cross_entropy_backward(1.0, cache)
    xt = to_torch(logits, True)
    loss_t = F.cross_entropy(xt.permute(0, 2, 1), torch.from_numpy(targets), ignore_index=-1,
                             label_smoothing=0.2)
    loss_t.backward()
    assert_close(loss, loss_t, dtype, "loss")
    assert_close(dlogits, xt.grad, dtype, "dlogits")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_large_logits_match_torch_float64(dtype, label_smoothing):
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, 1e4, 9999.0],
                       [1e4, 1e4 - 1.0, 1e4 - 2.5], [-1e4, -1e4 + 0.5, -1e4 + 3.0]], dtype=dtype)
    targets = np.array([0, 1, 2, 2, 0])  # confident right, confident wrong, and close calls
    for reduction in REDUCTIONS:
        dloss = _dloss(np.random.default_rng(0), reduction, (5,), dtype)
        loss, cache = cross_entropy_forward(logits, targets, label_smoothing=label_smoothing,
                                            reduction=reduction)
        dlogits = cross_entropy_backward(dloss, cache)
        assert loss.dtype == dtype and dlogits.dtype == dtype
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(dlogits))
        loss_t, dlogits_t = _torch_cross_entropy(  # the reference is always float64
            logits.astype(np.float64), targets, np.asarray(dloss, dtype=np.float64),
            label_smoothing=label_smoothing, reduction=reduction)
        assert_close(loss, loss_t, dtype, f"{reduction} loss")
        assert_close(dlogits, dlogits_t, dtype, f"{reduction} dlogits")


def test_large_logits_exact_values():
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype=np.float32)
    loss, cache = cross_entropy_forward(logits, np.array([0, 1]), reduction="none")
    np.testing.assert_array_equal(loss, np.array([0.0, 2e4], dtype=np.float32))
    np.testing.assert_array_equal(cross_entropy_backward(np.ones(2, np.float32), cache),
                                  np.array([[0, 0, 0], [1, -1, 0]], dtype=np.float32))


def test_unbatched_logits():
    """logits (V,) with a 0-d target, as torch's unbatched form."""
    rng = np.random.default_rng(2)
    logits = _logits(rng, ())
    for target in (4, -100):
        loss, cache = cross_entropy_forward(logits, np.array(target), label_smoothing=0.1)
        dlogits = cross_entropy_backward(1.0, cache)
        if target == -100:
            assert loss == 0 and not dlogits.any()
            continue
        xt = to_torch(logits, True)
        loss_t = F.cross_entropy(xt, torch.tensor(target), label_smoothing=0.1)
        loss_t.backward()
        assert_close(loss, loss_t, np.float64, "loss")
        assert_close(dlogits, xt.grad, np.float64, "dlogits")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ignored_rows_contribute_nothing(dtype):
    rng = np.random.default_rng(4)
    logits = _logits(rng, (6,), dtype)
    targets = np.array([2, -100, 5, -100, 0, 1])
    counted = targets != -100
    loss, cache = cross_entropy_forward(logits, targets, label_smoothing=0.1)
    dlogits = cross_entropy_backward(1.0, cache)
    loss_sub, cache_sub = cross_entropy_forward(logits[counted], targets[counted],
                                                label_smoothing=0.1)
    assert_close(loss, loss_sub, dtype, "loss")  # mean over the 4 counted rows only
    assert_close(dlogits[counted], cross_entropy_backward(1.0, cache_sub), dtype, "dlogits")
    assert not dlogits[~counted].any()
    loss_none, _ = cross_entropy_forward(logits, targets, reduction="none")
    assert not loss_none[~counted].any()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_ignored_gives_zero_not_nan(label_smoothing):
    rng = np.random.default_rng(6)
    logits = _logits(rng, (2, 3))
    targets = np.full((2, 3), -100)
    # PyTorch: mean over no targets is 0 / 0 = NaN ...
    assert torch.isnan(F.cross_entropy(to_torch(logits).reshape(-1, VOCAB),
                                       torch.from_numpy(targets).reshape(-1),
                                       label_smoothing=label_smoothing))
    # ... here it is 0 with a zero gradient (deliberate, see the module docstring)
    for fwd, bwd, x in ((cross_entropy_forward, cross_entropy_backward, logits),
                        (nll_forward, nll_backward, log_softmax_forward(logits)[0])):
        for reduction in REDUCTIONS:
            loss, cache = fwd(x, targets, label_smoothing=label_smoothing, reduction=reduction)
            grad = bwd(_dloss(rng, reduction, (2, 3), np.float64), cache)
            assert np.all(loss == 0) and loss.shape == ((2, 3) if reduction == "none" else ())
            assert np.all(grad == 0) and grad.shape == logits.shape


def test_dloss_forms_and_scaling():
    rng = np.random.default_rng(8)
    for dtype in (np.float64, np.float32):
        logits = _logits(rng, (4,), dtype)
        _, cache = cross_entropy_forward(logits, np.array([1, 0, -100, 6]))
        base = cross_entropy_backward(1.0, cache)
        assert base.dtype == dtype
        for dloss in (2.5, np.asarray(2.5, dtype=dtype), dtype(2.5)):
            grad = cross_entropy_backward(dloss, cache)
            assert grad.dtype == dtype
            np.testing.assert_allclose(grad, 2.5 * base, rtol=1e-6)
        assert cross_entropy_backward(1, cache).dtype == dtype  # a Python int is a number too


def test_two_calls_give_independent_caches():
    rng = np.random.default_rng(10)
    _, cache1 = cross_entropy_forward(_logits(rng, (3,)), np.array([0, 4, 6]))
    expected = cross_entropy_backward(1.0, cache1)
    cross_entropy_forward(_logits(rng, (3,)), np.array([5, 5, 5]))
    np.testing.assert_array_equal(cross_entropy_backward(1.0, cache1), expected)


@pytest.mark.parametrize("fused", [True, False])
def test_bad_inputs(fused):
    if fused:
        fwd, bwd = cross_entropy_forward, cross_entropy_backward
    else:
        fwd, bwd = nll_forward, nll_backward
    name = "logits" if fused else "logp"
    x = np.full((2, 3, 4), -1.3)
    t = np.array([[0, 1, 2], [3, -100, 1]])
    with pytest.raises(ValueError, match=f"{name} must be a floating-point"):
        fwd(np.ones((2, 3, 4), dtype=np.int64), t)
    with pytest.raises(ValueError, match="NaN"):
        fwd(np.where(np.arange(4) == 2, np.nan, x), t)
    with pytest.raises(ValueError, match="infinite"):
        fwd(np.where(np.arange(4) == 2, -np.inf, x), t)
    with pytest.raises(ValueError, match=rf"targets must have shape \(2, 3\) \(...\) = {name}"):
        fwd(x, t.reshape(3, 2))
    with pytest.raises(ValueError, match="targets must have shape"):
        fwd(x, t[..., None])
    with pytest.raises(ValueError,
                       match=r"targets must lie in \[0, 3\].*out-of-range value\(s\) \[4, -7\]"):
        fwd(x, np.array([[0, 4, 2], [-7, -100, 1]]))
    with pytest.raises(ValueError, match="out-of-range value\\(s\\) \\[-100\\]"):
        fwd(x, t, ignore_index=-1)  # -100 is no longer ignored
    with pytest.raises(ValueError, match="integer array of class ids"):
        fwd(x, t.astype(np.float64))
    with pytest.raises(ValueError, match="targets must be a numpy.ndarray"):
        fwd(x, t.tolist())
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        fwd(x, t, ignore_index=-100.0)
    with pytest.raises(ValueError, match="one of 'mean', 'sum', 'none', got 'avg'"):
        fwd(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        fwd(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        fwd(x, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fwd(np.array(0.5), np.array(0))

    _, cache = fwd(x, t)
    with pytest.raises(ValueError, match=r"dloss must have shape \(\)"):
        bwd(np.ones((2, 3)), cache)
    with pytest.raises(ValueError, match="dloss has dtype float32"):
        bwd(np.float32(1.0), cache)
    with pytest.raises(ValueError, match="NaN"):
        bwd(float("nan"), cache)
    with pytest.raises(ValueError, match="numpy.ndarray"):
        bwd("1.0", cache)
    _, cache_none = fwd(x, t, reduction="none")
    with pytest.raises(ValueError, match=r"dloss must have shape \(2, 3\)"):
        bwd(np.ones(3), cache_none)
    with pytest.raises(ValueError, match=r"dloss must have shape \(2, 3\).*got \(\)"):
        bwd(1.0, cache_none)
    with pytest.raises(ValueError, match="dloss has dtype float32"):
        bwd(np.ones((2, 3), dtype=np.float32), cache_none)


def _float64_cross_entropy_rows(logits, targets, label_smoothing, ignore_index=-100):
    """ℓ_n in float64 (long double for the log-sum-exp): the reference for logits whose
    float32 log-probabilities overflow. (...) rows, 0 where ignored."""
    x = logits.astype(np.longdouble)  # (..., V)
    m = np.max(x, axis=-1)  # (...)
    log_sum = np.log(np.sum(np.exp(x - m[..., None]), axis=-1))  # (...) log Σ exp(x − m)
    valid = targets != ignore_index
    x_y = np.take_along_axis(x, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    # −log p_y = (m − x_y) + log Σ, in this order: m + log Σ would round log Σ away at 1e38
    rows = ((1 - label_smoothing) * ((m - x_y) + log_sum)
            + label_smoothing * ((m - np.mean(x, axis=-1)) + log_sum))  # (...)
    return np.where(valid, rows, 0).astype(np.float64)


HUGE_LOGITS = np.array([[3e38, -3e38, 1e37, 0.0],  # log p of class 1 is −6e38: beyond float32
                        [3e38, 3e38, -3e38, -3e38],  # a tie between two huge logits
                        [-2e38, 1e38, 0.0, 5.0],
                        [1.0, 2.0, -3e38, 3.0]], dtype=np.float32)
HUGE_TARGETS = np.array([0, 1, 1, 2])  # every target's own loss is representable


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.25])  # ε = 1: sums beyond float32
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_finite_float32_logits_give_the_true_loss(label_smoothing, reduction):
    # issue 14: with ε = 0 the smoothing term was still evaluated, 0 · Σ log p = 0 · (−inf) =
    # NaN for a loss of 0 or 0.69; with ε > 0 the sum of V log-probabilities overflowed.
    # Reference: the same formula in long double; gradient: torch's float64 p − q
    targets = np.where(np.arange(4) == 3, -100, HUGE_TARGETS)  # one ignored row as well
    for fwd, x in ((cross_entropy_forward, HUGE_LOGITS), (nll_forward, None)):
        if x is None:  # the atomic pair sees log-probabilities; only finite ones are valid
            with np.errstate(over="ignore"):
                x = log_softmax_forward(HUGE_LOGITS[1:])[0]
            if not np.all(np.isfinite(x)):
                x = np.where(np.isfinite(x), x, np.float32(-3e38))  # finite, still huge
            rows_logits, rows_targets = x, targets[1:]
        else:
            rows_logits, rows_targets = x, targets
        loss, cache = fwd(rows_logits, rows_targets, label_smoothing=label_smoothing,
                          reduction=reduction)
        expected_rows = _float64_cross_entropy_rows(rows_logits, rows_targets, label_smoothing)
        if fwd is nll_forward:  # nll is linear in its inputs: −Σ q logp in float64
            logp = rows_logits.astype(np.float64)
            valid = rows_targets != -100
            logp_y = np.take_along_axis(logp, np.where(valid, rows_targets, 0)[:, None], -1)[:, 0]
            expected_rows = np.where(valid, -(1 - label_smoothing) * logp_y
                                     - label_smoothing * logp.mean(axis=-1), 0)
        n_valid = int(np.count_nonzero(rows_targets != -100))
        expected = {"none": expected_rows, "sum": expected_rows.sum(),
                    "mean": expected_rows.sum() / n_valid}[reduction]
        assert loss.dtype == np.float32 and np.all(np.isfinite(loss)), (fwd.__name__, loss)
        assert_close(loss, expected, np.float32, f"{fwd.__name__} loss", atol=0.0)
    _, cache = cross_entropy_forward(HUGE_LOGITS, targets, label_smoothing=label_smoothing,
                                     reduction=reduction)
    dloss = _dloss(np.random.default_rng(1), reduction, (4,), np.float32)
    dlogits = cross_entropy_backward(dloss, cache)
    _, dlogits_t = _torch_cross_entropy(HUGE_LOGITS.astype(np.float64), targets,
                                        dloss.astype(np.float64),
                                        label_smoothing=label_smoothing, reduction=reduction)
    assert_close(dlogits, dlogits_t, np.float32, "dlogits")


def test_a_loss_beyond_the_dtype_is_a_clear_error():
    # the true loss of a counted row (−log p_y = 6e38) or of the sum does not fit float32:
    # NonFiniteError (a ValueError), not inf or NaN. The same row ignored is fine
    from npformer._validate import NonFiniteError

    logits = HUGE_LOGITS[:1]  # class 1 has log p = −6e38
    for eps in (0.0, 0.5):
        with pytest.raises(NonFiniteError, match=r"loss of 1 counted row\(s\) \(first at index "
                                                 r"\(0,\)\) is not representable in float32"):
            cross_entropy_forward(logits, np.array([1]), label_smoothing=eps)
        loss, _ = cross_entropy_forward(logits, np.array([-100]), label_smoothing=eps)
        assert loss == 0.0
    rows = np.tile(np.array([[2.5e38, -2.5e38]], dtype=np.float32), (3, 1))
    # each row: ε · (lse − mean) = 1.0 · 2.5e38 fits; their sum 7.5e38 does not, their mean does
    loss, _ = cross_entropy_forward(rows, np.zeros(3, dtype=np.int64), label_smoothing=1.0)
    assert_close(loss, 2.5e38, np.float32, "mean", atol=0.0)
    with pytest.raises(NonFiniteError, match=r"the sum of the row losses \(7.5e\+38\) is not "
                                             r"representable in float32"):
        cross_entropy_forward(rows, np.zeros(3, dtype=np.int64), label_smoothing=1.0,
                              reduction="sum")


def test_smoothing_mean_of_float64_logits_near_the_largest_double():
    # mean(x) of logits near 1e308 overflows a plain float64 sum; it is scaled instead
    logits = np.array([[1.2e308, 1.2e308, -1e308]])
    loss, _ = cross_entropy_forward(logits, np.array([0]), label_smoothing=0.1)
    expected = 0.9 * np.log(2.0) + 0.1 * (1.2e308 - (1.2e308 * 2 / 3 - 1e308 / 3))
    assert_close(loss, expected, np.float64, "loss", atol=0.0)
