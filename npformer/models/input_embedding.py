"""The input stage: token ids → the residual stream's first value.

    e = W_tok[ids]                    (B, T, C)   or the caller's ``inputs_embeds``
    e = √C · e                        (2017 only: ``scale_embeddings``)
    x = e + P[position_ids]           learned (GPT-1 … GPT-Neo) or sinusoidal (2017) table;
                                      RoPE models add nothing here (positions enter q and k)
    x = drop(x)

Backward, line by line in reverse: dropout's mask; the position table gets dx scatter-added
into the rows of the positions used (learned) or nothing (sinusoidal is a constant); the
scale multiplies; the token table gets a scatter-add into the rows of ``ids``.
``backward`` returns de (B, T, C), the gradient with respect to the token vectors — the
"input embedding path" that the gradient checker verifies on its own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_float, check_shape
from ..config import ModelConfig
from ..functional.positions import (
    learned_positions_backward,
    learned_positions_forward,
    sinusoidal_backward,
    sinusoidal_forward,
)
from ..kernels import embedding as embedding_kernels
from ..nn.embedding import Embedding
from ..nn.module import Module
from .blocks import Dropout


class InputEmbeddingCache(NamedTuple):
    tokens: object  # embedding cache, or None when inputs_embeds were given
    positions: object  # learned / sinusoidal cache, or None
    dropout: object
    scale: float  # √C or 1


class InputEmbedding(Module):
    """Owns ``tokens.weight`` (V, C) and, for learned positions, ``position_table`` (P, C)."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator) -> None:
        super().__init__()
        self.config = config
        self.tokens = Embedding(config.vocab_size, config.d_model, padding_idx=config.padding_idx,
                                rng=rng, init_std=config.init_std, dtype=config.np_dtype,
                                impl=config.layer_impl)
        if config.positions == "learned":
            table = rng.standard_normal((config.max_seq_len, config.d_model)) * config.init_std
            self.add_parameter("position_table", table.astype(config.np_dtype))
        self.scale = float(np.sqrt(config.d_model)) if config.scale_embeddings else 1.0

    def forward(self, ids: Optional[np.ndarray], position_ids: np.ndarray, dropout: Dropout, *,
                inputs_embeds: Optional[np.ndarray] = None):
        """ids (B, T) or inputs_embeds (B, T, C); position_ids (T,) or (B, T) → x (B, T, C)."""
        if inputs_embeds is not None:
            e = check_float(inputs_embeds, "inputs_embeds")
            if e.ndim != 3 or e.shape[-1] != self.config.d_model:
                raise ValueError(f"inputs_embeds must have shape (B, T, d_model="
                                 f"{self.config.d_model}), got {e.shape}")
            if e.dtype != self.config.np_dtype:
                raise ValueError(f"inputs_embeds has dtype {e.dtype}; the model is {self.config.dtype}")
            tokens = None
        else:
            e, tokens = self.tokens.forward(ids)  # (B, T, C)
        if self.scale != 1.0:
            e = e * self.scale  # 2017: "we multiply those weights by √d_model"
        positions = None
        if self.config.positions == "learned":
            e, positions = learned_positions_forward(e, self.params["position_table"], position_ids)
        elif self.config.positions == "sinusoidal":
            e, positions = sinusoidal_forward(e, position_ids)
        x, drop = dropout.forward(e)
        return x, InputEmbeddingCache(tokens, positions, drop, self.scale)

    def backward(self, dx: np.ndarray, cache: InputEmbeddingCache) -> np.ndarray:
        """Adds the token (and position) table gradients; returns de (B, T, C)."""
        # forward: x = drop(e + P[pos])
        de = Dropout.backward(dx, cache.dropout, self.config.layer_impl == "numba")
        if self.config.positions == "learned" and self.config.layer_impl == "numba":
            # forward: x = e + P[pos]: de = dx, and dP scatter-added straight into the gradient
            embedding_kernels.embedding_backward(de, cache.positions.lookup,
                                                 add_into=self.grads["position_table"])
        elif self.config.positions == "learned":
            de, dtable = learned_positions_backward(de, cache.positions)
            self.accumulate("position_table", dtable)
        elif self.config.positions == "sinusoidal":
            de = sinusoidal_backward(de, cache.positions)
        # forward: e = scale · W[ids]
        de = de * cache.scale
        if cache.tokens is not None:
            self.tokens.backward(de, cache.tokens)
        return de


def check_token_ids(ids, name: str, vocab_size: int) -> np.ndarray:
    """ids must be a (B, T) integer array with T ≥ 1 (values are checked by the embedding)."""
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise ValueError(f"{name} must be a (B, T) integer array of token ids with B, T ≥ 1, got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integers (token ids < vocab_size={vocab_size}), "
                         f"got dtype {ids.dtype}")
    return ids


def check_row_ids(values, name: str, shape: tuple) -> Optional[np.ndarray]:
    """doc_ids / padding masks: None, or an array of exactly ``shape`` (B, T)."""
    if values is None:
        return None
    if not isinstance(values, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape {shape}, got {type(values).__name__}")
    check_shape(values, shape, name, " (one entry per token, (B, T))")
    return values
