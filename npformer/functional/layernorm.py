"""Layer normalisation over the last axis: ``y = (x − μ) r ⊙ w + b``, r = 1/√(v + eps).

For one row x of length C (every leading index is an independent row):

    μ = (1/C) Σ_i x_i                    the mean
    v = (1/C) Σ_i (x_i − μ)²             the biased variance (divide by C, not C − 1)
    r = 1/√(v + eps)                     the reciprocal std; eps INSIDE the root, as torch
    x̂ = (x − μ) r
    y = x̂ ⊙ w + b                        w (C,) and b (C,) are each optional

Which affine parameters a model has: GPT-2 (and the 2017 Transformer, GPT-1) has both w and
b; PaLM and Cohere use LayerNorm without a bias (w only). Some older code put eps outside the
root, x̂ = (x − μ) / (√v + eps); that is a different function, and checkpoints trained with
one are run with that one (torch, GPT-2, Hugging Face: inside).

Derivation
----------
The affine part is elementwise per channel, and w, b are shared by every row:

    dw = Σ_rows dy ⊙ x̂,        db = Σ_rows dy,        g := ∂ℓ/∂x̂ = dy ⊙ w

For x̂ as a function of x (one row), using Σ_i (x_i − μ) = 0 and δ_ij (1 if i = j, else 0):

    ∂μ/∂x_j = 1/C
    ∂v/∂x_j = (2/C) Σ_i (x_i − μ)(δ_ij − 1/C) = 2 (x_j − μ) / C
    ∂r/∂x_j = −½ (v + eps)^(−3/2) ∂v/∂x_j = −r³ (x_j − μ) / C = −r² x̂_j / C
    ∂x̂_i/∂x_j = (δ_ij − 1/C) r + (x_i − μ) ∂r/∂x_j
              = r (δ_ij − 1/C − x̂_i x̂_j / C)

so, with mean(·) over the C channels of the row,

    dx_j = Σ_i g_i ∂x̂_i/∂x_j = r (g_j − mean(g) − x̂_j mean(g ⊙ x̂))

    dx = r (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))

eps enters only through r; the formula is exact for any eps > 0. dx sums to 0 over each row:
adding a constant to a row leaves y unchanged, so no gradient points that way.

Numerical stability
-------------------
The variance is computed in two passes (centre first, then mean of squares), never as
E[x²] − μ², which cancels catastrophically for rows like 1e4 + noise. In float32 even μ
itself is rounded to a multiple of about 5e-4 near 1e4, so x − μ would be off by that much
for O(1) deviations. A second centring pass, x_c ← x_c − mean(x_c), removes the error of the
first: x_c is then accurate to float32 precision of the deviations themselves.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_channel_params, check_grad, check_no_overflow, check_positive


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) the normalised input x̂
    rstd: np.ndarray  # (..., 1) r = 1/√(v + eps) per row
    weight: Optional[np.ndarray]  # (C,) or None
    has_bias: bool


def _check_layernorm_inputs(x, weight, bias, eps) -> float:
    """x (..., C), weight and bias None or (C,), one float dtype; returns eps as a Python
    float > 0 (which keeps float32 arrays float32)."""
    check_channel_params(x, weight=weight, bias=bias)
    return check_positive(eps, "eps")


def layernorm_forward(x: np.ndarray, weight: Optional[np.ndarray] = None,
                      bias: Optional[np.ndarray] = None, eps: float = 1e-5):
    """``y = (x − μ) r ⊙ weight + bias``, r = 1/√(v + eps), over the last axis.

    x: (..., C), weight w: (C,) or None, bias b: (C,) or None  →  y: (..., C), x's dtype.
    GPT-2 has both weight and bias; PaLM and Cohere have a weight and no bias.
    eps: 1e-5 is torch's default and GPT-2's ``layer_norm_epsilon``.
    """
    eps = _check_layernorm_inputs(x, weight, bias, eps)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow of v is refused below
        xc = x - np.mean(x, axis=-1, keepdims=True)  # x − μ    (..., C)
        xc -= np.mean(xc, axis=-1, keepdims=True)  # second pass: removes the rounding of μ
        v = np.mean(xc * xc, axis=-1, keepdims=True)  # v, biased    (..., 1)
    check_no_overflow(v, x, "layernorm: the variance of x")
    rstd = 1.0 / np.sqrt(v + eps)  # r = 1/√(v + eps)    (..., 1)
    xhat = xc * rstd  # x̂ = (x − μ) r    (..., C)
    y = xhat
    if weight is not None:
        y = y * weight  # x̂ ⊙ w    (..., C)
    if bias is not None:
        y = y + bias  # + b    (..., C)
    if y is xhat:
        y = xhat.copy()  # no affine part: never hand out the cached array itself
    return y, LayerNormCache(xhat, rstd, weight, bias is not None)


def layernorm_backward(dy: np.ndarray, cache: LayerNormCache):
    """Returns ``(dx, dweight, dbias)``; dweight / dbias are None when absent in the forward."""
    xhat, rstd, weight, has_bias = cache
    dy = check_grad(dy, xhat.shape, xhat.dtype)
    channels = xhat.shape[-1]
    dy_rows = dy.reshape(-1, channels)  # (N, C)
    # forward: y = x̂ ⊙ w + b, so dw = Σ_rows dy ⊙ x̂, db = Σ_rows dy, g = dx̂ = dy ⊙ w
    dbias = dy_rows.sum(axis=0) if has_bias else None  # (C,)
    dweight = None
    g = dy  # (..., C)
    if weight is not None:
        dweight = (dy_rows * xhat.reshape(-1, channels)).sum(axis=0)  # (C,)
        g = dy * weight  # (..., C)
    # forward: x̂ = (x − μ) r, so dx = r (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))
    mean_g = np.mean(g, axis=-1, keepdims=True)  # (..., 1)
    mean_gx = np.mean(g * xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = rstd * (g - mean_g - xhat * mean_gx)  # (..., C)
    return dx, dweight, dbias
