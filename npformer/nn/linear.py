"""``Linear`` module: owns ``weight`` (out, in) and optionally ``bias`` (out,).

The maths is in :mod:`npformer.functional.linear`; this class only holds the parameters and
adds their gradients into ``grads``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._validate import check_int
from ..functional.linear import linear_backward, linear_forward
from .module import Module


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rng: Optional[np.random.Generator] = None, init_std: float = 0.02,
                 dtype=np.float64) -> None:
        super().__init__()
        in_features = check_int(in_features, "in_features", 1)
        out_features = check_int(out_features, "out_features", 1)
        rng = np.random.default_rng(0) if rng is None else rng
        self.in_features = in_features
        self.out_features = out_features
        # weight ~ N(0, init_std²) (GPT-2's 0.02), bias = 0
        self.add_parameter("weight", (rng.standard_normal((out_features, in_features)) * init_std).astype(dtype))
        if bias:
            self.add_parameter("bias", np.zeros(out_features, dtype=dtype))

    @property
    def has_bias(self) -> bool:
        return "bias" in self.params

    def forward(self, x: np.ndarray):
        """x (..., in) → y (..., out)."""
        return linear_forward(x, self.params["weight"], self.params.get("bias"))

    def backward(self, dy: np.ndarray, cache) -> np.ndarray:
        """Adds dW (and db) into ``grads``; returns dx (..., in)."""
        dx, dweight, dbias = linear_backward(dy, cache)
        self.accumulate("weight", dweight)
        self.accumulate("bias", dbias)
        return dx
