"""Alternatives to softmax along the last axis: softmax₁, a learned sink, clipped softmax,
soft-capping.

All four take scores x (..., S) that may contain −inf for masked entries, exactly like
:func:`npformer.functional.softmax.softmax_forward`: a masked entry gets probability 0 and
gradient 0, and a fully masked row gives all zeros, never NaN. In attention each row is one
query's scores over the S keys.

Softmax₁ ("off by one", Evan Miller 2023)
-----------------------------------------
    p_i = exp(x_i) / (1 + Σ_k exp(x_k))

Softmax with an extra, always-present logit fixed at 0 whose probability is thrown away: a
head can put its mass there and attend to nothing, so Σ_i p_i = 1 − 1/(1 + Σ_k exp(x_k)) < 1.
The shift trick of softmax needs care, because the "1" is exp(0) and shifts with the rest:
multiplying numerator and denominator by exp(−m) gives

    p_i = exp(x_i − m) / (exp(−m) + Σ_k exp(x_k − m)),    m = max(max_k x_k, 0)

With m ≥ every x_k and m ≥ 0 every exponent (including −m) is ≤ 0, so nothing overflows,
and one of the terms is exp(0) = 1, so the denominator lies in [1, S + 1]. A fully masked
row has max_k x_k = −inf, so m = 0 and p = 0 / 1 = 0 without any special case.

Derivative. With Z = 1 + Σ_k exp(x_k), ∂Z/∂x_j = exp(x_j) (the constant 1 has none), so the
quotient rule gives the same form as softmax:

    ∂p_i/∂x_j = ([i = j] exp(x_i) Z − exp(x_i) exp(x_j)) / Z² = p_i ([i = j] − p_j)
    dx_j = Σ_i dp_i p_i ([i = j] − p_j)    →    dx = p ⊙ (dp − ⟨dp, p⟩)

The difference is hidden in p: its entries no longer sum to 1, so J = diag(p) − p pᵀ has
rows that do not sum to 0 (J·1 = p (1 − Σp) = p / Z): adding one constant to every score
now changes the output. That is the point — it is how a head lowers all its weights.

A learned attention sink (gpt-oss; StreamingLLM's "sink" as one logit per head)
-------------------------------------------------------------------------------
    p_i = exp(x_i) / (exp(s) + Σ_k exp(x_k))          x, p (..., S); s (..., 1), one per row

A softmax over the S scores and one extra logit s whose probability p_sink = exp(s) / Z
is thrown away (gpt-oss concatenates s as a column, takes the softmax and drops that
column). softmax₁ is the case s = 0; with s learned, each head chooses how much mass it
may put "nowhere". Σ_i p_i = 1 − p_sink.

Stably, with the shift m = max(max_k x_k, s) (s takes part in the max, unlike softmax₁'s
naive "subtract max(x), then add 1", which would turn s into max(x)):

    p_i = exp(x_i − m) / Z′,    p_sink = exp(s − m) / Z′,    Z′ = exp(s − m) + Σ_k exp(x_k − m)

Every exponent is ≤ 0 and one of them is 0, so Z′ ∈ [1, S + 1]: s = ±1000 is harmless. A
fully masked row has max_k x_k = −inf, so m = s, Z′ = 1, p = 0 and p_sink = 1, no NaN.

Derivative. With Z = exp(s) + Σ_k exp(x_k): ∂Z/∂x_j = exp(x_j) and ∂Z/∂s = exp(s), so

    ∂p_i/∂x_j = p_i ([i = j] − p_j)              (as softmax₁: the sink is a constant for x)
    ∂p_i/∂s   = −exp(x_i) exp(s) / Z² = −p_i p_sink

and, given dp = ∂ℓ/∂p,

    dx = p ⊙ (dp − ⟨dp, p⟩)
    ds = Σ_i dp_i (−p_i p_sink) = −p_sink ⟨dp, p⟩          (..., 1), one per row

(the same ⟨dp, p⟩ as dx: the sink costs one multiply per row). A row whose entries are all
masked has p = 0, so dx = 0 and ds = 0. When one s is shared by many rows (attention: one
per head, broadcast over batch and queries) its gradient is the sum of the rows' ds — the
caller sums over the broadcast axes.

Clipped softmax (Bondarenko et al. 2023, "Quantizable Transformers")
--------------------------------------------------------------------
    p′ = softmax(x),    u = (ζ − γ)·p′ + γ,    p = clip(u, 0, 1)          (..., S) each

with γ ≤ 0 and ζ ≥ 1 (γ = 0, ζ = 1 is plain softmax). Stretching [0, 1] to [γ, ζ] and
clipping back lets a probability reach exactly 0 (or 1) with finite scores, so attention
heads that want to "do nothing" no longer push their scores towards ±inf (which produces
the outliers that make quantisation hard). A masked entry has p′ = 0, u = γ ≤ 0, so p = 0;
a fully masked row (p′ = 0 everywhere, see softmax) gives p = 0.

Derivative: clip passes the gradient where 0 ≤ u ≤ 1 and blocks it where u was clipped:

    du = dp ⊙ [0 ≤ u ≤ 1],    dp′ = (ζ − γ) du,    dx = p′ ⊙ (dp′ − ⟨dp′, p′⟩)

(the last step is softmax's backward). At exactly u = 0 or u = 1 the gradient passes, the
convention of ``torch.clamp``; with γ = 0, ζ = 1 this makes clipped softmax equal to
softmax in value and gradient (masked entries sit at u = 0 but have p′ = 0, so their
gradient is 0 anyway).

γ may also differ per row (γ (..., 1), every value ≤ 0): the length-aware γ_i = −α / n_i
of a causal model, whose row i has n_i = i + 1 keys, not T (Bondarenko et al. used
γ = −α / T for OPT; Liao & Monz 2024 normalise by the row's length). Nothing above
changes: each row uses its own γ and ζ − γ, a constant for x.

Logit soft-capping (Gemma 2: attention scores and final logits)
----------------------------------------------------------------
    y = c · tanh(x / c)

Near 0 the identity (tanh u ≈ u), for |x| ≫ c a smooth saturation at ±c: scores can never
run away. Masked entries stay masked: −inf maps to −inf (tanh would give −c, which would
un-mask them). Derivative, with u = x / c:

    dy/dx = c · (1 − tanh²(u)) · (1 / c) = 1 − tanh²(u) = sech²(u)
    dx = dy ⊙ sech²(x / c)

For large |u|, 1 − tanh²(u) cancels catastrophically (tanh(u) rounds to ±1); we use
sech²(u) = 4 e / (1 + e)² with e = exp(−2|u|) ∈ [0, 1] instead, which is exact for every
u, never overflows, and is exactly 0 at a masked entry (u = −inf gives e = 0).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad, check_positive, check_same_dtype
from .softmax import SoftmaxCache, softmax_backward, softmax_forward


class Softmax1Cache(NamedTuple):
    p: np.ndarray  # (..., S) the output


class SinkSoftmaxCache(NamedTuple):
    p: np.ndarray  # (..., S) the output
    p_sink: np.ndarray  # (..., 1) the sink's probability exp(s) / Z, one per row


class ClippedSoftmaxCache(NamedTuple):
    softmax: SoftmaxCache  # p′ = softmax(x), (..., S)
    inside: np.ndarray  # (..., S) bool: 0 <= u <= 1, where the gradient passes the clip
    stretch: object  # ζ − γ: a float, or (..., 1) with a per-row γ


class SoftcapCache(NamedTuple):
    slope: np.ndarray  # shape of x: dy/dx = sech²(x / cap), 0 at masked entries


def _check_scores(x, name: str = "x") -> np.ndarray:
    """Scores (..., S) with S >= 1: finite or -inf (masked)."""
    x = check_float(x, name, allow_neg_inf=True, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has length 0 along its last axis (shape {x.shape}); "
                         "a softmax needs at least one entry")
    return x


def check_clip_range(gamma, zeta, gamma_name: str = "gamma", zeta_name: str = "zeta"):
    """Clipped softmax's stretch: gamma <= 0 and zeta >= 1, finite numbers; returns floats."""
    values = []
    for value, name in ((gamma, gamma_name), (zeta, zeta_name)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.floating, np.integer)
        ):
            raise ValueError(f"{name} must be a number, got {type(value).__name__}")
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        values.append(value)
    gamma, zeta = values
    if gamma > 0:
        raise ValueError(f"{gamma_name} must be <= 0 (clipped softmax stretches [0, 1] to "
                         f"[{gamma_name}, {zeta_name}]), got {gamma}")
    if zeta < 1:
        raise ValueError(f"{zeta_name} must be >= 1 (clipped softmax stretches [0, 1] to "
                         f"[{gamma_name}, {zeta_name}]), got {zeta}")
    return gamma, zeta


def _check_row_values(values, x, name: str) -> np.ndarray:
    """values: an array in x's dtype, finite, broadcastable to one value per row of x, i.e.
    to x.shape[:-1] + (1,)."""
    values = check_float(values, name)
    check_same_dtype(x, "x", **{name: values})
    rows = x.shape[:-1] + (1,)
    try:
        fits = np.broadcast_shapes(values.shape, rows) == rows
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must broadcast to one value per row of x, x.shape[:-1] + (1,) "
                         f"= {rows}, got shape {values.shape}")
    return values


def _check_clipped_softmax_inputs(x, gamma, zeta):
    """``(x, gamma, zeta)``: scores (..., S) as for softmax, zeta >= 1 a number and gamma a
    number <= 0 or a per-row array (broadcastable to x.shape[:-1] + (1,)) of values <= 0."""
    x = _check_scores(x)
    if not isinstance(gamma, np.ndarray):
        gamma, zeta = check_clip_range(gamma, zeta)
        return x, gamma, zeta
    _, zeta = check_clip_range(0.0, zeta)
    gamma = _check_row_values(gamma, x, "gamma")
    if (gamma > 0).any():
        raise ValueError(f"gamma must be <= 0 in every row (clipped softmax stretches [0, 1] to "
                         f"[gamma, zeta]), got a largest value of {float(gamma.max())}")
    return x, gamma, zeta


def _check_sink_softmax_inputs(x, sink):
    """``(x, sink)``: scores (..., S) as for softmax; sink finite, x's dtype, one per row."""
    x = _check_scores(x)
    return x, _check_row_values(sink, x, "sink")


def _check_softcap_inputs(x, cap):
    """``(x, cap)``: x finite or -inf (masked), any shape; cap a finite number > 0."""
    return check_float(x, "x", allow_neg_inf=True), check_positive(cap, "cap")


# ---- softmax₁ ---------------------------------------------------------------------------


def softmax1_forward(x: np.ndarray):
    """``p_i = exp(x_i) / (1 + Σ_k exp(x_k))`` along the last axis; ``-inf`` entries are masked.

    x: (..., S)  →  p: (..., S), each row sums to less than 1 (0 for a fully masked row).
    """
    x = _check_scores(x)
    m = np.maximum(np.max(x, axis=-1, keepdims=True), 0)  # (..., 1) max(max_k x_k, 0)
    e = np.exp(x - m)  # (..., S) every exponent ≤ 0; a masked entry gives exactly 0
    z = np.exp(-m) + np.sum(e, axis=-1, keepdims=True)  # (..., 1) in [1, S + 1]
    p = e / z  # (..., S)
    return p, Softmax1Cache(p)


def softmax1_backward(dp: np.ndarray, cache: Softmax1Cache):
    """Returns ``dx`` (..., S)."""
    (p,) = cache
    dp = check_grad(dp, p.shape, p.dtype, "dp")
    # forward: p_i = exp(x_i) / (1 + Σ_k exp(x_k)), so ∂p_i/∂x_j = p_i ([i = j] − p_j) and
    # dx = p ⊙ (dp − ⟨dp, p⟩)   (as softmax, but Σ_i p_i < 1)
    dot = np.sum(dp * p, axis=-1, keepdims=True)  # (..., 1) ⟨dp, p⟩
    return p * (dp - dot)  # (..., S) masked entries (p = 0) get exactly 0


# ---- learned sink ---------------------------------------------------------------------------


def sink_softmax_forward(x: np.ndarray, sink: np.ndarray):
    """``p_i = exp(x_i) / (exp(sink) + Σ_k exp(x_k))`` along the last axis; ``-inf`` is masked.

    x: (..., S); sink: one finite logit per row, broadcastable to (..., 1), x's dtype
    →  p: (..., S), each row sums to 1 − p_sink < 1 (0 for a fully masked row).
    softmax₁ is sink = 0.
    """
    x, sink = _check_sink_softmax_inputs(x, sink)
    # (..., 1) m = max(max_k x_k, s): s finite, so m is finite even for a fully masked row
    m = np.maximum(np.max(x, axis=-1, keepdims=True), sink)
    e = np.exp(x - m)  # (..., S) every exponent ≤ 0; a masked entry gives exactly 0
    e_sink = np.exp(sink - m)  # (..., 1) exp(s − m) ≤ 1
    z = e_sink + np.sum(e, axis=-1, keepdims=True)  # (..., 1) Z′ in [1, S + 1]
    p = e / z  # (..., S)
    return p, SinkSoftmaxCache(p, e_sink / z)


def sink_softmax_backward(dp: np.ndarray, cache: SinkSoftmaxCache):
    """Returns ``(dx, dsink)``: (..., S) and (..., 1), one sink gradient per row (sum them
    over the axes along which one sink was broadcast)."""
    p, p_sink = cache
    dp = check_grad(dp, p.shape, p.dtype, "dp")
    dot = np.sum(dp * p, axis=-1, keepdims=True)  # (..., 1) ⟨dp, p⟩
    # forward: p_i = exp(x_i) / (exp(s) + Σ_k exp(x_k)), so ∂p_i/∂x_j = p_i ([i = j] − p_j)
    # and dx = p ⊙ (dp − ⟨dp, p⟩)   (masked entries, p = 0, get exactly 0)
    dx = p * (dp - dot)  # (..., S)
    # ∂p_i/∂s = −p_i p_sink, so ds = −p_sink ⟨dp, p⟩
    dsink = -p_sink * dot  # (..., 1)
    return dx, dsink


# ---- clipped softmax ------------------------------------------------------------------------


def clipped_softmax_forward(x: np.ndarray, gamma=-0.03, zeta: float = 1.0):
    """``p = clip((zeta − gamma)·softmax(x) + gamma, 0, 1)`` along the last axis.

    x: (..., S), may hold -inf (masked)  →  p: (..., S). Requires zeta >= 1 and gamma <= 0:
    a number, or an array in x's dtype broadcastable to (..., 1), one γ per row (the
    length-aware γ_i = −α / n_i).
    """
    x, gamma, zeta = _check_clipped_softmax_inputs(x, gamma, zeta)
    stretch = zeta - gamma  # ζ − γ ≥ 1: a Python float (keeps x's dtype) or (..., 1)
    p_prime, softmax_cache = softmax_forward(x, axis=-1)  # (..., S) p′ = softmax(x)
    u = stretch * p_prime + gamma  # (..., S) in [γ, ζ]; a masked entry sits at γ ≤ 0
    inside = (u >= 0) & (u <= 1)  # (..., S) not clipped (boundaries pass, as torch.clamp)
    p = np.clip(u, 0, 1)  # (..., S)
    return p, ClippedSoftmaxCache(softmax_cache, inside, stretch)


def clipped_softmax_backward(dp: np.ndarray, cache: ClippedSoftmaxCache):
    """Returns ``dx`` (..., S); zero where the output was clipped and at masked entries."""
    softmax_cache, inside, stretch = cache
    dp = check_grad(dp, inside.shape, softmax_cache.p.dtype, "dp")
    # forward: p = clip(u, 0, 1), so du = dp where 0 ≤ u ≤ 1, else 0
    du = np.where(inside, dp, 0).astype(dp.dtype, copy=False)  # (..., S)
    # forward: u = (ζ − γ)·p′ + γ, so dp′ = (ζ − γ)·du
    dp_prime = stretch * du  # (..., S)
    # forward: p′ = softmax(x), so dx = p′ ⊙ (dp′ − ⟨dp′, p′⟩)
    return softmax_backward(dp_prime, softmax_cache)  # (..., S)


# ---- soft-capping ---------------------------------------------------------------------------


def softcap_forward(x: np.ndarray, cap: float):
    """``y = cap · tanh(x / cap)`` elementwise; ``-inf`` (masked) stays ``-inf``.

    x: any shape  →  y: same shape, |y| < cap at every finite entry. cap > 0.
    """
    x, cap = _check_softcap_inputs(x, cap)
    u = x / cap  # shape of x
    masked = np.isneginf(x)  # shape of x
    y = np.where(masked, -np.inf, cap * np.tanh(u)).astype(x.dtype, copy=False)  # c tanh(x/c)
    e = np.exp(-2 * np.abs(u))  # shape of x: exp(−2|u|) ∈ [0, 1]; 0 at a masked entry
    slope = 4 * e / (1 + e) ** 2  # shape of x: sech²(u) = 1 − tanh²(u), without cancellation
    return y, SoftcapCache(slope)


def softcap_backward(dy: np.ndarray, cache: SoftcapCache):
    """Returns ``dx`` (shape of x); 0 at masked entries."""
    (slope,) = cache
    dy = check_grad(dy, slope.shape, slope.dtype)
    # forward: y = c tanh(x / c), so dx = dy ⊙ (1 − tanh²(x / c)) = dy ⊙ sech²(x / c)
    return dy * slope  # shape of x
