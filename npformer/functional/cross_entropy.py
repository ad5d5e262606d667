"""Cross-entropy loss on logits, fused, beside its atomic form ``log_softmax`` + ``nll``.

Semantics are exactly PyTorch's ``F.cross_entropy`` (class axis last here: logits z (..., V),
targets (...)), with one deliberate difference for a batch whose targets are all ignored.

Definition
----------
For one row n with logits z (V,), integer target y and label smoothing ε_ls ∈ [0, 1], the
target distribution is

    t_v = (1 − ε_ls)·[v = y] + ε_ls / V          (V,)   Σ_v t_v = 1

and the row's loss is the cross-entropy between t and p = softmax(z) (V,):

    ℓ_n = −Σ_v t_v log p_v = (1 − ε_ls)·(−log p_y) + ε_ls·(−(1/V) Σ_v log p_v)

(the right-hand form is how PyTorch writes it; with ε_ls = 0 it is the familiar −log p_y).
A row whose target equals ``ignore_index`` has no target: ℓ_n = 0 and it is not counted.
With N_valid the number of counted rows, the reductions are

    "none": ℓ (...),     "sum": Σ_n ℓ_n,     "mean": Σ_n ℓ_n / N_valid

"mean" divides by the rows that count, not by all rows, so padding does not dilute the loss.

Atomic backward: nll, then log-softmax
--------------------------------------
With log p = log_softmax(z), the loss is linear in log p, so :func:`nll_backward` gives

    ∂ℓ_n/∂(log p_v) = −t_v

and the log-softmax backward (``dx = dy − p Σ_v dy_v``, see :mod:`.softmax`) turns it into

    ∂ℓ_n/∂z = −t − p Σ_v (−t_v) = p Σ_v t_v − t = p − t      because Σ_v t_v = 1.

Fused backward
--------------
So the whole chain collapses to one subtraction, scaled by the upstream gradient:

    dz_n = g_n (p_n − t_n),   g_n = dloss / N_valid ("mean"), dloss ("sum"), dloss_n ("none"),
    and g_n = 0 for an ignored row.

This is the fused gradient ``p − onehot(y)`` (with ε_ls = 0, t = onehot(y)). It needs neither
the gradient with respect to log p nor its row sums, and every entry lies in [−1, 1]
whatever the size of the logits. :func:`cross_entropy_forward` / :func:`cross_entropy_backward` are the fused
pair; :func:`nll_forward` / :func:`nll_backward` on top of :func:`.softmax.log_softmax_forward`
are the step-by-step version, and the tests check that both agree to rounding.

When every target is ignored
----------------------------
PyTorch's "mean" then returns 0 / 0 = NaN, which poisons a running loss and, through the
optimizer, the weights. Here that case gives loss 0 and a zero gradient (the sum over no
rows is 0, and we divide by max(N_valid, 1)): a batch made only of padding contributes
nothing. This is the one intended difference from PyTorch; "sum" and "none" already agree.

Logits must be finite: a −inf logit has log p = −inf, which label smoothing (ε_ls / V > 0)
would weight into an infinite loss. To leave a position out of the loss, use
``ignore_index``.

Large finite logits
-------------------
Each row's loss is assembled from two pieces, each evaluated only when its weight is not 0:
−log p_y (weight 1 − ε_ls), and the smoothing term −(1/V) Σ_v log p_v (weight ε_ls), which
is computed in float64 as (m − mean(z)) + log Σ_v exp(z_v − m), m the row's max — never as a
sum of V log-probabilities, which overflows float32 for logits near 1e37 (and with ε_ls = 0 it
used to be evaluated anyway: 0 · (−inf) = NaN for a loss that is really 0). When the true loss of a
counted row, or its sum over rows, is not representable in the logits' dtype (log-probabilities
beyond −3.4e38 in float32), a :class:`NonFiniteError` (a ValueError) says so instead of
returning inf or NaN. The gradient p − t lies in [−1, 1] and needs no such care.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import NonFiniteError, check_float, check_grad, check_probability, check_shape
from .softmax import log_softmax_forward

REDUCTIONS = ("mean", "sum", "none")


class NLLCache(NamedTuple):
    t: np.ndarray  # (..., V) target distribution, all-zero rows where the target is ignored
    valid: np.ndarray  # (...) bool, False where targets == ignore_index
    n_valid: int  # N_valid, the number of counted rows
    reduction: str


class CrossEntropyCache(NamedTuple):
    p: np.ndarray  # (..., V) softmax(logits)
    targets: np.ndarray  # (...) integer class ids
    valid: np.ndarray  # (...) bool, False where targets == ignore_index
    n_valid: int  # N_valid, the number of counted rows
    label_smoothing: float  # ε_ls
    reduction: str


# --------------------------------------------------------------------------------------
# Shared checks and pieces
# --------------------------------------------------------------------------------------


def _check_options(label_smoothing, reduction) -> tuple:
    label_smoothing = check_probability(label_smoothing, "label_smoothing", allow_one=True)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        valid = ", ".join(map(repr, REDUCTIONS))
        raise ValueError(f"reduction must be one of {valid}, got {reduction!r}")
    return label_smoothing, reduction


def _check_targets(targets, scores: np.ndarray, scores_name: str, ignore_index) -> np.ndarray:
    """Validate integer targets for scores (..., V); return the (...) mask of counted rows."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise ValueError(
            f"ignore_index must be an integer, got {type(ignore_index).__name__} {ignore_index!r}"
        )
    if not isinstance(targets, np.ndarray):
        raise ValueError(
            f"targets must be a numpy.ndarray of integers, got {type(targets).__name__}"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            f"targets must be an integer array of class ids, got dtype {targets.dtype}"
        )
    check_shape(targets, scores.shape[:-1], "targets", f"(...) = {scores_name}.shape[:-1]")
    vocab = scores.shape[-1]
    valid = np.asarray(targets != ignore_index)  # (...)
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bad.any():
        raise ValueError(
            f"targets must lie in [0, {vocab - 1}] ({vocab} classes, {scores_name}.shape[-1]) "
            f"or equal ignore_index={int(ignore_index)}, got out-of-range value(s) "
            f"{targets[bad][:5].tolist()}"
        )
    return valid


def _check_loss_inputs(scores, scores_name: str, targets, ignore_index, label_smoothing,
                       reduction) -> tuple:
    """The one check of nll's and cross-entropy's forward: scores (..., V) finite floats
    (``scores_name``: "logp" or "logits"), targets (...) class ids in [0, V) or ignore_index,
    label_smoothing in [0, 1], reduction one of REDUCTIONS.
    Returns ``(scores, valid, label_smoothing, reduction)``, valid (...) the counted rows."""
    scores = check_float(scores, scores_name, min_ndim=1)
    label_smoothing, reduction = _check_options(label_smoothing, reduction)
    valid = _check_targets(targets, scores, scores_name, ignore_index)  # (...)
    return scores, valid, label_smoothing, reduction


def _check_dloss(dloss, valid: np.ndarray, reduction: str, dtype) -> np.ndarray:
    """The upstream gradient of the loss as an array: 0-d for "mean"/"sum", (...) like the
    rows for "none", in the loss's dtype (a plain Python number takes that dtype)."""
    if isinstance(dloss, np.generic):  # a NumPy scalar keeps its dtype: it must match
        dloss = np.asarray(dloss)
    elif isinstance(dloss, (int, float)) and not isinstance(dloss, bool):
        dloss = np.asarray(dloss, dtype=dtype)  # a plain Python number has no dtype of its own
    shape = valid.shape if reduction == "none" else ()
    return check_grad(dloss, shape, dtype, "dloss")


def _target_distribution(targets, valid, vocab: int, eps: float, dtype) -> np.ndarray:
    """t = (1 − ε_ls)·onehot(y) + ε_ls/V per counted row, 0 for an ignored row. (..., V)"""
    t = np.full(targets.shape + (vocab,), eps / vocab, dtype=dtype)  # ε_ls/V on every class
    safe = np.where(valid, targets, 0)  # (...) an ignored row points at class 0, zeroed below
    np.put_along_axis(t, safe[..., None], (1.0 - eps) + eps / vocab, axis=-1)
    t[~valid] = 0  # no target, no loss, no gradient
    return t


def _at_targets(logp: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(...) log p_y: each row's log-probability of its target (an ignored row reads class 0;
    its loss is zeroed later)."""
    safe = np.where(valid, targets, 0)  # (...)
    return np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # (...)


def _mean_log_softmax(logits: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """(...) float64 (1/V) Σ_v log p_v of rows z (..., V), without summing V log-probabilities.

    log p_v = (z_v − m) − log Σ exp(z − m), so the mean is (mean(z) − m) − log Σ exp(z − m),
    and at the max v* (z_v* = m) log p_v* = −log Σ exp(z − m) gives the last term. Not
    m + log Σ first: near 1e38 that sum would round log Σ (≤ log V) away."""
    top = np.argmax(logits, axis=-1)[..., None]  # (..., 1) where z = m
    m = np.take_along_axis(logits, top, axis=-1)[..., 0].astype(np.float64)  # (...)
    log_sum = -np.take_along_axis(logp, top, axis=-1)[..., 0].astype(np.float64)  # (...)
    return (_mean_float64(logits) - m) - log_sum  # (...)


def _smoothed_row_losses(logp_y, mean_logp, valid, eps: float, name: str) -> np.ndarray:
    """ℓ_n = (1 − ε_ls)(−log p_y) + ε_ls (−mean_v log p_v) per row, 0 where ignored. (...)

    logp_y: (...) log p_y in the dtype; mean_logp: (...) float64 mean of the row's log p,
    or None when ε_ls = 0. A term whose weight is 0 is not evaluated (0 · (−inf) would be NaN
    for a loss that is finite). NonFiniteError when a counted row's loss is not
    representable in the dtype (its log p_y or mean log p overflowed it).
    """
    dtype = logp_y.dtype
    if eps == 0.0:
        loss_rows = -logp_y  # (...) ℓ_n = −log p_y, in the dtype (bitwise as before)
    else:
        loss_rows = eps * -mean_logp  # (...) float64
        if eps != 1.0:
            loss_rows = loss_rows - (1.0 - eps) * logp_y.astype(np.float64)
    _refuse_unrepresentable_rows(loss_rows, valid, dtype, name)
    return np.where(valid, loss_rows, 0).astype(dtype, copy=False)  # (...)


def _refuse_unrepresentable_rows(loss_rows, valid, dtype, name: str) -> None:
    """NonFiniteError when a counted row's loss (...) is ±inf or beyond ``dtype``'s range."""
    bad = valid & ~(np.abs(loss_rows) <= np.finfo(dtype).max)  # inf, or beyond the dtype
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(np.atleast_1d(bad))[0])
        raise NonFiniteError(
            f"{name}: the loss of {int(bad.sum())} counted row(s) (first at index {first}) is "
            f"not representable in {dtype} (finite logits, but log-probabilities beyond "
            f"{-float(np.finfo(dtype).max):.3g}); scale the logits down or compute in float64")


def _mean_float64(x: np.ndarray) -> np.ndarray:
    """(...) mean over the last axis of (..., V), accumulated in float64 without overflow
    (float64 inputs near 1e308 are divided by their largest magnitude first)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is redone, scaled
        mean = np.mean(x, axis=-1, dtype=np.float64)  # (...)
    if np.all(np.isfinite(mean)):
        return mean
    big = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float64)  # (..., 1) > 0
    return np.mean(x / big, axis=-1, dtype=np.float64) * big[..., 0]


def _reduce(loss_rows: np.ndarray, n_valid: int, reduction: str, name: str) -> np.ndarray:
    """(...) per-row losses (0 where ignored) → "none": (...), "sum"/"mean": 0-d array.

    Finite rows whose sum overflows the dtype (rows near 1e38 in float32) are summed again
    in float64: a mean that fits is returned, a total that does not fit raises
    NonFiniteError instead of returning inf."""
    if reduction == "none":
        return np.asarray(loss_rows)
    count = 1 if reduction == "sum" else max(n_valid, 1)  # all ignored: 0 / 1 = 0 (PyTorch: NaN)
    with np.errstate(over="ignore"):  # an overflowing sum is redone in float64 below
        total = np.sum(loss_rows)
        if reduction == "mean":
            total = total / count
    if np.isfinite(total):
        return np.asarray(total)
    total = np.sum(loss_rows, dtype=np.float64) / count  # the rows are finite: no NaN here
    if not abs(total) <= np.finfo(loss_rows.dtype).max:
        raise NonFiniteError(
            f"{name}: the {reduction} of the row losses ({float(total):.4g}) is not "
            f"representable in {loss_rows.dtype}; scale the logits down or compute in float64")
    return np.asarray(total, dtype=loss_rows.dtype)


def _row_scale(dloss: np.ndarray, valid: np.ndarray, n_valid: int, reduction: str) -> np.ndarray:
    """g (...): each row's share of the upstream gradient dloss (checked), 0 for ignored rows."""
    # forward: "none": L_n = ℓ_n, so g_n = dloss_n; "sum": L = Σ_n ℓ_n, so g_n = dloss;
    # "mean": L = Σ_n ℓ_n / N_valid, so g_n = dloss / N_valid
    g = dloss / max(n_valid, 1) if reduction == "mean" else dloss  # (...) or 0-d
    # an ignored row's loss is the constant 0: it passes no gradient on
    return np.where(valid, g, 0).astype(dloss.dtype, copy=False)  # (...)


# --------------------------------------------------------------------------------------
# Atomic: negative log-likelihood on log-probabilities
# --------------------------------------------------------------------------------------


def nll_forward(logp: np.ndarray, targets: np.ndarray, ignore_index: int = -100,
                label_smoothing: float = 0.0, reduction: str = "mean"):
    """``L = −Σ_v q_v logp_v`` per row, reduced; logp are log-probabilities (log_softmax output).

    logp: (..., V) float, targets: (...) integers in [0, V) or ignore_index
    →  loss: 0-d array ("mean", "sum") or (...) ("none"), logp's dtype.
    Unlike ``F.nll_loss``, label smoothing is accepted, so that ``log_softmax`` + ``nll`` is
    exactly ``cross_entropy`` for every option.
    """
    logp, valid, eps, reduction = _check_loss_inputs(logp, "logp", targets, ignore_index,
                                                     label_smoothing, reduction)
    t = _target_distribution(targets, valid, logp.shape[-1], eps, logp.dtype)  # (..., V)
    logp_y = _at_targets(logp, targets, valid)  # (...) log p_y
    mean_logp = _mean_float64(logp) if eps > 0 else None  # (...) (1/V) Σ_v log p_v, float64
    # ℓ_n = −Σ_v t_v log p_v = (1 − ε_ls)(−log p_y) + ε_ls (−(1/V) Σ_v log p_v); 0: ignored
    loss_rows = _smoothed_row_losses(logp_y, mean_logp, valid, eps, "nll")  # (...)
    n_valid = int(np.count_nonzero(valid))  # N_valid
    loss = _reduce(loss_rows, n_valid, reduction, "nll")  # 0-d, or (...) for "none"
    return loss, NLLCache(t, valid, n_valid, reduction)


def nll_backward(dloss, cache: NLLCache):
    """Returns ``dlogp`` (..., V).

    dloss: a number or 0-d array for "mean"/"sum", an array (...) for "none".
    """
    t, valid, n_valid, reduction = cache
    dloss = _check_dloss(dloss, valid, reduction, t.dtype)  # 0-d, or (...) for "none"
    g = _row_scale(dloss, valid, n_valid, reduction)  # (...)
    # forward: ℓ_n = −Σ_v t_v log p_v, so ∂ℓ_n/∂(log p_v) = −t_v
    return -t * g[..., None]  # (..., V)


# --------------------------------------------------------------------------------------
# Fused: log-softmax and nll in one pair, gradient p − q
# --------------------------------------------------------------------------------------


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100,
                          label_smoothing: float = 0.0, reduction: str = "mean"):
    """PyTorch's ``F.cross_entropy`` with the class axis last.

    logits: (..., V) finite floats, targets: (...) integers in [0, V) or ignore_index
    →  loss: 0-d array ("mean", "sum") or (...) ("none"), in logits' dtype.
    """
    logits, valid, eps, reduction = _check_loss_inputs(logits, "logits", targets, ignore_index,
                                                       label_smoothing, reduction)
    with np.errstate(over="ignore"):  # z − m beyond the dtype: log p = −inf, refused below
        logp, log_softmax_cache = log_softmax_forward(logits)  # (..., V) stable log-sum-exp
    p = log_softmax_cache.p  # (..., V) p = softmax(z), for the backward
    logp_y = _at_targets(logp, targets, valid)  # (...) log p_y
    mean_logp = _mean_log_softmax(logits, logp) if eps > 0 else None  # (...) Σ_v log p_v / V
    # ℓ_n = −Σ_v t_v log p_v = (1 − ε_ls)(−log p_y) + ε_ls (−(1/V) Σ_v log p_v); 0: ignored
    loss_rows = _smoothed_row_losses(logp_y, mean_logp, valid, eps, "cross_entropy")  # (...)
    n_valid = int(np.count_nonzero(valid))  # N_valid
    loss = _reduce(loss_rows, n_valid, reduction, "cross_entropy")  # 0-d, or (...) for "none"
    return loss, CrossEntropyCache(p, targets, valid, n_valid, eps, reduction)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """Returns ``dlogits`` (..., V).

    dloss: a number or 0-d array for "mean"/"sum", an array (...) for "none".
    """
    p, targets, valid, n_valid, eps, reduction = cache
    dloss = _check_dloss(dloss, valid, reduction, p.dtype)  # 0-d, or (...) for "none"
    V = p.shape[-1]
    g = _row_scale(dloss, valid, n_valid, reduction)  # (...)
    # forward: ℓ_n = −Σ_v t_v log softmax(z)_v with Σ_v t_v = 1, so ∂ℓ_n/∂z = p − t,
    # t = (1 − ε_ls)·onehot(y) + ε_ls/V
    dlogits = p - eps / V  # (..., V) p − ε_ls/V on every class
    rows = dlogits.reshape(-1, V)  # (N, V) view
    counted = np.flatnonzero(valid)  # counted rows, as flat row indices
    rows[counted, targets.reshape(-1)[counted]] -= 1.0 - eps  # − (1 − ε_ls) at the target
    dlogits *= g[..., None]  # (..., V) dz_n = g_n (p_n − t_n); ignored rows: g_n = 0
    return dlogits
