"""Gated attention (Bondarenko, Nagel, Blankevoort, NeurIPS 2023, "Quantizable Transformers").

Each head's output is multiplied by a gate in (0, 1) computed from the head's own slice of
the attention's input, so a head that has nothing to add can switch itself off (gate → 0)
instead of learning a "no-op" attention pattern onto a low-information token, which is what
grows the outlier activations that make int8 quantisation hard.

Forward
-------
x (B, T, C) is the attention's input, the same x the q projection reads (for a pre-norm block
the normalised x), o (B, H, T, Dv) the attention core's output, weight (H, C/H), bias (H,).
Split x into H slices of width W = C/H, x_h[b, t] = x[b, t, h·W : (h+1)·W] (W,):

    a[b, t, h]     = x_h[b, t] · weight[h] + bias[h]          (B, T, H)   the gate's logit
    g[b, t, h]     = σ(a[b, t, h])                            (B, T, H)
    y[b, h, t, :]  = g[b, t, h] · o[b, h, t, :]               (B, H, T, Dv)

(the paper's G_h, a Linear(C/H → 1) per head on that head's slice; per token, not pooled).
The gate is applied to the core's output before the heads are merged and projected by W_o.

Derivation
----------
With dy = ∂ℓ/∂y (B, H, T, Dv). y is linear in o with the scalar factor g, so

    ∂ℓ/∂o[b,h,t,:] = g[b,t,h] · dy[b,h,t,:]                   →  do = g ⊙ dy (broadcast)

g enters every one of the Dv outputs of (b, h, t), so its gradient sums over them:

    ∂ℓ/∂g[b,t,h] = Σ_d dy[b,h,t,d] o[b,h,t,d] = ⟨dy, o⟩
    ∂ℓ/∂a[b,t,h] = σ'(a) ⟨dy, o⟩ = g (1 − g) ⟨dy, o⟩           =: da   (B, T, H)

and a is affine in x_h, weight[h] and bias[h]; weight and bias are shared by every (b, t):

    dweight[h] = Σ_{b,t} da[b,t,h] · x_h[b,t]                 (H, W)
    dbias[h]   = Σ_{b,t} da[b,t,h]                            (H,)
    dx_h[b,t]  = da[b,t,h] · weight[h]                        (B, T, H, W) → (B, T, C)

dx is only the gate's share of the input gradient: in a model x also feeds q, k and v, and
the three paths add.

Numerical stability
-------------------
σ is the overflow-free form of :mod:`npformer.functional.silu` (e = exp(−|a|) ∈ (0, 1]), and
1 − g is computed as σ(−a), accurate where g rounds to 1. At a = ±1000 the gate is exactly
1 or 0 and σ' exactly 0, without an overflow warning.

Why no numba kernel
-------------------
The gate is one small product (each of the B·T·H logits is a W-long dot product, C
multiply-adds per token in all, against the ~4C² of the projections and the ~2·T·C of the
core) and a broadcast multiply over o: a few passes over arrays the layer reads anyway.
Measured at the study's shape (B=16, T=128, C=128, H=4, float32; one thread, best of 30
runs, the project's shared 2-core Intel Xeon): forward + backward of this pair take 1.2 ms,
a MultiHeadAttention forward + backward without the gate (numba core and layers) 48 ms, so
the gate is about 2.5% of the layer, and a kernel could save only part of that (the arrays
must still be read and written once).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad, check_same_dtype, check_shape
from .silu import _sigmoid


class HeadGateCache(NamedTuple):
    x: np.ndarray  # (B, T, C) the gate's input
    o: np.ndarray  # (B, H, T, Dv) the gated values
    weight: np.ndarray  # (H, W), W = C / H
    a: np.ndarray  # (B, T, H) the logits
    g: np.ndarray  # (B, T, H) the gates σ(a)


def _check_head_gate_inputs(x, o, weight, bias) -> None:
    """x (B, T, C), o (B, H, T, Dv), weight (H, C/H), bias (H,): float, finite, one dtype."""
    check_float(x, "x")
    check_float(o, "o")
    check_float(weight, "weight")
    check_float(bias, "bias")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, T, C) (the attention's input), got {x.shape}")
    if o.ndim != 4:
        raise ValueError(f"o must have shape (B, H, T, Dv) (the attention core's output), "
                         f"got {o.shape}")
    B, T, C = x.shape
    H = o.shape[1]
    if o.shape[0] != B or o.shape[2] != T:
        raise ValueError(f"o has shape {o.shape} but x has shape {x.shape}: o must be "
                         f"(B={B}, H, T={T}, Dv), one row per token of x")
    if C % H:
        raise ValueError(f"the gate splits x's C={C} channels into H={H} head slices "
                         f"(o.shape[1]); C must be divisible by H")
    check_shape(weight, (H, C // H), "weight", f"(H, C/H) with H={H} heads, C={C}")
    check_shape(bias, (H,), "bias", f"(H,) with H={H} heads")
    check_same_dtype(x, "x", o=o, weight=weight, bias=bias)


def head_gate_forward(x: np.ndarray, o: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """``y[b,h,t,:] = σ(x_h[b,t] · weight[h] + bias[h]) · o[b,h,t,:]``.

    x: (B, T, C), o: (B, H, T, Dv), weight: (H, C/H), bias: (H,)  →  y: (B, H, T, Dv)
    """
    _check_head_gate_inputs(x, o, weight, bias)
    B, T, C = x.shape
    H = weight.shape[0]
    x_heads = x.reshape(B, T, H, C // H)  # (B, T, H, W)
    a = np.einsum("bthw,hw->bth", x_heads, weight) + bias  # logits  (B, T, H)
    g = _sigmoid(a)  # gates  (B, T, H)
    y = o * g.transpose(0, 2, 1)[..., None]  # (B, H, T, Dv)
    return y, HeadGateCache(x, o, weight, a, g)


def head_gate_backward(dy: np.ndarray, cache: HeadGateCache):
    """Returns ``(dx, do, dweight, dbias)``: (B, T, C), (B, H, T, Dv), (H, W), (H,)."""
    x, o, weight, a, g = cache
    dy = check_grad(dy, o.shape, o.dtype)
    B, T, C = x.shape
    H = weight.shape[0]
    # forward: y = g ⊙ o (g broadcast over Dv), so do = g ⊙ dy
    do = dy * g.transpose(0, 2, 1)[..., None]  # (B, H, T, Dv)
    # and ∂ℓ/∂g = ⟨dy, o⟩ over Dv; forward: g = σ(a), so da = σ(a) σ(−a) ⟨dy, o⟩
    dg = np.einsum("bhtd,bhtd->bth", dy, o)  # (B, T, H)
    da = dg * g * _sigmoid(-a)  # (B, T, H)
    # forward: a = x_h · weight[h] + bias[h]
    x_heads = x.reshape(B, T, H, C // H)  # (B, T, H, W)
    dweight = np.einsum("bth,bthw->hw", da, x_heads)  # Σ_{b,t} da x_h  (H, W)
    dbias = da.sum(axis=(0, 1))  # (H,)
    dx = (da[..., None] * weight).reshape(B, T, C)  # da · weight[h]  (B, T, C)
    return dx, do, dweight, dbias
