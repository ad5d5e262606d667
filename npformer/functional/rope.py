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
Llama 1/2; Llama 3 raises it to 500000 for longer contexts. The angles m·θ_i are computed
in float64 and only cos/sin are cast to the input's dtype: in float32 the product m·θ_i
would lose ~m·6e-8 radians (Hugging Face computes it in float32).

Scaled RoPE: running past the trained length L₀ (``scaling``, a :class:`RopeScaling`)
---------------------------------------------------------------------------------------
A model trained on sequences of at most L₀ tokens has only seen angles m·θ_i < L₀·θ_i. To
run it on longer sequences, transformers' ``rope_parameters`` (``rope_type``) replace the
frequencies θ_i by θ'_i (and may multiply cos and sin by an attention factor A). Write
s = factor, d = rotary_dim, λ_i = 2π/θ_i the wavelength of pair i (in tokens), and
r_i = L₀/λ_i the number of turns pair i makes over the trained length. :func:`rope_frequencies`
computes θ'_i and A in float64 exactly as transformers 5's ``modeling_rope_utils.py`` does:

- ``default``: θ'_i = θ_i = theta^(−2i/d), A = 1.
- ``linear`` (position interpolation; kaiokendev, Chen et al. 2023): positions are squeezed
  by s, m → m/s, so every angle stays in the trained range up to s·L₀. Since the angle is
  m·θ_i, squeezing m is dividing the frequency: θ'_i = θ_i / s.
- ``dynamic`` (dynamic NTK; bloc97, emozilla 2023): rather than squeezing every pair, change
  the base so the highest frequency (i = 0) is untouched and the lowest (i = d/2 − 1) is
  slowed by a factor α: base'^(−(d−2)/d) = base^(−(d−2)/d) / α ⇔ base' = base · α^(d/(d−2)).
  α grows with the length L of the sequence being processed, α = s·L/L₀ − (s − 1) (= 1 at
  L = L₀), and nothing changes up to L₀:

      base' = theta · (s·L/L₀ − (s − 1))^(d/(d−2))  if L > L₀, else theta;  θ'_i = base'^(−2i/d)

  Here L = max(position_ids) + 1 of the call (transformers' ``seq_len``), so the function
  is stateless: one forward over T tokens equals transformers' forward. Transformers keeps
  the largest L it has seen and only resets below L₀; a KV-cache decode here recomputes
  with each step's L, which is what transformers does while the sequence grows. Either way
  the keys cached earlier were rotated with the base of their own call, so decoding past L₀
  differs from one full forward over the same tokens, here exactly as in transformers.
  d = 2 is refused (d/(d−2) divides by zero; transformers raises ZeroDivisionError).
- ``yarn`` (Peng et al. 2023, "YaRN"): pairs that turn many times within L₀ (high
  frequency, r_i > β_fast) already saw every angle and are kept; pairs that turn less than
  β_slow times are interpolated like ``linear``; in between a linear ramp. Solving
  r_i = L₀ θ_i / 2π = β for the pair index gives

      i(β) = d · ln(L₀ / (2π β)) / (2 ln theta)
      low = max(⌊i(β_fast)⌋, 0),  high = min(⌈i(β_slow)⌉, d − 1)   (no ⌊⌋ ⌈⌉ if not truncate)
      γ_i = clip((i − low) / (high − low), 0, 1)                     (high += 0.001 if equal)
      θ'_i = (θ_i / s) · γ_i + θ_i · (1 − γ_i)

  and cos and sin are multiplied by A = attention_factor, default 0.1·ln(s) + 1 (1 for
  s ≤ 1): q and k both grow by A, so the scores by A² — the paper's softmax temperature,
  which keeps the attention entropy of the longer context near that of L₀.
- ``llama3`` (Llama 3.1): the same three bands by wavelength, with a ramp in 1/λ_i instead
  of in i. With λ_low = L₀/low_freq_factor > λ_high = L₀/high_freq_factor (as
  high_freq_factor > low_freq_factor): λ_i < λ_high keeps θ_i, λ_i > λ_low takes θ_i / s,
  and in between

      η_i = (L₀/λ_i − low_freq_factor) / (high_freq_factor − low_freq_factor) ∈ [0, 1]
      θ'_i = (1 − η_i) · θ_i / s + η_i · θ_i

  which is continuous: η = 0 at λ_low, η = 1 at λ_high. A = 1.

Scaling with A ≠ 1 makes the forward y = A·R_m x: the cache holds A·cos and A·sin.

Derivation of the backward
--------------------------
y = R_m x is linear in x, so dx = R_mᵀ dy. R_m is orthogonal (a rotation), so
R_mᵀ = R_m⁻¹ = R_{−m}: the backward rotates dy back by −m·θ_i. Per pair, with
da' = ∂L/∂a' and db' = ∂L/∂b',

    ⎡da⎤   ⎡ cos mθ_i  sin mθ_i⎤ ⎡da'⎤      da = da' cos mθ_i + db' sin mθ_i
    ⎣db⎦ = ⎣−sin mθ_i  cos mθ_i⎦ ⎣db'⎦      db = db' cos mθ_i − da' sin mθ_i

i.e. the forward formula with sin → −sin. The pass-through channels have dx = dy. The
positions are integers: no gradient. With an attention factor the forward is y = A·R_m x
(cos and sin of the table both carry A), still linear in x, so dx = A·R_mᵀ dy: the same
inverse rotation with the cached A·cos and −A·sin, nothing else changes. (The scaling only
changes the angles, which do not depend on x; dynamic's base depends on the positions, which
are integers: no gradient either.)
"""

from __future__ import annotations

import functools
import math
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


class RopeScaling(NamedTuple):
    """The RoPE frequency schedule: the ``rope_*`` scaling fields of
    :class:`~npformer.config.ModelConfig` under the same names (which fields each type
    reads: ``config.ROPE_TYPE_FIELDS``; the maths: the module docstring). Hashable, so it
    keys the kernel's table cache."""
    rope_type: str = "default"  # "default", "linear", "dynamic", "yarn", "llama3"
    rope_factor: float = 1.0  # s
    rope_original_max_seq_len: Optional[int] = None  # L₀ (dynamic, yarn, llama3)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn
    rope_attention_factor: Optional[float] = None  # yarn: A; None = 0.1 ln s + 1

    @classmethod
    def from_config(cls, config) -> "RopeScaling":
        """The schedule of a (validated) ModelConfig."""
        return cls(**{name: getattr(config, name) for name in cls._fields})


_DEFAULT_SCALING = RopeScaling()  # what scaling=None means; passed on, it is not re-checked


@functools.lru_cache(maxsize=64)
def _validated(scaling: RopeScaling) -> RopeScaling:
    """The ModelConfig checks of the rope_* fields, run once per distinct schedule."""
    from ..config import ModelConfig  # config imports functional lazily too

    ModelConfig(positions="rope", **scaling._asdict())
    return scaling


def check_rope_scaling(scaling, rotary_dim: int) -> RopeScaling:
    """None (the default RoPE) or a valid :class:`RopeScaling` for ``rotary_dim``."""
    if scaling is None:
        return _DEFAULT_SCALING
    if not isinstance(scaling, RopeScaling):
        raise ValueError(f"scaling must be None or a npformer.functional.rope.RopeScaling "
                         f"(e.g. RopeScaling.from_config(config)), got {type(scaling).__name__}")
    try:
        hash(scaling)
    except TypeError:
        raise ValueError(f"scaling fields must be numbers, strings or None, got {scaling!r}") from None
    if scaling is not _DEFAULT_SCALING:  # ours, from scaling=None: nothing to check
        scaling = _validated(scaling)
    if scaling.rope_type == "dynamic" and rotary_dim == 2:
        raise ValueError("rotary_dim=2 cannot use rope_type='dynamic': its base exponent "
                         "d/(d−2) divides by zero (transformers raises ZeroDivisionError); "
                         "use rotary_dim ≥ 4")
    return scaling


def attention_factor(scaling: RopeScaling) -> float:
    """A, the factor on cos and sin: yarn's ``attention_factor`` or its default
    0.1·ln(s) + 1 (1 for s ≤ 1); 1 for every other type."""
    if scaling.rope_type != "yarn":
        return 1.0
    if scaling.rope_attention_factor is not None:
        return float(scaling.rope_attention_factor)
    factor = float(scaling.rope_factor)
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _check_frequency_inputs(rotary_dim, theta, scaling) -> tuple:
    """``(rotary_dim, theta, scaling)``: an even rotary_dim >= 2, theta > 0, and a valid
    schedule (None → the default :class:`RopeScaling`)."""
    rotary_dim = check_rotary_dim(rotary_dim)
    theta = check_positive(theta, "theta")
    return rotary_dim, theta, check_rope_scaling(scaling, rotary_dim)


def rope_frequencies(rotary_dim: int, theta: float = 10000.0,
                     scaling: Optional[RopeScaling] = None, seq_len: Optional[int] = None):
    """``(inv_freq, A)``: the frequencies θ'_i (float64, (rotary_dim/2,)) and the attention
    factor of the schedule ``scaling`` (None: the default RoPE), in the order of operations
    of transformers 5's ``ROPE_INIT_FUNCTIONS``. seq_len: L of the call, read by dynamic
    only (None or ≤ L₀: no scaling)."""
    d, theta, scaling = _check_frequency_inputs(rotary_dim, theta, scaling)
    kind, s = scaling.rope_type, float(scaling.rope_factor)
    L0 = scaling.rope_original_max_seq_len
    exponents = np.arange(0, d, 2, dtype=np.float64) / d  # 2i/d    (d/2,)
    if kind == "dynamic":
        L = L0 if seq_len is None else max(int(seq_len), L0)
        theta = theta * ((s * L / L0) - (s - 1)) ** (d / (d - 2))  # base'; = theta at L = L0
    inv_freq = 1.0 / (theta ** exponents)  # θ_i = theta^(−2i/d)    (d/2,)
    if kind == "linear":
        inv_freq = inv_freq / s  # angles of position m/s
    elif kind == "yarn":
        def pair_index(rotations):  # i at which pair i turns `rotations` times in L₀
            return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_index(scaling.rope_beta_fast), pair_index(scaling.rope_beta_slow)
        if scaling.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # transformers: "prevent singularity"
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)  # γ_i
        kept = 1 - ramp  # transformers' inv_freq_extrapolation_factor
        inv_freq = (1.0 / (s * theta ** exponents)) * (1 - kept) + inv_freq * kept
    elif kind == "llama3":
        low_factor, high_factor = scaling.rope_low_freq_factor, scaling.rope_high_freq_factor
        low_wavelength, high_wavelength = L0 / low_factor, L0 / high_factor
        wavelength = 2 * math.pi / inv_freq  # λ_i    (d/2,)
        slowed = np.where(wavelength > low_wavelength, inv_freq / s, inv_freq)
        smooth = (L0 / wavelength - low_factor) / (high_factor - low_factor)  # η_i
        smoothed = (1 - smooth) * slowed / s + smooth * slowed
        medium = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
        inv_freq = np.where(medium, smoothed, slowed)
    return inv_freq, attention_factor(scaling)


def _check_angle_inputs(position_ids, rotary_dim, dtype) -> tuple:
    """``(position_ids, rotary_dim, dtype)``: non-negative integer positions, an even
    rotary_dim, float32 or float64 (theta and scaling: :func:`rope_frequencies` checks them)."""
    return (_check_int_positions(position_ids), check_rotary_dim(rotary_dim),
            _check_float_dtype(dtype))


def rope_angles(position_ids: np.ndarray, rotary_dim: int, theta: float = 10000.0,
                dtype=np.float64, scaling: Optional[RopeScaling] = None):
    """``(A·cos, A·sin)`` of the angles m · θ'_i of :func:`rope_frequencies` (θ'_i =
    theta^(−2i/rotary_dim) and A = 1 without ``scaling``), i < rotary_dim/2.

    position_ids: (...) non-negative integers, usually (T,) or (B, T); dynamic scaling reads
    L = max(position_ids) + 1 from them
    →  cos, sin: (..., rotary_dim/2) in ``dtype`` (angles and A·cos in float64, then cast).
    """
    position_ids, rotary_dim, dtype = _check_angle_inputs(position_ids, rotary_dim, dtype)
    seq_len = int(position_ids.max()) + 1 if position_ids.size else 0
    inv_freq, A = rope_frequencies(rotary_dim, theta, scaling, seq_len)  # θ'_i, A
    angles = position_ids.astype(np.float64)[..., None] * inv_freq  # m·θ'_i    (..., rd/2)
    cos, sin = np.cos(angles), np.sin(angles)  # (..., rd/2) each
    if A != 1.0:
        cos, sin = cos * A, sin * A  # A·cos, A·sin
    return cos.astype(dtype), sin.astype(dtype)


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


def check_rope_options(shape: tuple, position_ids, theta, rotary_dim, layout, scaling) -> tuple:
    """The checks of a rotation of an input of ``shape`` (..., T, D), shared by
    :func:`rope_forward` and the kernel :func:`npformer.kernels.rope.rope_forward` (each checks
    its x first). Returns ``(positions, theta, rotary_dim, layout, scaling)``: positions (T,)
    or (B, 1, ..., 1, T), rotary_dim even in [1, D] (None → D)."""
    head_dim = shape[-1]
    if rotary_dim is None:
        rotary_dim = head_dim
        meaning = f" (D = x.shape[-1]; rotary_dim=None means D, here {head_dim})"
    else:
        meaning = " (D = x.shape[-1], the head size)"
    rotary_dim = check_rotary_dim(rotary_dim, head_dim, meaning)
    layout = _check_layout(layout)
    theta = check_positive(theta, "theta")
    positions = _check_position_ids(position_ids, shape)  # (T,) or (B, 1, ..., 1, T)
    return positions, theta, rotary_dim, layout, check_rope_scaling(scaling, rotary_dim)


def _check_rope_inputs(x, position_ids, theta, rotary_dim, layout, scaling) -> tuple:
    """The one check of :func:`rope_forward`: x a float array (..., T, D), then
    :func:`check_rope_options`. Returns ``(x, positions, theta, rotary_dim, layout, scaling)``."""
    x = check_float(x, "x", min_ndim=2)  # (..., T, D)
    return (x,) + check_rope_options(x.shape, position_ids, theta, rotary_dim, layout, scaling)


class RopeCache(NamedTuple):
    cos: np.ndarray  # A·cos (T, rd/2) or (B, 1, ..., 1, T, rd/2), x's dtype
    sin: np.ndarray  # A·sin, same shape as cos
    rotary_dim: int
    layout: str  # "half" or "interleaved"
    shape: tuple  # x.shape (..., T, D)
    dtype: np.dtype  # x's dtype


def rope_forward(x: np.ndarray, position_ids: Optional[np.ndarray] = None, *,
                 theta: float = 10000.0, rotary_dim: Optional[int] = None,
                 layout: str = "half", scaling: Optional[RopeScaling] = None):
    """Rotate each channel pair of x by position · θ_i (RoFormer's rotary embedding).

    x: (..., T, D), typically (B, H, T, D) queries or keys; position_ids: None (0 .. T−1),
    (T,), or (B, T) with B = x.shape[0] (broadcast over heads); rotary_dim: even, in [1, D],
    None → D; layout: "half" (GPT-NeoX, Llama) or "interleaved" (GPT-J, Cohere);
    scaling: None (the default RoPE) or a :class:`RopeScaling` (linear, dynamic, yarn,
    llama3: y = A·R'_m x with the scaled angles, see the module docstring)
    →  y: (..., T, D), x's dtype.
    """
    x, positions, theta, rotary_dim, layout, scaling = _check_rope_inputs(
        x, position_ids, theta, rotary_dim, layout, scaling)  # positions (T,) or (B, 1, …, 1, T)
    # A·cos, A·sin of m·θ'_i    (..., T, rd/2) each
    cos, sin = rope_angles(positions, rotary_dim, theta, x.dtype, scaling)
    y = _rotate(x, cos, sin, rotary_dim, layout)  # y = A·R_m x    (..., T, D)
    return y, RopeCache(cos, sin, rotary_dim, layout, x.shape, x.dtype)


def rope_backward(dy: np.ndarray, cache: RopeCache) -> np.ndarray:
    """Returns ``dx``: dy rotated back by −position · θ_i (the transpose of a rotation),
    times the attention factor A (the cached tables carry it)."""
    cos, sin, rotary_dim, layout, shape, dtype = cache
    dy = check_grad(dy, shape, dtype)
    # forward: y = A R(mθ) x, so dx = A R(mθ)ᵀ dy = A R(−mθ) dy: cos(−α) = cos α,
    # sin(−α) = −sin α, and the cached (A cos, A sin) give (A cos, −A sin)
    return _rotate(dy, cos, -sin, rotary_dim, layout)  # (..., T, D)
