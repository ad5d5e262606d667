"""Alternatives to softmax along the last axis: softmax₁, clipped softmax, soft-capping.

All three take scores x (..., S) that may contain −inf for masked entries, exactly like
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

from .._validate import check_float, check_grad, check_positive
from .softmax import SoftmaxCache, softmax_backward, softmax_forward


class Softmax1Cache(NamedTuple):
    p: np.ndarray  # (..., S) the output


class ClippedSoftmaxCache(NamedTuple):
    softmax: SoftmaxCache  # p′ = softmax(x), (..., S)
    inside: np.ndarray  # (..., S) bool: 0 <= u <= 1, where the gradient passes the clip
    stretch: float  # ζ − γ


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


def _check_clipped_softmax_inputs(x, gamma, zeta):
    """``(x, gamma, zeta)``: scores (..., S) as for softmax, gamma <= 0 and zeta >= 1."""
    x = _check_scores(x)
    gamma, zeta = check_clip_range(gamma, zeta)
    return x, gamma, zeta


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


# ---- clipped softmax ------------------------------------------------------------------------


def clipped_softmax_forward(x: np.ndarray, gamma: float = -0.03, zeta: float = 1.0):
    """``p = clip((zeta − gamma)·softmax(x) + gamma, 0, 1)`` along the last axis.

    x: (..., S), may hold -inf (masked)  →  p: (..., S). Requires gamma <= 0 and zeta >= 1.
    """
    x, gamma, zeta = _check_clipped_softmax_inputs(x, gamma, zeta)
    stretch = zeta - gamma  # ζ − γ ≥ 1, a Python float: keeps x's dtype
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
