"""RMS normalisation over the last axis (Zhang & Sennrich 2019; Llama): ``y = x r ⊙ w``.

For one row x of length C (every leading index is an independent row):

    r = 1/√(mean(x²) + eps) = 1/√((1/C) Σ_i x_i² + eps)   the reciprocal RMS, eps inside
    x̂ = x r
    y = x̂ ⊙ w                                             w (C,) optional

No mean is subtracted and there is no bias: LayerNorm without its centring. Llama 1 used
eps = 1e-6 (the default here); later checkpoints state their own (``rms_norm_eps`` in a
Hugging Face config, 1e-5 for Llama 2 and 3).

Unit offset (Gemma): ``unit_offset=True`` scales by (1 + w) instead of w,

    y = x̂ ⊙ (1 + w)                                       w initialised to 0

so a freshly initialised (or weight-decayed) gain is the identity. The sum 1 + w is formed
once in w's dtype (as Gemma's ``1.0 + weight.float()`` in float32) and used as the scale s.

Derivation
----------
The scale w is elementwise per channel and shared by every row:

    dw = Σ_rows dy ⊙ x̂,        g := ∂ℓ/∂x̂ = dy ⊙ w

With the unit offset the scale is s = 1 + w and ∂s/∂w = I, so dw = ds = Σ_rows dy ⊙ x̂ (the
same formula) and g = dy ⊙ s = dy ⊙ (1 + w): the cache keeps s, and the backward is shared.

For x̂ as a function of x (one row), from r = (mean(x²) + eps)^(−1/2):

    ∂r/∂x_j = −½ r³ · 2 x_j / C = −r² x̂_j / C
    ∂x̂_i/∂x_j = δ_ij r + x_i ∂r/∂x_j = r (δ_ij − x̂_i x̂_j / C)

so, with mean(·) over the C channels of the row,

    dx_j = Σ_i g_i ∂x̂_i/∂x_j = r (g_j − x̂_j mean(g ⊙ x̂))

    dx = r (g − x̂ ⊙ mean(g ⊙ x̂))

the LayerNorm formula without its −mean(g) term (that term came from the centring).

Numerical stability
-------------------
Every intermediate stays in x's dtype. x² overflows float32 only for |x| > 1.8e19, far beyond
activations; inputs of magnitude 1e4 give mean(x²) ≈ 1e8, well within range.
A row of zeros gives r = 1/√eps and y = 0, with a finite gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_channel_params, check_grad, check_no_overflow, check_positive


class RMSNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) the normalised input x̂ = x r
    rstd: np.ndarray  # (..., 1) r = 1/√(mean(x²) + eps) per row
    weight: Optional[np.ndarray]  # (C,) the scale s (w, or 1 + w with the unit offset), or None


def _check_rmsnorm_inputs(x, weight, eps, unit_offset):
    """x (..., C), weight None or (C,) in x's dtype, eps > 0, unit_offset a bool (True needs
    a weight). Returns ``(s, eps)``: the scale s = w or 1 + w (see :func:`unit_offset_scale`)
    and eps as a Python float (which keeps float32 arrays float32)."""
    check_channel_params(x, weight=weight)
    eps = check_positive(eps, "eps")
    return unit_offset_scale(weight, unit_offset), eps


def rmsnorm_forward(x: np.ndarray, weight: Optional[np.ndarray] = None, eps: float = 1e-6,
                    unit_offset: bool = False):
    """``y = x r ⊙ weight``, r = 1/√(mean(x²) + eps), over the last axis (Llama's RMSNorm);
    ``unit_offset=True``: ``⊙ (1 + weight)`` (Gemma's RMSNorm).

    x: (..., C), weight w: (C,) or None  →  y: (..., C), x's dtype.
    """
    scale, eps = _check_rmsnorm_inputs(x, weight, eps, unit_offset)  # s = w or 1 + w    (C,)
    with np.errstate(over="ignore"):  # an overflow of mean(x²) is refused below
        ms = np.mean(x * x, axis=-1, keepdims=True)  # mean(x²)    (..., 1)
    check_no_overflow(ms, x, "rmsnorm: the mean of x²")
    rstd = 1.0 / np.sqrt(ms + eps)  # r = 1/√(mean(x²) + eps)    (..., 1)
    xhat = x * rstd  # x̂ = x r    (..., C)
    y = xhat * scale if scale is not None else xhat.copy()  # y = x̂ ⊙ s    (..., C)
    return y, RMSNormCache(xhat, rstd, scale)


def unit_offset_scale(weight: Optional[np.ndarray], unit_offset) -> Optional[np.ndarray]:
    """The scale s of ``y = x̂ ⊙ s``: the weight itself, or ``1 + weight`` (in the weight's
    dtype) with Gemma's unit offset. Shared by the fused kernel (kernels/norms.py)."""
    if not isinstance(unit_offset, (bool, np.bool_)):
        raise ValueError(f"unit_offset must be True or False, got {unit_offset!r}")
    if not unit_offset:
        return weight
    if weight is None:
        raise ValueError("unit_offset=True scales by (1 + weight): it needs a weight (C,)")
    return 1 + weight  # (C,) weight's dtype (a Python int keeps float32 float32)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache):
    """Returns ``(dx, dweight)``; dweight is None when the forward had no weight."""
    xhat, rstd, scale = cache
    dy = check_grad(dy, xhat.shape, xhat.dtype)
    channels = xhat.shape[-1]
    # forward: y = x̂ ⊙ s (s = w, or 1 + w: ∂s/∂w = I either way), so dw = Σ_rows dy ⊙ x̂
    # and g = dx̂ = dy ⊙ s
    dweight = None
    g = dy  # (..., C)
    if scale is not None:
        dweight = (dy.reshape(-1, channels) * xhat.reshape(-1, channels)).sum(axis=0)  # (C,)
        g = dy * scale  # (..., C)
    # forward: x̂ = x r, r = 1/√(mean(x²) + eps), so dx = r (g − x̂ ⊙ mean(g ⊙ x̂))
    mean_gx = np.mean(g * xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = rstd * (g - xhat * mean_gx)  # (..., C)
    return dx, dweight
