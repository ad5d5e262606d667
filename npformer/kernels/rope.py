"""Rotary position embedding (RoPE) as one numba pass: the fast twin of functional/rope.py.

    y, cache = rope_forward(x, position_ids, theta=..., rotary_dim=..., layout=..., scaling=...)
    dx = rope_backward(dy, cache)

Same arguments, results and cache type (:class:`npformer.functional.rope.RopeCache`) as the
functional pair, so a cache from either forward feeds either backward. The maths and its
derivation (rotate each channel pair by m·θ_i; the backward rotates by −m·θ_i) are in the
readable twin; this file is that computation arranged for speed.

What is fused, and why
----------------------
The functional forward makes ``x.copy()``, two strided gathers of the pair halves, four
products and two sums as separate temporaries, then two strided scatters: about ten passes
over the (B, H, T, D) tensor. Here each (b, head) item rotates its T rows in one pass (read
x once, write y once), the pass-through channels beyond rotary_dim copied in the same loop,
items split across threads with ``prange``. No per-call ``isfinite`` pass: the model
validates its inputs once per step. A rotation keeps each pair's length, so a component can
exceed the dtype's range only when |a| or |b| is within √2 of it; the loop flags any
non-finite output (one compare per element) and :class:`NonFiniteError` is raised when the
flagged rows' input was finite (an input NaN or inf simply propagates, as the trainer
catches a NaN loss).

Layouts of x. nn/attention.py passes q and k as ``x.reshape(B, T, H, D).transpose(0, 2, 1,
3)``: a (B, H, T, D) view of a C-contiguous (B, T, H, D) buffer. Both that "heads-inner"
view and a C-contiguous (B, H, T, D) array are read in place (the kernel indexes the
buffer's own axis order, so every row of D channels is contiguous and the loops vectorise);
any other strides are copied to C order first (one extra pass). The output is C-contiguous
(B, H, T, D) like the functional's, or written into ``out=`` of either layout — ``out=x``
rotates in place, and ``out`` laid out heads-inner makes the backward's dx ready for the
head merge ``dx.transpose(0, 2, 1, 3).reshape(B, T, H·D)`` without a copy.

The cos/sin tables come from functional ``rope_angles`` (float64 angles, times the scaled
RoPE's attention factor t, cast to x's dtype), kept in a small cache keyed on the positions'
bytes, shape and dtype, rotary_dim, theta, the scaling (:class:`RopeScaling`; for dynamic
also L = max(position) + 1, which sets its base) and the dtype, so the q and k calls of
every layer of a step compute them once. The cached arrays are read-only (they are shared
between caches). The scaling changes only the tables: the kernel rotates by whatever
t·cos, t·sin it is given, and the backward by t·cos, −t·sin (dx = t·Rᵀ dy).

Measured (Intel Xeon, 2 cores shared with other jobs, float32, ms, minimum of 40
interleaved rounds; the forward reads attention's heads-inner view, the backward a
C-contiguous dy; medians were 1.1-4x the minima under the load, the parallel kernel the
more affected):

    (B, H, T, D)       layout        forward: functional  kernel   backward: functional  kernel
    (16, 4, 128, 32)   half                   1.38        0.28               1.07        0.18
    (16, 4, 128, 32)   interleaved            1.11        0.24               0.72        0.17
    (8, 6, 256, 64)    half                   4.33        0.56               3.03        0.42
    (8, 6, 256, 64)    interleaved            3.47        0.60               2.54        0.42
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
from numba import njit, prange

from .._validate import NonFiniteError
from ..functional.rope import RopeCache, RopeScaling, check_rope_options, rope_angles
from ._buffers import empty_apart

__all__ = ["rope_forward", "rope_backward", "RopeCache", "RopeScaling"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TABLE_CACHE_SIZE = 32  # (positions, rotary_dim, theta, scaling, L, dtype) entries kept
_tables: "OrderedDict[tuple, tuple]" = OrderedDict()


# ---- the kernel ---------------------------------------------------------------------------

@njit(inline="always")
def _rotate_row_half(xr, yr, c, s, half):
    """Pairs (i, i + rd/2), GPT-NeoX / Llama: a' = a cos − b sin, b' = b cos + a sin.
    Returns whether an output is inf or NaN (inf − inf and NaN − NaN are NaN)."""
    bad = False
    for i in range(half):
        a = xr[i]
        b = xr[i + half]
        ya = a * c[i] - b * s[i]
        yb = b * c[i] + a * s[i]
        yr[i] = ya
        yr[i + half] = yb
        bad |= (ya - ya != 0) | (yb - yb != 0)
    return bad


@njit(inline="always")
def _rotate_row_interleaved(xr, yr, c, s, half):
    """Pairs (2i, 2i + 1), GPT-J: the same rotation on neighbouring channels."""
    bad = False
    for i in range(half):
        a = xr[2 * i]
        b = xr[2 * i + 1]
        ya = a * c[i] - b * s[i]
        yb = b * c[i] + a * s[i]
        yr[2 * i] = ya
        yr[2 * i + 1] = yb
        bad |= (ya - ya != 0) | (yb - yb != 0)
    return bad


@njit(parallel=True, cache=True)
def _rotate_kernel(x_rows, x_heads_inner, cos, sin, rotary_dim, interleaved, y_rows,
                   y_heads_inner, in_place, B, H, T, nonfinite):
    """y = R x, one (b, head) item per prange step, its T rows of D channels in turn.

    x_rows, y_rows: (B·H·T, D) C-contiguous rows of a (B, H, T, D) buffer, or of a
    (B, T, H, D) buffer when *_heads_inner (the row of (b, h, t) is then (b·T + t)·H + h);
    cos, sin: (Bp, T, rd/2), Bp = 1 (shared positions) or B; the backward passes −sin (the
    functional's ``-sin``: negation is exact). nonfinite: (B·H,) bool out.
    in_place: y is x; each row is rotated into a scratch row and copied back, because loads
    and stores through two arrays on one memory defeat LLVM's vectorisation (its run-time
    overlap check fails and the scalar loop runs: measured 2-3x slower).
    The in-place and the two-array loops are written apart: choosing the output row
    between the scratch row and y inside one loop measured ~2x slower (0.28 vs 0.15 ms at
    (16, 4, 128, 32) float32).
    """
    D = x_rows.shape[1]
    half = rotary_dim // 2
    shared_positions = cos.shape[0] == 1
    for item in prange(B * H):
        b = item // H
        h = item - b * H
        pb = 0 if shared_positions else b
        bad = False
        if in_place:  # x is y: rotate each row into a scratch row, copy the rotated part back
            scratch = np.empty(rotary_dim, dtype=y_rows.dtype)  # (rd,)
            for t in range(T):
                xr = x_rows[(b * T + t) * H + h if x_heads_inner else item * T + t]  # (D,)
                if interleaved:
                    bad |= _rotate_row_interleaved(xr, scratch, cos[pb, t], sin[pb, t], half)
                else:
                    bad |= _rotate_row_half(xr, scratch, cos[pb, t], sin[pb, t], half)
                for d in range(rotary_dim):  # the channels beyond rotary_dim stay
                    xr[d] = scratch[d]
        else:
            for t in range(T):
                xr = x_rows[(b * T + t) * H + h if x_heads_inner else item * T + t]  # (D,)
                yr = y_rows[(b * T + t) * H + h if y_heads_inner else item * T + t]  # (D,)
                if interleaved:
                    bad |= _rotate_row_interleaved(xr, yr, cos[pb, t], sin[pb, t], half)
                else:
                    bad |= _rotate_row_half(xr, yr, cos[pb, t], sin[pb, t], half)
                for d in range(rotary_dim, D):  # partial rotary: the rest passes through
                    yr[d] = xr[d]
        nonfinite[item] = bad


# ---- layouts ------------------------------------------------------------------------------

def _as_4d(x: np.ndarray) -> np.ndarray:
    """(..., T, D) as (B, H, T, D), a view where possible (ndim 2, 3, 4; C-order for > 4)."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]  # (B, 1, T, D): (B, T) positions index the first axis
    if x.ndim == 4:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])  # axes between B and T merged


def _buffer(x4: np.ndarray):
    """(buffer, heads_inner): the C-contiguous array the kernel indexes for this view."""
    if x4.flags.c_contiguous:
        return x4, False
    swapped = x4.transpose(0, 2, 1, 3)  # (B, T, H, D)
    if swapped.flags.c_contiguous:
        return swapped, True
    return None, False


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """The very same elements (same start, shape and strides): safe to rotate in place."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _check_out(out, x: np.ndarray, name: str) -> None:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray like {name}, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have {name}'s shape {x.shape} and dtype {x.dtype}, got "
                         f"shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if np.may_share_memory(out, x) and not _same_memory(out, x):
        raise ValueError(f"out overlaps {name} without being {name} itself: pass out={name} "
                         f"(in place) or a separate array")


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, sin_sign: float,
            rotary_dim: int, layout: str, out: Optional[np.ndarray], name: str) -> np.ndarray:
    """Run the kernel on x (..., T, D) with tables (..., T, rd/2); returns y (or out)."""
    if out is None:
        out = empty_apart(x.shape, x.dtype)  # C-contiguous, like the functional's copy
    else:
        _check_out(out, x, name)
    if x.size == 0:
        return out
    x4, y4 = _as_4d(x), _as_4d(out)
    x_buffer, x_heads_inner = _buffer(x4)
    if x_buffer is None:  # strides the kernel does not read in place: one copy to C order
        x_buffer, x_heads_inner = np.ascontiguousarray(x4), False
    y_buffer, y_heads_inner = _buffer(y4)
    if y_buffer is None or (out.ndim > 4 and not out.flags.c_contiguous):  # y4 not a view
        raise ValueError(
            "out must be C-contiguous, or the (B, H, T, D) view "
            "x.reshape(B, T, H, D).transpose(0, 2, 1, 3) of a C-contiguous buffer"
        )
    T, half = x.shape[-2], rotary_dim // 2
    cos3 = np.ascontiguousarray(cos).reshape(-1, T, half)  # (Bp, T, rd/2)
    sin3 = np.ascontiguousarray(sin).reshape(-1, T, half)
    nonfinite = np.zeros(x4.shape[0] * x4.shape[1], dtype=bool)  # (B·H,)
    if sin_sign < 0:
        sin3 = -sin3  # the backward: R(−mθ), the functional's -sin    (Bp, T, rd/2)
    B, H = x4.shape[:2]
    _rotate_kernel(x_buffer.reshape(-1, x.shape[-1]), x_heads_inner, cos3, sin3, rotary_dim,
                   layout == "interleaved", y_buffer.reshape(-1, x.shape[-1]), y_heads_inner,
                   _same_memory(x_buffer, y_buffer), B, H, T, nonfinite)
    if nonfinite.any():
        _raise_if_overflowed(nonfinite, x4, x_buffer, x_heads_inner, name)
    return out


def _raise_if_overflowed(nonfinite, x4, x_buffer, x_heads_inner, name):
    """A non-finite output from a finite input row is an overflow: NonFiniteError. Rows
    whose input already held NaN or inf propagate it (checked only for the flagged items)."""
    H = x4.shape[1]
    for item in np.flatnonzero(nonfinite):
        b, h = divmod(int(item), H)
        rows = x_buffer[b, :, h] if x_heads_inner else x_buffer[b, h]  # (T, D)
        if np.isfinite(rows).all():
            raise NonFiniteError(
                f"rope of finite {name} overflows {x4.dtype} (batch {b}, head {h}: largest "
                f"|{name}| {float(np.abs(rows).max()):.3g}; a rotated pair can reach √2 times "
                f"its largest component); scale the input down or compute in float64"
            )


# ---- the tables ---------------------------------------------------------------------------

def _angles(positions: np.ndarray, rotary_dim: int, theta: float, dtype: np.dtype,
            scaling: RopeScaling):
    """``rope_angles(positions, ...)``, computed once per distinct (positions, rotary_dim,
    theta, scaling, dtype): the key holds the positions' bytes, so equal content hits the
    cache (dynamic's L = max(position) + 1 follows from them; it is in the key as well, so
    the key states everything the table depends on)."""
    positions = np.ascontiguousarray(positions)
    seq_len = int(positions.max()) + 1 if scaling.rope_type == "dynamic" and positions.size else None
    key = (positions.tobytes(), positions.shape, positions.dtype.str, rotary_dim, theta,
           scaling, seq_len, dtype.str)
    # pop and re-insert: the most recently used entry goes last (each step is atomic under
    # the GIL; two threads racing at worst compute a table twice)
    tables = _tables.pop(key, None)
    if tables is None:
        cos, sin = rope_angles(positions, rotary_dim, theta, dtype, scaling)
        cos.flags.writeable = False  # shared by every cache that uses these positions
        sin.flags.writeable = False
        tables = (cos, sin)
    _tables[key] = tables
    while len(_tables) > _TABLE_CACHE_SIZE:
        try:
            _tables.popitem(last=False)  # the least recently used
        except KeyError:  # emptied by another thread meanwhile
            break
    return tables


# ---- public pair ----------------------------------------------------------------------------

def _check_input(x, name: str) -> np.ndarray:
    """O(1) checks only (type, dtype, ndim): no isfinite pass, see the module docstring."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array (float32 or float64), got "
                         f"dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimension(s), got shape {x.shape}")
    return x


def rope_forward(x: np.ndarray, position_ids: Optional[np.ndarray] = None, *,
                 theta: float = 10000.0, rotary_dim: Optional[int] = None,
                 layout: str = "half", scaling: Optional[RopeScaling] = None,
                 out: Optional[np.ndarray] = None):
    """The kernel twin of :func:`npformer.functional.rope.rope_forward`.

    x: (..., T, D), typically (B, H, T, D) queries or keys (C-contiguous or the heads-inner
    view attention makes); position_ids: None (0 .. T−1), (T,) or (B, T); rotary_dim: even,
    in [1, D], None → D; layout: "half" or "interleaved"; scaling: None or a
    :class:`RopeScaling` (as the functional's); out: None (a new C-contiguous
    array), x itself (in place) or a separate array of x's shape and dtype
    →  (y (..., T, D) in x's dtype, RopeCache).
    """
    x = _check_input(x, "x")
    positions, theta, rotary_dim, layout, scaling = check_rope_options(
        x.shape, position_ids, theta, rotary_dim, layout, scaling)  # (T,) or (B, 1, ..., 1, T)
    cos, sin = _angles(positions, rotary_dim, theta, x.dtype, scaling)  # t·cos, t·sin (..., T, rd/2)
    y = _rotate(x, cos, sin, 1.0, rotary_dim, layout, out, "x")  # y = t·R_m x
    return y, RopeCache(cos, sin, rotary_dim, layout, x.shape, x.dtype)


def rope_backward(dy: np.ndarray, cache: RopeCache, out: Optional[np.ndarray] = None
                  ) -> np.ndarray:
    """Returns ``dx = R_mᵀ dy`` (the kernel twin of the functional backward); ``out`` as in
    :func:`rope_forward` (``out=dy`` rotates the gradient in place)."""
    cos, sin, rotary_dim, layout, shape, dtype = cache
    dy = _check_input(dy, "dy")
    if dy.shape != tuple(shape):
        raise ValueError(f"dy must have shape {tuple(shape)} (the shape of the forward "
                         f"output), got {dy.shape}")
    if dy.dtype != dtype:
        raise ValueError(f"dy has dtype {dy.dtype} but the forward output has dtype {dtype}; "
                         "pass the gradient in the forward's dtype")
    # forward: y = t R(mθ) x, so dx = t R(mθ)ᵀ dy = t R(−mθ) dy (the tables carry t)
    return _rotate(dy, cos, sin, -1.0, rotary_dim, layout, out, "dy")
