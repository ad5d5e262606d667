"""Gated feed-forward blocks: SwiGLU and GeGLU (exact or tanh GeLU).

Shazeer (2020), "GLU Variants Improve Transformer", replaces the FFN ``act(x W₁) W₂`` by a
gated one: one projection goes through the activation, a second (the "up" projection)
multiplies it elementwise, and a third projects back down to the model width:

    g = x W_gateᵀ                 (..., F)    gate pre-activation
    u = x W_upᵀ                   (..., F)
    a = act(g)                    (..., F)    SiLU for SwiGLU, GeLU for GeGLU
    h = a ⊙ u                     (..., F)
    y = h W_downᵀ                 (..., C)

SwiGLU (act = SiLU, a.k.a. Swish₁) is the FFN of PaLM and Llama 1/2/3; GeGLU (act = GeLU) is
T5 v1.1's "gated-gelu" and Gemma's, both with the tanh GeLU (Hugging Face's
``gelu_pytorch_tanh``): :func:`geglu_tanh_forward`, ``ffn="geglu_tanh"``,

    a = gelu_tanh(g) = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³)))

whose derivative is in :mod:`.gelu`; the gating algebra below is the same for every act. Weights use torch's (out, in) layout and
Llama's names: ``w_gate`` = gate_proj (F, C), ``w_up`` = up_proj (F, C), ``w_down`` =
down_proj (C, F). There are no biases: Shazeer's variants omit them, and PaLM (no biases in
any dense kernel) and Llama have none. Because of the third matrix, models shrink F to
keep the parameter count (Llama 1: F ≈ 8C/3 rounded up to a multiple of 256); that rounding is
a config matter, not this file's.

Derivation
----------
Each line above is a piece with its own backward: :mod:`.linear` for the three projections,
:mod:`.silu` / :mod:`.gelu` for the activation. Given dy = ∂ℓ/∂y, run them in reverse:

    y = h W_downᵀ         →  dh = dy W_down,             dW_down = Σ_n dyᵀ h
    h = act(g) ⊙ u        →  dg = dh ⊙ u ⊙ act'(g),      du = dh ⊙ act(g)
    g = x W_gateᵀ         →  dx_g = dg W_gate,           dW_gate = Σ_n dgᵀ x
    u = x W_upᵀ           →  dx_u = du W_up,             dW_up = Σ_n duᵀ x

x feeds two branches, so its gradients add: dx = dg W_gate + du W_up.
(Σ_n sums over every leading position, as in :mod:`.linear`.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_same_dtype, check_shape
from .gelu import _check_approximate, gelu_backward, gelu_forward
from .linear import LinearCache, linear_backward, linear_forward
from .silu import silu_backward, silu_forward

# The activation's backward, by the name kept in the cache.
_ACTIVATION_BACKWARD = {"silu": silu_backward, "gelu": gelu_backward}


class GluCache(NamedTuple):
    gate: LinearCache  # g = x W_gateᵀ
    up: LinearCache  # u = x W_upᵀ
    activation: str  # "silu" or "gelu"
    act: tuple  # the activation's cache (SiluCache or GeluCache)
    a: np.ndarray  # act(g)    (..., F)
    u: np.ndarray  # x W_upᵀ   (..., F)
    down: LinearCache  # y = h W_downᵀ


def _check_glu_inputs(x, w_gate, w_up, w_down, approximate=None):
    """x (..., C), w_gate and w_up (F, C), w_down (C, F), one float dtype, all finite; with
    ``approximate`` (GeGLU) also the GeLU form, checked first and returned."""
    if approximate is not None:
        approximate = _check_approximate(approximate)
    check_float(x, "x", min_ndim=1)
    for name, weight in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_float(weight, name)
    check_same_dtype(x, "x", w_gate=w_gate, w_up=w_up, w_down=w_down)
    if w_gate.ndim != 2:
        raise ValueError(
            f"w_gate must be 2-D (F, C) as in torch.nn.Linear, got shape {w_gate.shape}"
        )
    ffn_width, width = w_gate.shape
    if x.shape[-1] != width:
        raise ValueError(
            f"x has {x.shape[-1]} features (x.shape[-1]) but w_gate expects C = {width} "
            f"(w_gate is (F, C) = {w_gate.shape})"
        )
    check_shape(w_up, (ffn_width, width), "w_up", "(F, C), the shape of w_gate")
    check_shape(
        w_down, (width, ffn_width), "w_down", f"(C, F) with (F, C) = w_gate.shape {w_gate.shape}"
    )
    return approximate


def _glu_forward(x, w_gate, w_up, w_down, activation, act_forward):
    """The gated FFN on checked inputs; act_forward(g) -> (act(g), its cache)."""
    g, gate_cache = linear_forward(x, w_gate)  # g = x W_gateᵀ    (..., F)
    u, up_cache = linear_forward(x, w_up)  # u = x W_upᵀ      (..., F)
    a, act_cache = act_forward(g)  # a = act(g)       (..., F)
    h = a * u  # h = a ⊙ u        (..., F)
    y, down_cache = linear_forward(h, w_down)  # y = h W_downᵀ    (..., C)
    return y, GluCache(gate_cache, up_cache, activation, act_cache, a, u, down_cache)


def _glu_backward(dy, cache: GluCache):
    act_backward = _ACTIVATION_BACKWARD[cache.activation]
    # forward: y = h W_downᵀ, so dh = dy W_down, dW_down = dyᵀ h   (dy is checked here)
    dh, dw_down, _ = linear_backward(dy, cache.down)  # (..., F), (C, F)
    # forward: h = a ⊙ u, so da = dh ⊙ u and du = dh ⊙ a
    da = dh * cache.u  # (..., F)
    du = dh * cache.a  # (..., F)
    # forward: a = act(g), so dg = da ⊙ act'(g) = dh ⊙ u ⊙ act'(g)
    dg = act_backward(da, cache.act)  # (..., F)
    # forward: g = x W_gateᵀ and u = x W_upᵀ, so dx = dg W_gate + du W_up
    dx_gate, dw_gate, _ = linear_backward(dg, cache.gate)  # (..., C), (F, C)
    dx_up, dw_up, _ = linear_backward(du, cache.up)  # (..., C), (F, C)
    dx = dx_gate + dx_up  # (..., C)
    return dx, dw_gate, dw_up, dw_down


def swiglu_forward(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray):
    """SwiGLU FFN: ``y = (silu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_downᵀ`` (PaLM, Llama).

    x: (..., C), w_gate: (F, C), w_up: (F, C), w_down: (C, F)  →  y: (..., C)
    """
    _check_glu_inputs(x, w_gate, w_up, w_down)
    return _glu_forward(x, w_gate, w_up, w_down, "silu", silu_forward)


def swiglu_backward(dy: np.ndarray, cache: GluCache):
    """Returns ``(dx, dw_gate, dw_up, dw_down)``: (..., C), (F, C), (F, C), (C, F)."""
    return _glu_backward(dy, cache)


def geglu_forward(
    x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
    approximate: str = "none",
):
    """GeGLU FFN: ``y = (gelu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_downᵀ``.

    approximate: "none" (exact erf GeLU) or "tanh" (T5 v1.1 "gated-gelu", Gemma); see
    :mod:`.gelu`.  x: (..., C), w_gate: (F, C), w_up: (F, C), w_down: (C, F)  →  y: (..., C)
    """
    approximate = _check_glu_inputs(x, w_gate, w_up, w_down, approximate)
    act_forward = functools.partial(gelu_forward, approximate=approximate)  # a = gelu(g)
    return _glu_forward(x, w_gate, w_up, w_down, "gelu", act_forward)


def geglu_backward(dy: np.ndarray, cache: GluCache):
    """Returns ``(dx, dw_gate, dw_up, dw_down)``: (..., C), (F, C), (F, C), (C, F)."""
    return _glu_backward(dy, cache)


def geglu_tanh_forward(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray):
    """GeGLU with the tanh GeLU (Gemma's ``gelu_pytorch_tanh``, T5 v1.1):
    ``y = (gelu_tanh(x W_gateᵀ) ⊙ (x W_upᵀ)) W_downᵀ``; ``ffn="geglu_tanh"``.

    x: (..., C), w_gate: (F, C), w_up: (F, C), w_down: (C, F)  →  y: (..., C)
    """
    return geglu_forward(x, w_gate, w_up, w_down, "tanh")


def geglu_tanh_backward(dy: np.ndarray, cache: GluCache):
    """Returns ``(dx, dw_gate, dw_up, dw_down)``; the GeLU form travels in the cache, so
    this is :func:`geglu_backward`: dg = dh ⊙ u ⊙ gelu_tanh'(g)."""
    return _glu_backward(dy, cache)
