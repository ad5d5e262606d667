"""``FeedForward``: the position-wise MLP of every block, in its six historical forms.

    relu       y = W₂ relu(W₁ x + b₁) + b₂        (2017)
    gelu       y = W₂ gelu(W₁ x + b₁) + b₂        exact erf GeLU (GPT-NeoX)
    gelu_tanh  y = W₂ gelu_tanh(W₁ x + b₁) + b₂   the tanh form (GPT-1, GPT-2, GPT-Neo, GPT-J)
    swiglu     y = W_down (silu(W_gate x) ⊙ W_up x)   (PaLM, Llama)
    geglu      y = W_down (gelu(W_gate x) ⊙ W_up x)   exact erf GeLU
    geglu_tanh y = W_down (gelu_tanh(W_gate x) ⊙ W_up x)   (T5 v1.1, Gemma: gelu_pytorch_tanh)

Shapes: x (B, T, C), hidden (B, T, F). The plain forms own ``up`` (F, C) and ``down``
(C, F) linears; the gated forms own ``gate``, ``up`` and ``down`` weights without biases
and call the fused pair in :mod:`npformer.functional.glu`.

``impl="numba"`` (the models' default, ``ModelConfig.layer_impl``) runs the activation, or
the gated middle ``h = act(g) ⊙ u``, as one-pass kernels of :mod:`npformer.kernels.activations`
between the same linear products; ``impl="numpy"`` runs the functional pairs above.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..config import check_impl
from ..functional.gelu import gelu_backward, gelu_forward
from ..functional.glu import (geglu_backward, geglu_forward, geglu_tanh_backward,
                              geglu_tanh_forward, swiglu_backward, swiglu_forward)
from ..functional.linear import linear_backward, linear_forward
from ..functional.relu import relu_backward, relu_forward
from ..kernels import activations as activation_kernels
from .linear import Linear
from .module import Module

_ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (lambda h: gelu_forward(h, "none"), gelu_backward),
    "gelu_tanh": (lambda h: gelu_forward(h, "tanh"), gelu_backward),
}
_GATED = {
    "swiglu": (swiglu_forward, swiglu_backward),
    "geglu": (geglu_forward, geglu_backward),
    "geglu_tanh": (geglu_tanh_forward, geglu_tanh_backward),
}
# The same activations as one-pass kernels (impl="numba"); relu stays NumPy (one max).
_FUSED_ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (lambda h: activation_kernels.gelu_forward(h, "none"), activation_kernels.gelu_backward),
    "gelu_tanh": (lambda h: activation_kernels.gelu_forward(h, "tanh"), activation_kernels.gelu_backward),
}
_FUSED_GATED = {"swiglu": ("silu", "none"), "geglu": ("gelu", "none"),
                "geglu_tanh": ("gelu", "tanh")}  # (activation, approximate)


class FeedForwardCache(NamedTuple):
    up: object  # linear cache (plain) or the fused GLU cache (gated)
    activation: object  # activation cache (plain) or None
    down: object  # linear cache (plain) or None


class FeedForward(Module):
    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", bias: bool = True, *,
                 rng: Optional[np.random.Generator] = None, init_std: float = 0.02,
                 down_init_std: Optional[float] = None, dtype=np.float64,
                 impl: str = "numpy") -> None:
        super().__init__()
        self.fused = check_impl(impl) == "numba"
        if kind not in _ACTIVATIONS and kind not in _GATED:
            raise ValueError(f"unknown FFN kind {kind!r}; valid: {list(_ACTIVATIONS) + list(_GATED)}")
        if kind in _GATED and bias:
            raise ValueError(f"the {kind} FFN has no biases here (PaLM, Llama); pass bias=False")
        rng = np.random.default_rng(0) if rng is None else rng
        down_std = init_std if down_init_std is None else down_init_std
        self.kind = kind
        if kind in _GATED:
            self.gate = Linear(d_model, d_ff, False, rng=rng, init_std=init_std, dtype=dtype)
        self.up = Linear(d_model, d_ff, bias, rng=rng, init_std=init_std, dtype=dtype)
        self.down = Linear(d_ff, d_model, bias, rng=rng, init_std=down_std, dtype=dtype)

    def forward(self, x: np.ndarray):
        """x (B, T, C) → y (B, T, C)."""
        if self.fused and self.kind in _GATED:
            return self._fused_gated_forward(x)
        if self.kind in _GATED:
            fused_forward, _ = _GATED[self.kind]
            y, cache = fused_forward(x, self.gate.params["weight"], self.up.params["weight"],
                                     self.down.params["weight"])
            return y, FeedForwardCache(cache, None, None)
        activation_forward, _ = (_FUSED_ACTIVATIONS if self.fused else _ACTIVATIONS)[self.kind]
        h, up = self.up.forward(x)  # (B, T, F)
        a, activation = activation_forward(h)  # (B, T, F)
        y, down = self.down.forward(a)  # (B, T, C)
        return y, FeedForwardCache(up, activation, down)

    def backward(self, dy: np.ndarray, cache: FeedForwardCache) -> np.ndarray:
        if self.fused and self.kind in _GATED:
            return self._fused_gated_backward(dy, cache)
        if self.kind in _GATED:
            _, fused_backward = _GATED[self.kind]
            dx, dgate, dup, ddown = fused_backward(dy, cache.up)
            self.gate.accumulate("weight", dgate)
            self.up.accumulate("weight", dup)
            self.down.accumulate("weight", ddown)
            return dx
        _, activation_backward = (_FUSED_ACTIVATIONS if self.fused else _ACTIVATIONS)[self.kind]
        # forward: y = down(a), a = act(h), h = up(x)
        da = self.down.backward(dy, cache.down)  # (B, T, F)
        dh = activation_backward(da, cache.activation)  # (B, T, F)
        return self.up.backward(dh, cache.up)  # (B, T, C)

    # ---- the gated forms with the elementwise middle as one kernel (impl="numba") ---------

    def _fused_gated_forward(self, x: np.ndarray):
        """The maths of functional.glu, with ``h = act(g) ⊙ u`` in one pass."""
        activation, approximate = _FUSED_GATED[self.kind]
        g, gate = linear_forward(x, self.gate.params["weight"])  # g = x W_gateᵀ   (B, T, F)
        u, up = linear_forward(x, self.up.params["weight"])  # u = x W_upᵀ     (B, T, F)
        h, middle = activation_kernels.glu_forward(g, u, activation, approximate)  # (B, T, F)
        y, down = linear_forward(h, self.down.params["weight"])  # y = h W_downᵀ  (B, T, C)
        return y, FeedForwardCache((gate, up), middle, down)

    def _fused_gated_backward(self, dy: np.ndarray, cache: FeedForwardCache) -> np.ndarray:
        gate, up = cache.up
        # forward: y = h W_downᵀ
        dh, dw_down, _ = linear_backward(dy, cache.down)  # (B, T, F), (C, F)
        # forward: h = act(g) ⊙ u: du = dh ⊙ act(g), dg = dh ⊙ u ⊙ act'(g)
        dg, du = activation_kernels.glu_backward(dh, cache.activation)  # (B, T, F) each
        # forward: g = x W_gateᵀ, u = x W_upᵀ: dx = dg W_gate + du W_up
        dx, dw_gate, _ = linear_backward(dg, gate)  # (B, T, C), (F, C)
        dx_up, dw_up, _ = linear_backward(du, up)
        dx += dx_up
        self.gate.accumulate("weight", dw_gate)
        self.up.accumulate("weight", dw_up)
        self.down.accumulate("weight", dw_down)
        return dx
