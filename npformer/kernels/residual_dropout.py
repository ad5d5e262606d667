"""The residual add with dropout, ``y = x + dropout(b)``, as one numba pass; and dropout's
backward as one pass. The fast twin of functional/dropout.py plus the block's ``x + b``.

    y, cache = residual_dropout_forward(x, b, p, rng, training)   # y = x + drop(b)
    db = dropout_backward(dy, cache)                               # = functional's backward

The cache is functional dropout's :class:`DropoutCache` (the keep-mask, the scale, the
shape and dtype of b), so ``functional.dropout.dropout_backward`` accepts it, and this
file's ``dropout_backward`` accepts the functional's. The maths (inverted dropout, the
derivation of the backward) is in the readable twin.

The same masks, bit for bit
---------------------------
The functional forward draws ``mask = rng.random(b.shape) >= p``. The kernel makes that very
call (one float64 uniform per element, C order, the generator left in the same state), then
one parallel pass computes the mask, ``(b · mask) · scale`` and the add. The masks are
therefore bitwise the functional's for the same generator state, whatever the bit generator.

What the draw costs
-------------------
Measured at (2048, 128) float32 (Intel Xeon, 2 cores shared with other jobs, ms, minimum
of 40 interleaved rounds):

    p     forward: x + dropout(b)  kernel  kernel out=x   backward: functional  kernel
    0              0.44            0.20    0.18                     0.23        0.06
    0.1            1.23            0.98    0.97                     0.44        0.19
    rng.random((2048, 128)) alone: 0.65

The draw dominates: ~2/3 of the kernel's time with p = 0.1; the kernel saves the rest (the
comparison pass, the ``b * mask * scale`` temporaries and the separate add).
Drawing in-kernel instead (numba supports ``rng.random()`` inside ``@njit``: the same
``next_double`` through the bit generator's C function pointer, bitwise the same uniforms)
was slower than numpy's fill (~3.0 vs ~2.6 ns per element here) and sequential, so the fused
sequential draw + add ran no faster than the functional. A cheaper draw that keeps the masks
would need the same 64-bit step per element in C order; fewer bits per element (8 bits
against p·256), several streams or another generator would all change the masks.
One equivalent split exists for PCG64 (one 64-bit step per double): a copy of the state
advanced by n/2 (``advance``) draws the second half on another thread, the same uniforms,
and the caller's state set to where the copy ends (keeping its buffered 32-bit word). Tried:
bitwise the same, but no faster on this 2-core machine shared with other jobs (0.72 vs 0.62
ms); not used.

Overflow. No per-call ``isfinite`` pass (the model validates once per step). ``x + b/(1−p)``
can overflow from finite inputs (values near the dtype's largest, or p near 1); the loop
flags non-finite outputs (one compare per element) and a flagged result whose inputs were
finite raises :class:`NonFiniteError`; NaN or inf inputs propagate.

``out=``: any of the forwards and the backward may write into a given C-contiguous array of
the result's shape and dtype, including x itself (an in-place residual add) or dy.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .._validate import NonFiniteError, check_probability
from ..functional.dropout import DropoutCache
from ._buffers import empty_apart

__all__ = ["residual_dropout_forward", "dropout_backward", "DropoutCache"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_CHUNK = 16384  # elements per parallel work item (64 kB of float32)


# ---- kernels (flat C-contiguous arrays) -------------------------------------------------
# Each parallel kernel hands chunk slices to an inlined loop over ``range(chunk.size)``:
# indexing from 0 lets LLVM drop numba's negative-index wraparound and vectorise (a loop
# over range(c·_CHUNK, ...) on the whole arrays measured ~4x slower). With out=x (or dy)
# an "_in_place" loop reads and writes ONE array: the same memory passed as two arrays
# defeats the vectoriser (its run-time overlap check fails): measured ~10x slower.
# ``bad |= y − y != 0`` flags inf and NaN (inf − inf is NaN) and still vectorises.

@njit(inline="always")
def _dropout_add_chunk(x, b, uniform, p, scale, zero, y, mask):
    bad = False
    for i in range(x.size):
        keep = uniform[i] >= p  # the functional's mask = rng.random(shape) >= p
        mask[i] = keep
        yi = x[i] + (b[i] * (zero + keep)) * scale
        y[i] = yi
        bad |= yi - yi != 0
    return bad


@njit(inline="always")
def _dropout_add_chunk_in_place(x, b, uniform, p, scale, zero, mask):
    bad = False
    for i in range(x.size):
        keep = uniform[i] >= p
        mask[i] = keep
        yi = x[i] + (b[i] * (zero + keep)) * scale
        x[i] = yi
        bad |= yi - yi != 0
    return bad


@njit(parallel=True, cache=True)
def _residual_dropout_kernel(x, b, uniform, p, scale, zero, y, in_place, mask, nonfinite):
    """m_i = [u_i >= p], y_i = x_i + (b_i · m_i) · scale, chunks in parallel (y is x when
    in_place); nonfinite[c]: chunk c has a non-finite y. ``(b·m)·scale`` is the
    functional's ``b * mask * scale``: numpy casts the bool mask to 1.0 / 0.0 of b's dtype,
    so does ``zero + m`` (b·0 = ±0, or NaN for b = ±inf: the same bits, branch-free)."""
    n = x.size
    for c in prange(nonfinite.size):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        if in_place:
            nonfinite[c] = _dropout_add_chunk_in_place(
                x[lo:hi], b[lo:hi], uniform[lo:hi], p, scale, zero, mask[lo:hi])
        else:
            nonfinite[c] = _dropout_add_chunk(
                x[lo:hi], b[lo:hi], uniform[lo:hi], p, scale, zero, y[lo:hi], mask[lo:hi])


@njit(inline="always")
def _add_chunk(x, b, y):
    bad = False
    for i in range(x.size):
        yi = x[i] + b[i]
        y[i] = yi
        bad |= yi - yi != 0
    return bad


@njit(inline="always")
def _add_chunk_in_place(x, b):
    bad = False
    for i in range(x.size):
        yi = x[i] + b[i]
        x[i] = yi
        bad |= yi - yi != 0
    return bad


@njit(parallel=True, cache=True)
def _residual_add_kernel(x, b, y, in_place, nonfinite):
    """y = x + b (no dropout), chunks in parallel (y is x when in_place)."""
    n = x.size
    for c in prange(nonfinite.size):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        if in_place:
            nonfinite[c] = _add_chunk_in_place(x[lo:hi], b[lo:hi])
        else:
            nonfinite[c] = _add_chunk(x[lo:hi], b[lo:hi], y[lo:hi])


@njit(inline="always")
def _masked_scale_chunk(dy, mask, scale, zero, dx):
    bad = False
    for i in range(dy.size):
        di = (dy[i] * (zero + mask[i])) * scale
        dx[i] = di
        bad |= di - di != 0
    return bad


@njit(inline="always")
def _masked_scale_chunk_in_place(dy, mask, scale, zero):
    bad = False
    for i in range(dy.size):
        di = (dy[i] * (zero + mask[i])) * scale
        dy[i] = di
        bad |= di - di != 0
    return bad


@njit(parallel=True, cache=True)
def _masked_scale_kernel(dy, mask, scale, zero, dx, in_place, nonfinite):
    """dx = (dy · m) · scale, chunks in parallel (the functional's ``dy * mask * scale``;
    dx is dy when in_place)."""
    n = dy.size
    for c in prange(nonfinite.size):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        if in_place:
            nonfinite[c] = _masked_scale_chunk_in_place(dy[lo:hi], mask[lo:hi], scale, zero)
        else:
            nonfinite[c] = _masked_scale_chunk(dy[lo:hi], mask[lo:hi], scale, zero, dx[lo:hi])


# ---- helpers ----------------------------------------------------------------------------

def _check_array(a, name: str) -> np.ndarray:
    """O(1) checks only (type, dtype): no isfinite pass, see the module docstring."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array (float32 or float64), got "
                         f"dtype {a.dtype}")
    return a


def _flat(a: np.ndarray) -> np.ndarray:
    """A flat C-order view (a copy for non-contiguous input: the kernels index flat)."""
    return np.ascontiguousarray(a).reshape(-1)


def _output(out, like: np.ndarray, name: str, inputs: dict) -> np.ndarray:
    """``out`` checked (C-contiguous, like's shape and dtype, writeable; it may be one of the
    inputs exactly but not overlap one partially), or a new array."""
    if out is None:
        return empty_apart(like.shape, like.dtype)  # see kernels/_buffers.py
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"out must have {name}'s shape {like.shape} and dtype {like.dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous array")
    for input_name, a in inputs.items():
        if np.may_share_memory(out, a) and not _same_memory(out, a):
            raise ValueError(f"out overlaps {input_name} without being {input_name} itself: "
                             f"pass out={input_name} (in place) or a separate array")
    return out


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """The very same elements (same start, shape and strides): safe to write in place."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _raise_if_overflowed(what: str, inputs: dict, dtype) -> None:
    """A non-finite result from finite inputs overflowed: NonFiniteError. Called only when
    the kernel flagged a non-finite result (then one isfinite pass over the inputs)."""
    if all(np.isfinite(a).all() for a in inputs.values()):
        largest = max(float(np.abs(a).max()) for a in inputs.values())
        raise NonFiniteError(
            f"{what} of finite inputs overflows {dtype} (largest |input| {largest:.3g}); "
            f"scale the input down or compute in float64"
        )


# ---- public functions ---------------------------------------------------------------------

def residual_dropout_forward(x: np.ndarray, b: np.ndarray, p: float,
                             rng: np.random.Generator, training: bool = True, *,
                             out: Optional[np.ndarray] = None):
    """``y = x + dropout(b)``: the block's residual add after its branch's dropout.

    x, b: (...) of one shape and dtype (x the residual stream, b the branch output);
    p in [0, 1]; rng: ``numpy.random.Generator``; training=False or p = 0 adds b unchanged
    and draws nothing; out: None, x (in place), b, or a separate C-contiguous array
    →  (y (...), DropoutCache of the dropout of b — the functional's, mask bitwise equal for
    the same generator state).
    """
    x = _check_array(x, "x")
    b = _check_array(b, "b")
    if b.shape != x.shape or b.dtype != x.dtype:
        raise ValueError(f"b (the branch output) must have x's shape {x.shape} and dtype "
                         f"{x.dtype}, got shape {b.shape} and dtype {b.dtype}")
    p = check_probability(p, "p", allow_one=True)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    if not isinstance(training, (bool, np.bool_)):
        raise ValueError(f"training must be True or False, got {type(training).__name__} "
                         f"{training!r}")
    y = _output(out, x, "x", {"x": x, "b": b})
    x_flat, b_flat, y_flat = _flat(x), _flat(b), y.reshape(-1)
    in_place = y is x or _same_memory(y, x)
    dtype = x.dtype.type
    if not training or p == 0.0:  # y = x + b; the dropout is the identity
        nonfinite = np.zeros(-(-x.size // _CHUNK), dtype=bool)
        _residual_add_kernel(x_flat, b_flat, y_flat, in_place, nonfinite)
        if nonfinite.any():
            _raise_if_overflowed("x + b", {"x": x, "b": b}, x.dtype)
        return y, DropoutCache(None, 1.0, b.shape, b.dtype)
    mask = np.empty(b.shape, dtype=bool)
    if p == 1.0:  # everything dropped, nothing drawn (as in the functional); rare: NumPy
        mask[...] = False
        scale = 0.0
        # y = x + (b·0)·0: x, or NaN where b is ±inf (the functional's arithmetic); numpy's
        # add handles out=x. Cannot overflow: x + (±0) = x.
        np.add(x, (b * mask) * scale, out=y)
        return y, DropoutCache(mask, scale, b.shape, b.dtype)
    scale = 1.0 / (1.0 - p)  # a Python float, as in the functional (cast to x's dtype)
    uniform = rng.random(b.shape)  # the functional's very call: same draws, same state
    nonfinite = np.zeros(-(-x.size // _CHUNK), dtype=bool)
    _residual_dropout_kernel(x_flat, b_flat, uniform.reshape(-1), p, dtype(scale),
                             dtype(0.0), y_flat, in_place, mask.reshape(-1), nonfinite)
    if nonfinite.any():
        _raise_if_overflowed(f"x + dropout(b) (scale 1/(1 − p) = {scale:.6g})",
                             {"x": x, "b": b}, x.dtype)
    return y, DropoutCache(mask, scale, b.shape, b.dtype)


def dropout_backward(dy: np.ndarray, cache: DropoutCache, out: Optional[np.ndarray] = None
                     ) -> np.ndarray:
    """Returns ``dx`` (...) = dy ⊙ mask · scale, one parallel pass (the functional's
    ``dropout_backward``; same cache). out: None, dy (in place) or a separate array."""
    mask, scale, shape, dtype = cache
    dy = _check_array(dy, "dy")
    if dy.shape != tuple(shape):
        raise ValueError(f"dy must have shape {tuple(shape)} (the shape of the forward "
                         f"output), got {dy.shape}")
    if dy.dtype != dtype:
        raise ValueError(f"dy has dtype {dy.dtype} but the forward output has dtype {dtype}; "
                         "pass the gradient in the forward's dtype")
    dx = _output(out, dy, "dy", {"dy": dy})
    if mask is None:  # forward: y = x, so dx = dy
        if dx is not dy:
            np.copyto(dx, dy)
        return dx
    dtype = dy.dtype.type
    nonfinite = np.zeros(-(-dy.size // _CHUNK), dtype=bool)
    # forward: y = x ⊙ m / (1 − p), so dx = dy ⊙ m / (1 − p)
    _masked_scale_kernel(_flat(dy), _flat(mask), dtype(scale), dtype(0.0), dx.reshape(-1),
                         dx is dy or _same_memory(dx, dy), nonfinite)
    if nonfinite.any():
        _raise_if_overflowed(f"dropout's backward (scale 1/(1 − p) = {scale:.6g})",
                             {"dy": dy}, dy.dtype)
    return dx
