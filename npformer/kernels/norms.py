"""Fused LayerNorm and RMSNorm: numba kernels, forward and backward, one pass per row.

    y, cache = layernorm_forward(x, weight, bias, eps)    dx, dw, db = layernorm_backward(dy, cache)
    y, cache = rmsnorm_forward(x, weight, eps)           dx, dw = rmsnorm_backward(dy, cache)

Drop-in twins of :mod:`npformer.functional.layernorm` and :mod:`npformer.functional.rmsnorm`
(same arguments, same results, the same cache NamedTuples, so a kernel forward's cache feeds
the functional backward and vice versa). The maths and its derivation live in those files;
this one arranges it for speed. Extra keywords: ``out=`` (forward, for y) and ``dx_out=``
(backward, for dx) write into a caller's buffer (same shape and dtype, C-contiguous, sharing
no memory with the inputs) and return it.

What is fused
-------------
The NumPy pair makes ~8 passes over N × C arrays with a fresh temporary each (x − μ, the
second centring, the squares, x̂, x̂ ⊙ w, + b; in the backward g, g ⊙ x̂, dy ⊙ x̂, the dx
expression). Here each row of C values (≤ a few KB, in L1) is read a few times and every
N × C array is written once:

- forward, per row (``prange`` over rows): Σ x → μ; Σ d and Σ d² with d = x − μ → the
  second centring c = mean(d) and v = mean(d²) − c² (this IS the functional's second pass
  ``x_c ← x_c − mean(x_c)`` followed by mean(x_c²), written as the corrected two-pass
  formula: c is of the order of μ's rounding, so c² cancels nothing); then x̂ and y written
  straight into their outputs. RMSNorm: Σ x² then x̂, y.
- backward, over chunks of rows (``prange`` over chunks): per row Σ g and Σ g ⊙ x̂
  (g = dy ⊙ w), then dx, then dy ⊙ x̂ and dy added into the chunk's row of a (n_chunks, C)
  float64 buffer (the row is still in L1; one fused loop for all three measured no faster);
  the buffers are summed over chunks afterwards. No two threads ever write the same partial
  sum (race-free), and the chunking depends only on N, so the result does not depend on the
  number of threads (tested).
- Row sums (:func:`_sum`, ...) are vectorised: those helpers alone carry the ``reassoc``
  fast-math flag (see the note above them); every other operation is plain IEEE.

Precision: every per-row statistic (μ, c, v, 1/σ, the sums of the backward) and the weight
and bias gradients accumulate in float64, for float32 inputs too; outputs keep x's dtype.
Apart from the sums' ``reassoc``, ``fastmath`` is off (the offset tests at ±1e4 need
x − μ − c evaluated exactly in that order).

Errors, without a per-call ``isfinite`` pass
--------------------------------------------
Only O(1) checks here (types, shapes, dtypes, eps); the model validates its inputs once
per step. NaN or ±inf in x propagates as NaN. A variance (mean square) that overflows from
FINITE inputs would silently give rstd = 0 and all-zero outputs; the kernel counts such rows
inside its loop (a non-finite statistic whose row is all finite, or, for float32, a float64
statistic beyond float32's range: the functional's float32 statistic would be inf there) and
the wrapper raises :class:`npformer._validate.NonFiniteError` with the functional's message.
At the very edge the two can differ: in float32 the functional also refuses when a single
(x − μ)² overflows while the mean of the squares would not; the kernel then gives the right
answer.

Measured (2026-11-30, Intel Xeon with AVX-512, float32, x (16, 128, C), ms, median of
repeats; a shared machine with load average ~7 on 2 cores, so take the ratios, not the ms):

    1 numba thread, calls interleaved      forward kernel / functional   backward
    LayerNorm C = 128                      0.34 / 1.47   (4.3×)          0.45 / 1.67   (3.7×)
    RMSNorm   C = 128                      0.21 / 0.64   (3.1×)          0.35 / 1.23   (3.5×)
    LayerNorm C = 384                      0.97 / 8.47   (8.8×)          1.59 / 11.0   (6.9×)
    RMSNorm   C = 384                      0.87 / 3.60   (4.1×)          1.29 / 9.09   (7.1×)

With 2 threads the kernels were 0.18–1.2 ms back to back, but when each call must wake the
sleeping second thread (OMP_WAIT_POLICY=PASSIVE) on a loaded machine a call sometimes
waited ~2 ms for it to be scheduled. The reductions were 2× slower before the ``reassoc``
sums (one scalar add chain per row).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .._validate import FLOAT_DTYPES, check_no_overflow, check_positive, check_shape
from ..functional.layernorm import LayerNormCache
from ..functional.rmsnorm import RMSNormCache, unit_offset_scale

_MAX_CHUNKS = 32  # backward: rows are split into min(N, 32) chunks, each with its own partial sums


# ---- row sums, vectorised ---------------------------------------------------------------
# Without fastmath LLVM may not reorder a floating-point sum, so Σ_j runs as one scalar
# chain bound by the add latency (measured: the LayerNorm forward 2× slower). These helpers
# carry ONLY the 'reassoc' flag, which lets LLVM split each sum into vector lanes; nothing
# else in them can be rewritten: the centring subtraction is done by _minus, which has no
# flags (an unflagged instruction is a leaf that reassociation cannot see through), so
# d = x − μ stays exactly x − μ. The order of a sum then depends on the vector width (AVX2
# or AVX-512): results agree with the functional twin to the tested tolerances on either.

_SUMS = {"reassoc"}


@njit(cache=True)
def _minus(a, b):
    """a − b, exactly as IEEE (no fastmath flags, so never reassociated)."""
    return a - b


@njit(cache=True, fastmath=_SUMS)
def _sum(row):
    """Σ row[j] in float64."""
    total = np.float64(0.0)
    for j in range(row.shape[0]):
        total += row[j]
    return total


@njit(cache=True, fastmath=_SUMS)
def _centred_sums(row, mean):
    """(Σ d, Σ d²) in float64 with d = row − mean (mean: float64)."""
    sum_d = np.float64(0.0)
    sum_dd = np.float64(0.0)
    for j in range(row.shape[0]):
        d = _minus(np.float64(row[j]), mean)
        sum_d += d
        sum_dd += d * d
    return sum_d, sum_dd


@njit(cache=True, fastmath=_SUMS)
def _sum_of_squares(row):
    """Σ row[j]² in float64."""
    total = np.float64(0.0)
    for j in range(row.shape[0]):
        value = np.float64(row[j])
        total += value * value
    return total


@njit(cache=True, fastmath=_SUMS)
def _gradient_sums(dy_row, weight, xhat_row):
    """(Σ g, Σ g ⊙ x̂) in float64 with g = dy ⊙ w (the product in x's dtype, as in dx)."""
    sum_g = np.float64(0.0)
    sum_gx = np.float64(0.0)
    for j in range(dy_row.shape[0]):
        g = np.float64(dy_row[j] * weight[j])
        sum_g += g
        sum_gx += g * xhat_row[j]
    return sum_g, sum_gx


@njit(cache=True)
def _row_is_finite(row):
    for j in range(row.shape[0]):
        if not np.isfinite(row[j]):
            return False
    return True


@njit(cache=True)
def _statistic_overflowed(statistic, row, dtype_max):
    """True if a float64 row statistic is out of x's range (inf/NaN, or > dtype_max) while the
    row itself is finite: finite inputs overflowed. A row with NaN/inf gives False (it
    propagates as NaN). The row scan runs only for a bad statistic."""
    if statistic <= dtype_max:
        return False
    return _row_is_finite(row)


# ---- kernels --------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _layernorm_forward_kernel(x, weight, bias, eps, dtype_max, y, xhat, rstd):
    """x, y, xhat: (N, C); weight, bias: (C,) (ones / zeros when absent); rstd: (N,).
    Returns the number of rows whose variance overflowed."""
    n_rows, channels = x.shape
    n_overflowed = 0
    for i in prange(n_rows):
        row = x[i]
        mean = _sum(row) / channels  # μ, float64
        sum_d, sum_dd = _centred_sums(row, mean)
        shift = sum_d / channels  # c = mean(x − μ): the rounding of μ, removed below
        var = sum_dd / channels - shift * shift  # v = mean((x − μ − c)²)
        if _statistic_overflowed(var, row, dtype_max):
            n_overflowed += 1
        inv_std = 1.0 / np.sqrt(var + eps)  # 1/σ, float64
        rstd[i] = inv_std
        xhat_row = xhat[i]
        y_row = y[i]
        for j in range(channels):
            xhat_row[j] = ((row[j] - mean) - shift) * inv_std
        for j in range(channels):
            y_row[j] = xhat_row[j] * weight[j] + bias[j]  # in x's dtype, as the functional
    return n_overflowed


@njit(cache=True, parallel=True)
def _layernorm_backward_kernel(dy, xhat, rstd, weight, with_weight, with_bias,
                               n_chunks, dx, dweight_parts, dbias_parts):
    """dy, xhat, dx: (N, C); rstd: (N,); weight: (C,) (ones when absent);
    dweight_parts, dbias_parts: (n_chunks, C) float64, zeroed, one row per chunk ((1, C) and
    untouched when that gradient is not wanted)."""
    n_rows, channels = dy.shape
    for chunk in prange(n_chunks):
        for i in range(chunk * n_rows // n_chunks, (chunk + 1) * n_rows // n_chunks):
            dy_row = dy[i]
            xhat_row = xhat[i]
            dx_row = dx[i]
            sum_g, sum_gx = _gradient_sums(dy_row, weight, xhat_row)
            mean_g = sum_g / channels
            mean_gx = sum_gx / channels
            inv_std = np.float64(rstd[i])
            # dx = (1/σ) (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)), g = dy ⊙ w
            for j in range(channels):
                g = dy_row[j] * weight[j]
                dx_row[j] = inv_std * ((g - mean_g) - xhat_row[j] * mean_gx)
            if with_weight:  # this chunk's own row of the partial sums: no other writer
                dweight_part = dweight_parts[chunk]
                for j in range(channels):
                    dweight_part[j] += np.float64(dy_row[j]) * xhat_row[j]
            if with_bias:
                dbias_part = dbias_parts[chunk]
                for j in range(channels):
                    dbias_part[j] += dy_row[j]


@njit(cache=True, parallel=True)
def _rmsnorm_forward_kernel(x, weight, eps, dtype_max, y, xhat, rstd):
    """x, y, xhat: (N, C); weight: (C,) (ones when absent); rstd: (N,).
    Returns the number of rows whose mean square overflowed."""
    n_rows, channels = x.shape
    n_overflowed = 0
    for i in prange(n_rows):
        row = x[i]
        mean_square = _sum_of_squares(row) / channels  # mean(x²), float64
        if _statistic_overflowed(mean_square, row, dtype_max):
            n_overflowed += 1
        inv_rms = 1.0 / np.sqrt(mean_square + eps)  # 1/r, float64
        rstd[i] = inv_rms
        xhat_row = xhat[i]
        y_row = y[i]
        for j in range(channels):
            xhat_row[j] = row[j] * inv_rms
        for j in range(channels):
            y_row[j] = xhat_row[j] * weight[j]
    return n_overflowed


@njit(cache=True, parallel=True)
def _rmsnorm_backward_kernel(dy, xhat, rstd, weight, with_weight, n_chunks, dx, dweight_parts):
    """dy, xhat, dx: (N, C); rstd: (N,); weight: (C,) (ones when absent);
    dweight_parts: (n_chunks, C) float64, zeroed."""
    n_rows, channels = dy.shape
    for chunk in prange(n_chunks):
        for i in range(chunk * n_rows // n_chunks, (chunk + 1) * n_rows // n_chunks):
            dy_row = dy[i]
            xhat_row = xhat[i]
            dx_row = dx[i]
            _, sum_gx = _gradient_sums(dy_row, weight, xhat_row)
            mean_gx = sum_gx / channels
            inv_rms = np.float64(rstd[i])
            # dx = (1/r) (g − x̂ ⊙ mean(g ⊙ x̂)), g = dy ⊙ w
            for j in range(channels):
                g = dy_row[j] * weight[j]
                dx_row[j] = inv_rms * (g - xhat_row[j] * mean_gx)
            if with_weight:  # this chunk's own row of the partial sums: no other writer
                dweight_part = dweight_parts[chunk]
                for j in range(channels):
                    dweight_part[j] += np.float64(dy_row[j]) * xhat_row[j]


# ---- O(1) checks and the public pairs ----------------------------------------------------

def _check_input(x) -> np.ndarray:
    """Type, dtype, ndim and C ≥ 1 (no isfinite pass); returns x C-contiguous."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"x must be a floating-point array (float32 or float64), got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension(s), got shape {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have at least one channel (x.shape[-1] >= 1), got {x.shape}")
    return np.ascontiguousarray(x)


def _check_param(param, name: str, x: np.ndarray, default: float) -> np.ndarray:
    """weight / bias: (C,) in x's dtype, C-contiguous; None becomes ones / zeros (×1 and +0
    are exact, so the kernel has one code path)."""
    channels = x.shape[-1]
    if param is None:
        return np.full(channels, default, dtype=x.dtype)
    if not isinstance(param, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(param).__name__}")
    check_shape(param, (channels,), name, "(C,) with C = x.shape[-1]")
    if param.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {param.dtype} but x has dtype {x.dtype}; "
                         "all floating-point inputs of one call must share one dtype")
    return np.ascontiguousarray(param)


def _check_out(out, name: str, like: np.ndarray, inputs: dict) -> np.ndarray:
    """A caller's output buffer: like's shape and dtype, C-contiguous, sharing no memory
    with any input (the kernel reads a row after writing parts of it)."""
    if out is None:
        return np.empty_like(like)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    check_shape(out, like.shape, name, "(the shape of the result)")
    if out.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {out.dtype} but the result has dtype {like.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray), got strides "
                         f"{out.strides} for shape {out.shape}")
    for input_name, array in inputs.items():
        if array is not None and np.may_share_memory(out, array):
            raise ValueError(f"{name} shares memory with {input_name}; pass a separate buffer")
    return out


def _check_dy(dy, xhat: np.ndarray) -> np.ndarray:
    if not isinstance(dy, np.ndarray):
        raise ValueError(f"dy must be a numpy.ndarray, got {type(dy).__name__}")
    check_shape(dy, xhat.shape, "dy", "(the shape of the forward output)")
    if dy.dtype != xhat.dtype:
        raise ValueError(f"dy has dtype {dy.dtype} but the forward output has dtype "
                         f"{xhat.dtype}; pass the gradient in the forward's dtype")
    return np.ascontiguousarray(dy)


def _raise_overflow(n_rows: int, x: np.ndarray, where: str) -> None:
    """NonFiniteError: n_rows rows of x had a statistic that overflowed. check_no_overflow
    words it as the functional does (dtype, row count, largest |x|, advice); it is given the
    count as that many non-finite entries."""
    check_no_overflow(np.full(n_rows, np.inf), x, where)
    raise AssertionError("unreachable")


def layernorm_forward(x: np.ndarray, weight: Optional[np.ndarray] = None,
                      bias: Optional[np.ndarray] = None, eps: float = 1e-5, *,
                      out: Optional[np.ndarray] = None):
    """``y = (x − μ) / √(v + eps) ⊙ weight + bias`` over the last axis (fused kernel).

    x: (..., C), weight: (C,) or None, bias: (C,) or None  →  (y (..., C), LayerNormCache).
    out: optional (..., C) buffer for y, returned. See
    :func:`npformer.functional.layernorm.layernorm_forward` for the maths.
    """
    x = _check_input(x)
    weight_or_ones = _check_param(weight, "weight", x, 1.0)
    bias_or_zeros = _check_param(bias, "bias", x, 0.0)
    eps = check_positive(eps, "eps")
    y = _check_out(out, "out", x, {"x": x, "weight": weight, "bias": bias})
    channels = x.shape[-1]
    xhat = np.empty_like(x)  # (..., C)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)  # (..., 1)
    n_overflowed = _layernorm_forward_kernel(
        x.reshape(-1, channels), weight_or_ones, bias_or_zeros, eps,
        float(np.finfo(x.dtype).max), y.reshape(-1, channels), xhat.reshape(-1, channels),
        rstd.reshape(-1))
    if n_overflowed:
        _raise_overflow(n_overflowed, x, "layernorm: the variance of x")
    cache_weight = None if weight is None else weight_or_ones
    return y, LayerNormCache(xhat, rstd, cache_weight, bias is not None)


def _n_chunks(n_rows: int) -> int:
    return max(1, min(n_rows, _MAX_CHUNKS))


def layernorm_backward(dy: np.ndarray, cache: LayerNormCache, *,
                       dx_out: Optional[np.ndarray] = None):
    """Returns ``(dx, dweight, dbias)``; dweight / dbias are None when absent in the forward.
    dx_out: optional buffer for dx, returned as dx."""
    xhat, rstd, weight, has_bias = cache
    xhat = np.ascontiguousarray(xhat)
    channels = xhat.shape[-1]
    dy = _check_dy(dy, xhat)
    dx = _check_out(dx_out, "dx_out", xhat, {"dy": dy, "the cached xhat": xhat})
    weight_or_ones = _check_param(weight, "the cached weight", xhat, 1.0)
    n_rows = dy.size // channels
    n_chunks = _n_chunks(n_rows)
    with_weight = weight is not None
    dweight_parts = np.zeros((n_chunks if with_weight else 1, channels))  # float64
    dbias_parts = np.zeros((n_chunks if has_bias else 1, channels))  # float64
    _layernorm_backward_kernel(
        dy.reshape(-1, channels), xhat.reshape(-1, channels),
        np.ascontiguousarray(rstd).reshape(-1), weight_or_ones, with_weight, bool(has_bias),
        n_chunks, dx.reshape(-1, channels), dweight_parts, dbias_parts)
    dweight = dweight_parts.sum(axis=0).astype(xhat.dtype) if with_weight else None
    dbias = dbias_parts.sum(axis=0).astype(xhat.dtype) if has_bias else None
    return dx, dweight, dbias


def rmsnorm_forward(x: np.ndarray, weight: Optional[np.ndarray] = None, eps: float = 1e-6,
                    unit_offset: bool = False, *, out: Optional[np.ndarray] = None):
    """``y = x / √(mean(x²) + eps) ⊙ weight`` over the last axis (fused kernel);
    ``unit_offset=True``: ``⊙ (1 + weight)`` (Gemma), the scale formed once in the wrapper.

    x: (..., C), weight: (C,) or None  →  (y (..., C), RMSNormCache). out: optional buffer
    for y, returned. See :func:`npformer.functional.rmsnorm.rmsnorm_forward` for the maths.
    """
    x = _check_input(x)
    _check_param(weight, "weight", x, 1.0)
    y = _check_out(out, "out", x, {"x": x, "weight": weight})
    weight = unit_offset_scale(weight, unit_offset)  # s = w or 1 + w    (C,)
    weight_or_ones = _check_param(weight, "weight", x, 1.0)
    eps = check_positive(eps, "eps")
    channels = x.shape[-1]
    xhat = np.empty_like(x)  # (..., C)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)  # (..., 1)
    n_overflowed = _rmsnorm_forward_kernel(
        x.reshape(-1, channels), weight_or_ones, eps, float(np.finfo(x.dtype).max),
        y.reshape(-1, channels), xhat.reshape(-1, channels), rstd.reshape(-1))
    if n_overflowed:
        _raise_overflow(n_overflowed, x, "rmsnorm: the mean of x²")
    cache_weight = None if weight is None else weight_or_ones
    return y, RMSNormCache(xhat, rstd, cache_weight)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache, *,
                     dx_out: Optional[np.ndarray] = None):
    """Returns ``(dx, dweight)``; dweight is None when the forward had no weight.
    dx_out: optional buffer for dx, returned as dx."""
    xhat, rstd, weight = cache
    xhat = np.ascontiguousarray(xhat)
    channels = xhat.shape[-1]
    dy = _check_dy(dy, xhat)
    dx = _check_out(dx_out, "dx_out", xhat, {"dy": dy, "the cached xhat": xhat})
    weight_or_ones = _check_param(weight, "the cached weight", xhat, 1.0)
    n_rows = dy.size // channels
    n_chunks = _n_chunks(n_rows)
    with_weight = weight is not None
    dweight_parts = np.zeros((n_chunks if with_weight else 1, channels))  # float64
    _rmsnorm_backward_kernel(
        dy.reshape(-1, channels), xhat.reshape(-1, channels),
        np.ascontiguousarray(rstd).reshape(-1), weight_or_ones, with_weight, n_chunks,
        dx.reshape(-1, channels), dweight_parts)
    dweight = dweight_parts.sum(axis=0).astype(xhat.dtype) if with_weight else None
    return dx, dweight
