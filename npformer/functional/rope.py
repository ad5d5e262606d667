"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer"): rotate q and k by position.

Instead of adding a position vector to the input (positions.py), RoPE rotates every query
and key just before the attention scores. The head's first ``rotary_dim`` channels are
split into rotary_dim/2 pairs (a_i, b_i); the pair i of the token at position m is rotated
by the angle m·θ_i:

    θ_i = theta^(−2i/rotary_dim),   i in [0, rotary_dim/2)          theta = 10000

    ⎡a'⎤   ⎡cos mθ_i  −sin mθ_i⎤ ⎡a⎤        a' = a cos mθ_i − b sin mθ_i
    ⎣b'⎦ = ⎣sin mθ_i   cos mθ_i⎦ ⎣b⎦        b' = b cos mθ_i + a sin mθ_i

written y = R_m x, with R_m block-diagonal (one 2 × 2 rotation per pair, the identity on the
channels beyond rotary_dim). The frequencies are those of the 2017 sinusoidal table.

Why the scores then depend only on the offset
---------------------------------------------
Rotations compose by adding angles and are orthogonal: R(α)ᵀ = R(−α), R(α) R(β) = R(α + β).
For a query at position m and a key at position n,

    ⟨R_m q, R_n k⟩ = qᵀ R_mᵀ R_n k = qᵀ R_{n−m} k

which depends on m and n only through n − m: the attention score sees relative positions,
though each token is rotated by its absolute position alone (so a KV cache can store rotated
keys). Values are not rotated. The channels beyond rotary_dim contribute qᵀk unchanged.

Two layouts of the pairs (the same maths; checkpoints are NOT interchangeable)
------------------------------------------------------------------------------
- ``layout="half"``: channel i is paired with i + rotary_dim/2 (the two halves of the
  rotary part). GPT-NeoX, Llama in Hugging Face (``rotate_half``), Mistral, Qwen, Gemma.
  (Meta's original Llama code pairs neighbours via complex numbers; Hugging Face's
  conversion script permutes the rows of W_q and W_k so that the half layout applies.)
- ``layout="interleaved"``: channel 2i is paired with 2i + 1 (neighbours). GPT-J
  (``rotate_every_two``), Cohere, and RoFormer as written in the paper.

Partial rotary: only the first rotary_dim channels of each head are rotated, the rest pass
through unchanged. GPT-J rotates rotary_dim = 64 of its 256 head channels; GPT-NeoX and
Pythia set rotary_pct = 0.25 (Hugging Face: ``partial_rotary_factor``), rotary_dim =
int(D · rotary_pct). The pairs are formed inside the rotary part in either layout.

theta sets the longest wavelength (nearly 2π · theta): 10000 in RoFormer, GPT-J, GPT-NeoX and
Llama 1/2; Llama 3 raises it to 500000 for longer contexts. (Llama 3.1's extra frequency
rescaling, ``rope_type="llama3"``, is not implemented here.) The angles m·θ_i are computed
in float64 and only cos/sin are cast to the input's dtype: in float32 the product m·θ_i
would lose ~m·6e-8 radians (Hugging Face computes it in float32).

Derivation of the backward
--------------------------
y = R_m x is linear in x, so dx = R_mᵀ dy. R_m is orthogonal (a rotation), so
R_mᵀ = R_m⁻¹ = R_{−m}: the backward rotates dy back by −m·θ_i. Per pair, with
da' = ∂L/∂a' and db' = ∂L/∂b',

    ⎡da⎤   ⎡ cos mθ_i  sin mθ_i⎤ ⎡da'⎤      da = da' cos mθ_i + db' sin mθ_i
    ⎣db⎦ = ⎣−sin mθ_i  cos mθ_i⎦ ⎣db'⎦      db = db' cos mθ_i − da' sin mθ_i

i.e. the forward formula with sin → −sin. The pass-through channels have dx = dy. The
positions are integers: no gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_float, check_grad, check_positive
from .positions import _check_float_dtype, _check_int_positions, _check_position_ids

LAYOUTS = ("half", "interleaved")


def check_rotary_dim(rotary_dim, upper: Optional[int] = None, meaning: str = "") -> int:
    """An even integer in [1, upper] (so at least 2)."""
    valid = (f"an even integer with 1 <= rotary_dim <= {upper}{meaning}" if upper is not None
             else "an even integer >= 1")
    if isinstance(rotary_dim, (bool, np.bool_)) or not isinstance(rotary_dim, (int, np.integer)):
        raise ValueError(f"rotary_dim must be {valid}, got {type(rotary_dim).__name__} "
                         f"{rotary_dim!r}")
    rotary_dim = int(rotary_dim)
    if rotary_dim < 1 or rotary_dim % 2 or (upper is not None and rotary_dim > upper):
        raise ValueError(f"rotary_dim must be {valid}, got {rotary_dim}")
    return rotary_dim


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(
            f"layout must be 'half' (pair i with i + rotary_dim/2: GPT-NeoX, Llama) or "
            f"'interleaved' (pair 2i with 2i+1: GPT-J, Cohere), got {layout!r}"
        )
    return layout


def rope_angles(position_ids: np.ndarray, rotary_dim: int, theta: float = 10000.0,
                dtype=np.float64):
    """``(cos, sin)`` of the angles pos · θ_i, θ_i = theta^(−2i/rotary_dim), i < rotary_dim/2.

    position_ids: (...) non-negative integers, usually (T,) or (B, T)
    →  cos, sin: (..., rotary_dim/2) in ``dtype`` (computed in float64, then cast).
    """
    position_ids = _check_int_positions(position_ids)
    rotary_dim = check_rotary_dim(rotary_dim)
    theta = check_positive(theta, "theta")
    dtype = _check_float_dtype(dtype)
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)  # θ_i
    angles = position_ids.astype(np.float64)[..., None] * inv_freq  # m·θ_i    (..., rd/2)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _pairs(rotary_dim: int, layout: str):
    """The channels (a_i) and their partners (b_i) of the rotary_dim/2 pairs, as slices."""
    if layout == "half":  # a_i = channel i, b_i = channel i + rotary_dim/2
        return slice(0, rotary_dim // 2), slice(rotary_dim // 2, rotary_dim)
    return slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)  # a_i = 2i, b_i = 2i + 1


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int,
            layout: str) -> np.ndarray:
    """Rotate every pair (a_i, b_i) of x (..., T, D) by the angle whose cos/sin are given."""
    first, second = _pairs(rotary_dim, layout)
    a = x[..., first]  # (..., T, rd/2)
    b = x[..., second]  # (..., T, rd/2)
    y = x.copy()  # channels >= rotary_dim pass through unchanged    (..., T, D)
    y[..., first] = a * cos - b * sin  # a' = a cos − b sin
    y[..., second] = b * cos + a * sin  # b' = b cos + a sin
    return y


class RopeCache(NamedTuple):
    cos: np.ndarray  # (T, rd/2) or (B, 1, ..., 1, T, rd/2), x's dtype
    sin: np.ndarray  # same shape as cos
    rotary_dim: int
    layout: str  # "half" or "interleaved"
    shape: tuple  # x.shape (..., T, D)
    dtype: np.dtype  # x's dtype


def rope_forward(x: np.ndarray, position_ids: Optional[np.ndarray] = None, *,
                 theta: float = 10000.0, rotary_dim: Optional[int] = None,
                 layout: str = "half"):
    """Rotate each channel pair of x by position · θ_i (RoFormer's rotary embedding).

    x: (..., T, D), typically (B, H, T, D) queries or keys; position_ids: None (0 .. T−1),
    (T,), or (B, T) with B = x.shape[0] (broadcast over heads); rotary_dim: even, in [1, D],
    None → D; layout: "half" (GPT-NeoX, Llama) or "interleaved" (GPT-J, Cohere)
    →  y: (..., T, D), x's dtype.
    """
    x = check_float(x, "x", min_ndim=2)
    head_size = x.shape[-1]
    if rotary_dim is None:
        rotary_dim = head_size
        meaning = f" (D = x.shape[-1]; rotary_dim=None means D, here {head_size})"
    else:
        meaning = " (D = x.shape[-1], the head size)"
    rotary_dim = check_rotary_dim(rotary_dim, head_size, meaning)
    layout = _check_layout(layout)
    theta = check_positive(theta, "theta")
    positions = _check_position_ids(position_ids, x.shape)  # (T,) or (B, 1, ..., 1, T)
    cos, sin = rope_angles(positions, rotary_dim, theta, x.dtype)  # (..., T, rd/2) each
    y = _rotate(x, cos, sin, rotary_dim, layout)  # y = R_m x    (..., T, D)
    return y, RopeCache(cos, sin, rotary_dim, layout, x.shape, x.dtype)


def rope_backward(dy: np.ndarray, cache: RopeCache) -> np.ndarray:
    """Returns ``dx``: dy rotated back by −position · θ_i (the transpose of a rotation)."""
    cos, sin, rotary_dim, layout, shape, dtype = cache
    dy = check_grad(dy, shape, dtype)
    # forward: y = R(mθ) x, so dx = R(mθ)ᵀ dy = R(−mθ) dy: cos(−α) = cos α, sin(−α) = −sin α
    return _rotate(dy, cos, -sin, rotary_dim, layout)  # (..., T, D)
