"""Normalisation modules: ``LayerNorm`` (2017 → PaLM) and ``RMSNorm`` (Llama).

The maths is in :mod:`npformer.functional.layernorm` and :mod:`npformer.functional.rmsnorm`;
these classes own ``weight`` (C,) (initialised to 1) and, for LayerNorm, an optional
``bias`` (C,) (initialised to 0; PaLM and Cohere have none).
"""

from __future__ import annotations

import numpy as np

from ..functional.layernorm import layernorm_backward, layernorm_forward
from ..functional.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .module import Module


class LayerNorm(Module):
    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, dtype=np.float64) -> None:
        super().__init__()
        self.eps = eps
        self.add_parameter("weight", np.ones(d_model, dtype=dtype))
        if bias:
            self.add_parameter("bias", np.zeros(d_model, dtype=dtype))

    def forward(self, x: np.ndarray):
        """x (..., C) → y (..., C)."""
        return layernorm_forward(x, self.params["weight"], self.params.get("bias"), self.eps)

    def backward(self, dy: np.ndarray, cache) -> np.ndarray:
        dx, dweight, dbias = layernorm_backward(dy, cache)
        self.accumulate("weight", dweight)
        self.accumulate("bias", dbias)
        return dx


class RMSNorm(Module):
    def __init__(self, d_model: int, eps: float = 1e-6, dtype=np.float64) -> None:
        super().__init__()
        self.eps = eps
        self.add_parameter("weight", np.ones(d_model, dtype=dtype))

    def forward(self, x: np.ndarray):
        """x (..., C) → y (..., C)."""
        return rmsnorm_forward(x, self.params["weight"], self.eps)

    def backward(self, dy: np.ndarray, cache) -> np.ndarray:
        dx, dweight = rmsnorm_backward(dy, cache)
        self.accumulate("weight", dweight)
        return dx


def make_norm(config) -> Module:
    """The norm a :class:`~npformer.config.ModelConfig` asks for."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps, dtype=config.np_dtype)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.norm_bias, dtype=config.np_dtype)
