"""Normalisation modules: ``LayerNorm`` (2017 → PaLM) and ``RMSNorm`` (Llama).

The maths is in :mod:`npformer.functional.layernorm` and :mod:`npformer.functional.rmsnorm`;
these classes own ``weight`` (C,) (initialised to 1) and, for LayerNorm, an optional
``bias`` (C,) (initialised to 0; PaLM and Cohere have none). ``RMSNorm(unit_offset=True)``
is Gemma's: it scales by (1 + weight) and initialises the weight to 0.

``impl`` picks the pair: ``"numba"`` the fused one-pass kernels of
:mod:`npformer.kernels.norms`, ``"numpy"`` the functional reference (same caches, same
results to rounding).
"""

from __future__ import annotations

import numpy as np

from ..config import check_impl
from ..functional import layernorm as layernorm_reference
from ..functional import rmsnorm as rmsnorm_reference
from ..kernels import norms as norm_kernels
from .module import Module

_LAYERNORM = {"numpy": (layernorm_reference.layernorm_forward, layernorm_reference.layernorm_backward),
              "numba": (norm_kernels.layernorm_forward, norm_kernels.layernorm_backward)}
_RMSNORM = {"numpy": (rmsnorm_reference.rmsnorm_forward, rmsnorm_reference.rmsnorm_backward),
            "numba": (norm_kernels.rmsnorm_forward, norm_kernels.rmsnorm_backward)}


class LayerNorm(Module):
    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, dtype=np.float64,
                 impl: str = "numpy") -> None:
        super().__init__()
        self.eps = eps
        self.pair = _LAYERNORM[check_impl(impl)]  # (forward, backward)
        self.add_parameter("weight", np.ones(d_model, dtype=dtype))
        if bias:
            self.add_parameter("bias", np.zeros(d_model, dtype=dtype))

    def forward(self, x: np.ndarray):
        """x (..., C) → y (..., C)."""
        return self.pair[0](x, self.params["weight"], self.params.get("bias"), self.eps)

    def backward(self, dy: np.ndarray, cache) -> np.ndarray:
        dx, dweight, dbias = self.pair[1](dy, cache)
        self.accumulate("weight", dweight)
        self.accumulate("bias", dbias)
        return dx


class RMSNorm(Module):
    def __init__(self, d_model: int, eps: float = 1e-6, dtype=np.float64, impl: str = "numpy",
                 unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.pair = _RMSNORM[check_impl(impl)]  # (forward, backward)
        self.unit_offset = unit_offset  # Gemma: y = x̂ ⊙ (1 + w), w starts at 0
        self.add_parameter("weight", (np.zeros if unit_offset else np.ones)(d_model, dtype=dtype))

    def forward(self, x: np.ndarray):
        """x (..., C) → y (..., C)."""
        return self.pair[0](x, self.params["weight"], self.eps, self.unit_offset)

    def backward(self, dy: np.ndarray, cache) -> np.ndarray:
        dx, dweight = self.pair[1](dy, cache)
        self.accumulate("weight", dweight)
        return dx


def make_norm(config) -> Module:
    """The norm a :class:`~npformer.config.ModelConfig` asks for."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps, dtype=config.np_dtype, impl=config.layer_impl,
                       unit_offset=config.norm_unit_offset)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.norm_bias, dtype=config.np_dtype,
                     impl=config.layer_impl)
