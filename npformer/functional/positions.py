"""Absolute positions added to the input: sinusoidal (2017) and learned (GPT-1, GPT-2).

Attention is permutation-equivariant: shuffle the tokens and the outputs shuffle with them.
Word order must therefore be put in by hand. The first transformers added a vector that
depends only on the position to every token's embedding:

    y[..., t, :] = x[..., t, :] + PE[m_t, :]          x (..., T, C), PE (P, C)

where m_t is the position of token t: m_t = t unless ``position_ids`` say otherwise (for
example when a KV cache decodes token T + 1, or when packed documents restart their
positions at 0).

Sinusoidal table ("Attention Is All You Need", Vaswani et al. 2017, §3.5)
-------------------------------------------------------------------------
Channel pair i (channels 2i and 2i+1, i in [0, C/2)) is a sine/cosine of one frequency:

    ω_i = base^(−2i/C)                               base = 10000
    PE[m, 2i]   = sin(m ω_i)
    PE[m, 2i+1] = cos(m ω_i)

The wavelengths 2π/ω_i grow geometrically from 2π (i = 0) to nearly 2π · base. The table is
fixed, not learned, so it is defined for any position, including ones longer than any
training sequence (whether the model makes use of them is another matter).

Why sine and cosine: a fixed linear map expresses every relative offset. For one pair and
an offset k, the angle-sum identities sin(a + b) = sin a cos b + cos a sin b and
cos(a + b) = cos a cos b − sin a sin b give

    ⎡sin((m+k)ω)⎤   ⎡ cos kω   sin kω⎤ ⎡sin mω⎤
    ⎣cos((m+k)ω)⎦ = ⎣−sin kω   cos kω⎦ ⎣cos mω⎦

The 2 × 2 matrix is a rotation by −kω that depends on k and not on m. Stacking one such block
per pair gives PE[m + k] = M_k PE[m] with M_k the same for every m, which is what the paper
means by "PE_{pos+k} can be represented as a linear function of PE_pos": a layer can learn to
attend "k tokens back" with one linear map. RoPE (rope.py) uses the same rotations
multiplicatively on queries and keys instead of additively on the input.

This file keeps the paper's interleaved layout (sin in even channels, cos in odd); some code
(tensor2tensor's ``get_timing_signal_1d``, fairseq) concatenates [sin | cos] instead, which is
the same table with the channels permuted. The table is computed in float64 and cast to the
input's dtype, so float32 models get correctly rounded entries even at large positions.

Learned positions (GPT-1, GPT-2's ``wpe``)
-------------------------------------------
A trainable table W (P, C) replaces PE: y[..., t, :] = x[..., t, :] + W[m_t, :]. P is the
context length (1024 for GPT-2); a position ≥ P has no row and is refused.

Derivation
----------
Both are a sum, so the input's gradient passes through unchanged:

    ∂ℓ/∂x = dy                                       (dx = dy)

The sinusoidal table has no parameters. The learned table is a lookup, exactly like the
token embedding (embedding.py): with every leading index and t flattened into n,

    y[n, c] = x[n, c] + W[m_n, c]   →   ∂ℓ/∂W[j, c] = Σ_{n : m_n = j} dy[n, c]

Row j of dW sums dy over every batch element and every time step at position j: a
scatter-add. Summing over the batch is the usual "shared parameter" rule; repeated positions
within one row (packed documents, each restarting at 0) add up as well. So the learned pair is
written as x plus the embedding pair applied to the positions, and reuses its backward.

Position ids
------------
``position_ids`` is None (positions 0 .. T−1), an integer array (T,) shared by all rows, or
(B, T) with B = x.shape[0] (or 1), one row of positions per batch element, broadcast over
any axes between the batch axis and T (heads, for example).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import (
    FLOAT_DTYPES,
    check_float,
    check_grad,
    check_int,
    check_positive,
    check_same_dtype,
)
from .embedding import EmbeddingCache, embedding_backward, embedding_forward

# --------------------------------------------------------------------------------------
# Argument checks shared with rope.py
# --------------------------------------------------------------------------------------


def _check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def _check_int_positions(position_ids, name: str = "position_ids") -> np.ndarray:
    """An integer ndarray with no negative entry."""
    if not isinstance(position_ids, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy.ndarray of integers, got {type(position_ids).__name__}"
        )
    if not np.issubdtype(position_ids.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {position_ids.dtype}")
    if position_ids.size and position_ids.min() < 0:
        bad = position_ids[position_ids < 0]
        raise ValueError(f"{name} must be >= 0, got negative value(s) {bad[:5].tolist()}")
    return position_ids


def _check_position_ids(position_ids, x_shape: tuple, upper: Optional[int] = None,
                        upper_meaning: str = "") -> np.ndarray:
    """Validate the positions of x (..., T, C); return them ready to broadcast against (..., T).

    None → arange(T); (T,) stays (T,); (B, T) becomes (B, 1, ..., 1, T), so one row of
    positions serves every axis between the batch axis and T. With ``upper``, every position
    must be < upper (``upper_meaning`` says what upper is, for the error message).
    """
    T = x_shape[-2]
    if position_ids is None:
        if upper is not None and T > upper:
            raise ValueError(
                f"x has T = {T} positions (x.shape[-2]) but only {upper} are available "
                f"({upper_meaning}); positions must lie in [0, {upper - 1}]"
            )
        return np.arange(T)  # (T,)
    position_ids = _check_int_positions(position_ids)
    batch = f" or (B, T) with B = x.shape[0] = {x_shape[0]} (or 1)" if len(x_shape) >= 3 else ""
    expected = f"(T,) with T = x.shape[-2] = {T}{batch}"
    if position_ids.ndim not in (1, 2) or position_ids.shape[-1] != T:
        raise ValueError(f"position_ids must have shape {expected}, "
                         f"got shape {position_ids.shape}")
    if position_ids.ndim == 2:
        if len(x_shape) < 3:
            raise ValueError(
                f"position_ids of shape (B, T) = {position_ids.shape} need x with a batch axis "
                f"first (x.ndim >= 3), got x of shape {tuple(x_shape)}; pass (T,) positions"
            )
        if position_ids.shape[0] not in (1, x_shape[0]):
            raise ValueError(f"position_ids must have shape {expected}, "
                             f"got shape {position_ids.shape}")
    if upper is not None and position_ids.size and position_ids.max() >= upper:
        bad = position_ids[position_ids >= upper]
        raise ValueError(
            f"position_ids must lie in [0, {upper - 1}] ({upper_meaning}), "
            f"got out-of-range value(s) {bad[:5].tolist()}"
        )
    if position_ids.ndim == 2:  # (B, T) → (B, 1, ..., 1, T): broadcast over heads etc.
        position_ids = position_ids.reshape(
            (position_ids.shape[0],) + (1,) * (len(x_shape) - 3) + (T,)
        )
    return position_ids


# --------------------------------------------------------------------------------------
# Sinusoidal positions
# --------------------------------------------------------------------------------------


def _sinusoid(positions: np.ndarray, dim: int, base: float) -> np.ndarray:
    """PE[positions] in float64: (...) integer positions → (..., C) with C = dim."""
    omega = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # ω_i = base^(−2i/C) (C/2,)
    angles = positions.astype(np.float64)[..., None] * omega  # m ω_i    (..., C/2)
    pe = np.empty(positions.shape + (dim,), dtype=np.float64)  # (..., C)
    pe[..., 0::2] = np.sin(angles)  # PE[m, 2i]   = sin(m ω_i)
    pe[..., 1::2] = np.cos(angles)  # PE[m, 2i+1] = cos(m ω_i)
    return pe


def _check_even_dim(dim, name: str, meaning: str) -> int:
    dim = check_int(dim, name, 1)
    if dim % 2:
        raise ValueError(
            f"{name} must be even (sin/cos channel pairs), got {name} = {dim}{meaning}"
        )
    return dim


def _check_sinusoidal_table_inputs(num_positions, dim, base, dtype):
    """P >= 1, C = dim even, base > 0, dtype float32/float64; returned as (int, int, float,
    np.dtype)."""
    num_positions = check_int(num_positions, "num_positions", 1)
    dim = _check_even_dim(dim, "dim", "")
    base = check_positive(base, "base")
    return num_positions, dim, base, _check_float_dtype(dtype)


def sinusoidal_table(num_positions: int, dim: int, base: float = 10000.0,
                     dtype=np.float64) -> np.ndarray:
    """The 2017 paper's table PE (P, C): PE[m, 2i] = sin(m/base^(2i/C)), PE[m, 2i+1] = cos.

    Computed in float64 and cast to ``dtype`` (float32 or float64). C = dim must be even.
    """
    num_positions, dim, base, dtype = _check_sinusoidal_table_inputs(num_positions, dim, base,
                                                                      dtype)
    return _sinusoid(np.arange(num_positions), dim, base).astype(dtype)  # (P, C)


class SinusoidalCache(NamedTuple):
    shape: tuple  # x.shape (..., T, C)
    dtype: np.dtype  # x's dtype


def _check_sinusoidal_inputs(x, position_ids, base):
    """x (..., T, C) float with C even, base > 0, position_ids as :func:`_check_position_ids`.
    Returns ``(positions, base)``: positions ready to broadcast against (..., T)."""
    check_float(x, "x", min_ndim=2)
    _check_even_dim(x.shape[-1], "C", f" (x.shape[-1], x of shape {x.shape})")
    base = check_positive(base, "base")
    return _check_position_ids(position_ids, x.shape), base


def sinusoidal_forward(x: np.ndarray, position_ids: Optional[np.ndarray] = None,
                       base: float = 10000.0):
    """``y = x + PE[position_ids]`` with the fixed sinusoidal table (Transformer 2017).

    x: (..., T, C) with C even; position_ids: None (0 .. T−1), (T,) or (B, T) integers
    →  y: (..., T, C), x's dtype.
    """
    positions, base = _check_sinusoidal_inputs(x, position_ids, base)  # (T,) or (B, 1.., T)
    pe = _sinusoid(positions, x.shape[-1], base).astype(x.dtype)  # (T, C) or (B, 1.., T, C)
    y = x + pe  # (..., T, C)
    return y, SinusoidalCache(x.shape, x.dtype)


def sinusoidal_backward(dy: np.ndarray, cache: SinusoidalCache) -> np.ndarray:
    """Returns ``dx`` (= dy: the table is a constant)."""
    dy = check_grad(dy, cache.shape, cache.dtype)
    # forward: y = x + PE[m], so dx = dy
    return dy.copy()  # a copy: the caller may accumulate into dx in place


# --------------------------------------------------------------------------------------
# Learned positions
# --------------------------------------------------------------------------------------


class LearnedPositionsCache(NamedTuple):
    lookup: EmbeddingCache  # the table lookup at every row's position, ids (..., T)
    shape: tuple  # x.shape (..., T, C)
    dtype: np.dtype  # x's (and the table's) dtype


def _check_learned_positions_inputs(x, table, position_ids) -> np.ndarray:
    """x (..., T, C) and table (P, C) float in one dtype, position_ids in [0, P) as
    :func:`_check_position_ids`; returns the positions ready to broadcast against (..., T)."""
    check_float(x, "x", min_ndim=2)
    check_float(table, "table", min_ndim=2)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (P, C), got shape {table.shape}")
    check_same_dtype(x, "x", table=table)
    if table.shape[1] != x.shape[-1]:
        raise ValueError(
            f"table has C = {table.shape[1]} channels (table.shape[1]) but x has "
            f"{x.shape[-1]} (x.shape[-1]); table is (P, C)"
        )
    num_positions = table.shape[0]
    return _check_position_ids(
        position_ids, x.shape, upper=num_positions,
        upper_meaning=f"the table has P = {num_positions} positions, table.shape[0]",
    )


def learned_positions_forward(x: np.ndarray, table: np.ndarray,
                              position_ids: Optional[np.ndarray] = None):
    """``y = x + table[position_ids]`` with a trainable table (GPT-1, GPT-2's ``wpe``).

    x: (..., T, C); table: (P, C); position_ids: None (0 .. T−1), (T,) or (B, T) integers
    in [0, P)  →  y: (..., T, C), x's dtype.
    """
    positions = _check_learned_positions_inputs(x, table, position_ids)  # (T,) or (B, 1.., T)
    every_position = np.broadcast_to(positions, x.shape[:-1])  # (..., T) the position of each row
    position_vectors, lookup = embedding_forward(every_position, table)  # (..., T, C)
    y = x + position_vectors  # (..., T, C)
    return y, LearnedPositionsCache(lookup, x.shape, x.dtype)


def learned_positions_backward(dy: np.ndarray, cache: LearnedPositionsCache):
    """Returns ``(dx, dtable)``; dtable (P, C) is dy scatter-added into the positions' rows."""
    lookup, shape, dtype = cache
    dy = check_grad(dy, shape, dtype)
    # forward: y = x + W[m], so dx = dy
    dx = dy.copy()  # (..., T, C)
    # and dW[j] = Σ_{n: m_n = j} dy[n]: the embedding's scatter-add over batch and repeats
    dtable = embedding_backward(dy, lookup)  # (P, C)
    return dx, dtable
