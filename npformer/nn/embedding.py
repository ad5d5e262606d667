"""``Embedding`` module: owns ``weight`` (V, C); the maths is in
:mod:`npformer.functional.embedding`.

``as_head`` uses the same matrix as the output layer (tied embeddings, GPT-1/2, PaLM):
``logits = x Wᵀ``. Both uses add into the one gradient, as the chain rule requires:
``dW = scatter_add(d_embedded, ids) + d_logitsᵀ x``.

``impl="numba"``: the scatter-add runs as the loop of :mod:`npformer.kernels.embedding`,
straight into the gradient (``np.add.at`` is a slow generic loop).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._validate import check_int
from ..config import check_impl
from ..functional.embedding import embedding_backward, embedding_forward
from ..functional.linear import linear_backward, linear_forward
from ..kernels import embedding as embedding_kernels
from .module import Module


class Embedding(Module):
    def __init__(self, vocab_size: int, d_model: int, *, padding_idx: Optional[int] = None,
                 rng: Optional[np.random.Generator] = None, init_std: float = 0.02,
                 dtype=np.float64, impl: str = "numpy") -> None:
        super().__init__()
        self.fused = check_impl(impl) == "numba"
        vocab_size = check_int(vocab_size, "vocab_size", 1)
        d_model = check_int(d_model, "d_model", 1)
        rng = np.random.default_rng(0) if rng is None else rng
        self.padding_idx = padding_idx
        self.add_parameter("weight", (rng.standard_normal((vocab_size, d_model)) * init_std).astype(dtype))

    def forward(self, ids: np.ndarray):
        """ids (...) integers → (..., C)."""
        return embedding_forward(ids, self.params["weight"], self.padding_idx)

    def backward(self, dout: np.ndarray, cache) -> None:
        """Adds dW (V, C) into ``grads``; ids have no gradient."""
        if self.fused:
            embedding_kernels.embedding_backward(dout, cache, add_into=self.grads["weight"])
        else:
            self.accumulate("weight", embedding_backward(dout, cache))

    def as_head_forward(self, x: np.ndarray):
        """The tied output layer: x (..., C) → logits (..., V) = x Wᵀ."""
        return linear_forward(x, self.params["weight"])

    def as_head_backward(self, dlogits: np.ndarray, cache) -> np.ndarray:
        """Adds this use's dW = dlogitsᵀ x into ``grads``; returns dx (..., C)."""
        dx, dweight, _ = linear_backward(dlogits, cache)
        self.accumulate("weight", dweight)
        return dx
