"""The softmax–cross-entropy head in one pass: mean loss and dlogits together (numba).

    loss, dlogits = softmax_cross_entropy(logits, targets, ignore_index=-100, dlogits_out=None)

is what the trainer computes with the functional pair
``cross_entropy_forward(logits, targets)`` then ``cross_entropy_backward(1.0, cache)``
(:mod:`npformer.functional.cross_entropy`, where the maths is derived): reduction "mean"
over the counted rows, upstream gradient 1, label smoothing 0 (not an argument here: use the
functional pair for ε > 0 or another reduction).

What is fused, and why
----------------------
The functional pair makes about six (N, V) arrays (x − m, exp, p, log p, p − q, and the
scaled copy) and reads each back; at the LM head (V = 50304) each is 400 MB per 2048 rows.
Here every row is handled while it is in cache, in three sweeps over its V entries:

1. m = max_v x_v (four register lanes), and x_y is read (before an in-place pass
   overwrites it);
2. e_v = exp(x_v − m) into a per-thread scratch row (V,) (the vectorisable exp of
   :mod:`.flash_attention`, ``_exp_tile``), and Σ_v e_v accumulated in float64;
3. dlogits_v = e_v · (g / Σ) − g·[v = y], g = 1 / N_valid (0 for an ignored row);

and the row's loss −log p_y = log Σ − (x_y − m) is formed in float64. The only (N, V)
array is the output, and ``dlogits_out`` may be ``logits`` itself (the logits are not
needed after the loss): then no (N, V) memory is allocated at all, and it is the faster
form (no second 4·N·V bytes to stream).

Measured (Intel Xeon, 2 cores shared with other jobs, float32, 2 threads, min of 5–11
runs, issue 15): N = 2048, V = 65: functional pair 1.5 ms, kernel 0.4 ms; V = 8192:
510 ms, 103 ms into a separate array, 66 ms in place. Divisions compile with
``error_model="numpy"`` (IEEE: no zero-divisor check, which would stop vectorisation).

Checks, and the cases the functional pair handles
-------------------------------------------------
No pass over the logits for finiteness (the model validates once per step): NaN or inf
logits give a NaN loss, which the trainer catches. O(N) checks on the targets stay
(integer dtype, shape, range, ``ignore_index``: the functional pair's own check), and
every-target-ignored gives loss 0 and zero gradient, like the functional pair. For finite
logits whose counted row loss is not representable in the logits' dtype (float32 logits
±3e38: log p = −6e38) a :class:`~npformer._validate.NonFiniteError` says so, with the
functional pair's wording; x_v − m overflowing to −inf inside a row just gives e_v = 0 (as
it should: such a class has probability 0 in that dtype). The total is summed in float64,
so a mean of representable rows is representable.

Rows are split into as many contiguous chunks as threads (``numba.prange``); each chunk
owns its output rows and its own row-losses, so there are no races. The loss is the sum
of the float64 row losses in row order (deterministic, independent of the thread count).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from .._validate import NonFiniteError
from ..functional.cross_entropy import _check_targets
from .flash_attention import _exp_constants, _exp_tile

__all__ = ["softmax_cross_entropy"]


@njit(cache=True, error_model="numpy")
def _row_max_and_probe(x):
    """(max_v x_v, Σ_v x_v · 0) of a row (V,): the probe is 0, or NaN when a logit is NaN or
    ±inf (the max by comparison ignores a NaN, and the exp maps it to 0: the probe carries
    it into the loss). Four independent lanes, in registers: ~2× faster than one chain."""
    m0 = m1 = m2 = m3 = x[0]
    p0 = p1 = p2 = p3 = x[0] * 0
    n_fours = x.shape[0] // 4
    for k in range(n_fours):
        a, b, c, d = x[4 * k], x[4 * k + 1], x[4 * k + 2], x[4 * k + 3]
        m0 = a if a > m0 else m0
        m1 = b if b > m1 else m1
        m2 = c if c > m2 else m2
        m3 = d if d > m3 else m3
        p0 += a * 0
        p1 += b * 0
        p2 += c * 0
        p3 += d * 0
    for v in range(4 * n_fours, x.shape[0]):
        m0 = x[v] if x[v] > m0 else m0
        p0 += x[v] * 0
    m01 = m1 if m1 > m0 else m0
    m23 = m3 if m3 > m2 else m2
    return (m23 if m23 > m01 else m01), (p0 + p1) + (p2 + p3)


@njit(cache=True, error_model="numpy")
def _row_sum_float64(e):
    """Σ_v e_v of a row (V,) in float64, in four lanes (then added in a fixed order)."""
    s0 = s1 = s2 = s3 = np.float64(0.0)
    n_fours = e.shape[0] // 4
    for k in range(n_fours):
        s0 += np.float64(e[4 * k])
        s1 += np.float64(e[4 * k + 1])
        s2 += np.float64(e[4 * k + 2])
        s3 += np.float64(e[4 * k + 3])
    for v in range(4 * n_fours, e.shape[0]):
        s0 += np.float64(e[v])
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, parallel=True, error_model="numpy")  # IEEE division (NaN, no raise)
def _cross_entropy_rows(logits, targets, valid, row_scale, out, row_losses, consts,
                        mantissa_bits, n_chunks):
    """Fill out (N, V) with g (softmax − onehot) and row_losses (N,) with −log p_y (float64).

    logits, out: (N, V) C-contiguous, possibly the same array; targets (N,) int64;
    valid (N,) bool; row_scale: g = 1 / N_valid in the dtype; n_chunks: row ranges (threads).
    """
    n_rows, vocab = logits.shape
    zero = row_scale - row_scale
    for chunk in prange(n_chunks):
        first = chunk * n_rows // n_chunks
        last = (chunk + 1) * n_rows // n_chunks
        shift = np.empty(vocab, dtype=logits.dtype)  # the row max on every entry, for _exp_tile
        shift_low = np.zeros(vocab, dtype=logits.dtype)
        scale_cell = np.empty(1, dtype=logits.dtype)  # g / Σ rounded to the dtype
        exp_row = np.empty((1, vocab), dtype=logits.dtype)  # (1, V) e_v of the current row
        for row in range(first, last):
            out_row = out[row]  # (V,)
            if not valid[row]:
                for v in range(vocab):
                    out_row[v] = zero
                row_losses[row] = 0.0
                continue
            x = logits[row]  # (V,)
            m, nan_probe = _row_max_and_probe(x)
            x_target = x[targets[row]]  # read before out (maybe x itself) is written
            for v in range(vocab):
                shift[v] = m
            # e_v = exp(x_v − m), 0 where x_v − m underflows; into a scratch row, not into
            # out: with out = logits (in place) the overlap check LLVM puts before its
            # vector loop fails and the scalar loop runs (measured 2.5× slower)
            _exp_tile(logits[row:row + 1], shift, shift_low, exp_row, consts, mantissa_bits)
            e = exp_row[0]  # (V,)
            total = _row_sum_float64(e)  # Σ_v e_v in [1, V]
            # ℓ = −log p_y = log Σ − (x_y − m); NaN logits give NaN here, on purpose
            # (exp maps a NaN argument to 0: the probe carries the NaN into the loss instead)
            row_losses[row] = (np.log(total) - (np.float64(x_target) - np.float64(m))
                               + nan_probe)
            scale_cell[0] = np.float64(row_scale) / total
            scale = scale_cell[0]  # g / Σ
            for v in range(vocab):
                out_row[v] = e[v] * scale  # g p_v
            out_row[targets[row]] -= row_scale  # g (p_y − 1)


def softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray, *, ignore_index: int = -100,
                          dlogits_out: np.ndarray = None):
    """Mean cross-entropy over the counted rows and its gradient, in one pass.

    logits: (..., V) C-contiguous float32/float64, finite (not checked: NaN → NaN loss);
    targets: (...) integers in [0, V) or ``ignore_index``;
    dlogits_out: None (a new array), or a C-contiguous (..., V) array of logits' dtype —
    ``logits`` itself is allowed (the gradient then overwrites the logits).
    →  loss: 0-d array in logits' dtype (as ``cross_entropy_forward``), dlogits (..., V).

    Equals ``cross_entropy_forward(logits, targets, ignore_index)`` and
    ``cross_entropy_backward(1.0, cache)``: reduction "mean", label smoothing 0.
    """
    if not isinstance(logits, np.ndarray) or logits.dtype not in (np.float32, np.float64):
        raise ValueError("softmax_cross_entropy: logits must be a float32/float64 "
                         f"numpy.ndarray, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError("softmax_cross_entropy: logits must have shape (..., V) with V >= 1, "
                         f"got {logits.shape}")
    if not logits.flags.c_contiguous:
        raise ValueError("softmax_cross_entropy: logits must be C-contiguous "
                         "(np.ascontiguousarray), got a strided view")
    valid = _check_targets(targets, logits, "logits", ignore_index)  # (...)
    if dlogits_out is None:
        dlogits_out = np.empty_like(logits)
    elif dlogits_out is not logits:
        if (not isinstance(dlogits_out, np.ndarray) or dlogits_out.shape != logits.shape
                or dlogits_out.dtype != logits.dtype or not dlogits_out.flags.c_contiguous
                or not dlogits_out.flags.writeable):
            raise ValueError(
                "softmax_cross_entropy: dlogits_out must be a writeable C-contiguous array of "
                f"shape {logits.shape} and dtype {logits.dtype} (or logits itself), got "
                f"{getattr(dlogits_out, 'shape', type(dlogits_out).__name__)} "
                f"{getattr(dlogits_out, 'dtype', '')}")
        if np.may_share_memory(dlogits_out, logits) and not (
                dlogits_out.__array_interface__["data"][0]
                == logits.__array_interface__["data"][0]):
            raise ValueError("softmax_cross_entropy: dlogits_out overlaps logits without being "
                             "the same memory; pass logits itself or a separate array")
    elif not logits.flags.writeable:
        raise ValueError("softmax_cross_entropy: dlogits_out is logits, which is read-only")
    dtype = logits.dtype.type
    vocab = logits.shape[-1]
    n_valid = int(np.count_nonzero(valid))
    rows = logits.reshape(-1, vocab)  # (N, V) views, no copies (C-contiguous)
    out_rows = dlogits_out.reshape(-1, vocab)
    valid_rows = np.ascontiguousarray(valid.reshape(-1))  # (N,)
    target_rows = np.where(valid_rows, targets.reshape(-1), 0).astype(np.int64)  # (N,)
    row_scale = dtype(1.0) / dtype(max(n_valid, 1))  # g, as cross_entropy_backward forms it
    row_losses = np.empty(rows.shape[0], dtype=np.float64)  # (N,) −log p_y, 0 where ignored
    mantissa_bits = 23 if dtype is np.float32 else 52
    with np.errstate(all="ignore"):  # as plain Python (NUMBA_DISABLE_JIT): NaN logits → NaN
        _cross_entropy_rows(rows, target_rows, valid_rows, row_scale, out_rows, row_losses,
                            _exp_constants(logits.dtype), mantissa_bits,
                            max(1, min(get_num_threads(), rows.shape[0])))
    limit = float(np.finfo(dtype).max)
    bad = row_losses > limit  # (N,) finite logits, a loss beyond the dtype (NaN: False)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), valid.shape)
        raise NonFiniteError(
            f"softmax_cross_entropy: the loss of {int(bad.sum())} counted row(s) (first at "
            f"index {tuple(int(i) for i in first)}) is not representable in "
            f"{np.dtype(dtype)} (finite logits, but log-probabilities beyond {-limit:.3g}); "
            "scale the logits down or compute in float64")
    loss = np.asarray(np.sum(row_losses) / max(n_valid, 1), dtype=dtype)  # 0-d
    return loss, dlogits_out
