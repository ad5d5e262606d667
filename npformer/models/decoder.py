"""``DecoderLM``: the decoder-only language model of GPT-1 onward.

Forward (one direction, ids → logits):

    x = input_embedding(ids)            (B, T, C)   tokens (+ learned/sinusoidal positions)
    x = block_l(x)  for l = 0 … L−1     (B, T, C)   post-norm, pre-norm or parallel blocks
    x = final_norm(x)                   (B, T, C)   GPT-2 onward
    logits = s · head(x)                (B, T, V)   head = W_tokᵀ when tied; s = logit_scale

Backward runs the same list in reverse. With tied embeddings the token table is used twice
(lookup at the bottom, head at the top) and its gradient is the sum of both uses:
``dW_tok = scatter_add(de, ids) + s · dlogitsᵀ x``.

The convenient interface keeps the last forward's cache on the model:

    logits = model.forward(ids, doc_ids=None)      # (B, T) → (B, T, V)
    model.zero_grad()
    model.backward(dlogits)                        # adds ∂L/∂θ into every gradient

and ``forward_with_cache`` / ``backward_with_cache`` are the same pair with the cache as a
value, for callers that run several forwards before their backwards.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import numpy as np

from .._validate import check_float, check_grad, check_ids
from ..config import ModelConfig
from ..nn.attention import KVCache
from ..nn.module import ModuleList
from ..nn.norm import make_norm
from .blocks import Dropout, make_block
from .input_embedding import InputEmbedding, check_row_ids, check_token_ids
from .language_model import LanguageModel


class DecoderCache(NamedTuple):
    embedding: object
    blocks: list
    final_norm: object
    head: object
    logits_shape: tuple
    logits_dtype: np.dtype


class DecoderLM(LanguageModel):
    """Decoder-only language model built from a :class:`~npformer.config.ModelConfig`.

    seed: initialises the weights (N(0, init_std²) matrices, unit norm weights, zero biases)
    and, separately, the dropout generator ``dropout_rng``.
    """

    architecture = "decoder"

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        rng = self._start(config, seed)
        self.embed = InputEmbedding(config, rng)
        self.layers = ModuleList(make_block(config, layer, rng) for layer in range(config.n_layers))
        if config.final_norm:
            self.final_norm = make_norm(config)
        self._add_head(rng)

    def new_kv_caches(self) -> List[KVCache]:
        """One empty :class:`KVCache` per layer, for incremental decoding."""
        return [KVCache() for _ in range(self.config.n_layers)]

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, ids: Optional[np.ndarray] = None, doc_ids: Optional[np.ndarray] = None, *,
                inputs_embeds: Optional[np.ndarray] = None, key_padding_mask=None,
                kv_caches: Optional[List[KVCache]] = None) -> np.ndarray:
        """ids (B, T) → logits (B, T, V). Keeps the cache for :meth:`backward`.

        doc_ids (B, T): integer document ids; a token attends only to tokens of its own
        document (Llama 3's mask for packed sequences). key_padding_mask (B, S) True = pad.
        inputs_embeds (B, T, C): token vectors instead of ids (the embedding lookup is skipped).
        kv_caches: from :meth:`new_kv_caches`, for decoding (no backward afterwards).
        """
        logits, cache = self.forward_with_cache(ids, doc_ids, inputs_embeds=inputs_embeds,
                                                key_padding_mask=key_padding_mask,
                                                kv_caches=kv_caches)
        self._last_cache = None if kv_caches is not None else cache
        return logits

    def forward_with_cache(self, ids=None, doc_ids=None, *, inputs_embeds=None,
                           key_padding_mask=None, kv_caches=None):
        """The pure form of :meth:`forward`: returns ``(logits, cache)``."""
        config = self.config
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of ids (B, T) and inputs_embeds (B, T, C)")
        if ids is not None:
            ids = check_ids(check_token_ids(ids, "ids", config.vocab_size), "ids", config.vocab_size)
            B, T = ids.shape
        else:
            if not isinstance(inputs_embeds, np.ndarray) or inputs_embeds.ndim != 3:
                raise ValueError(f"inputs_embeds must be a (B, T, C) array, got "
                                 f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
            check_float(inputs_embeds, "inputs_embeds")  # at the door: no NaN/inf inside
            B, T = inputs_embeds.shape[:2]
        doc_ids = check_row_ids(doc_ids, "doc_ids", (B, T))
        if kv_caches is not None and len(kv_caches) != config.n_layers:
            raise ValueError(f"kv_caches must hold one KVCache per layer ({config.n_layers}), "
                             f"got {len(kv_caches)}")
        past = 0 if kv_caches is None else kv_caches[0].length
        if past + T > config.max_seq_len:
            raise ValueError(f"sequence of {past + T} positions exceeds max_seq_len="
                             f"{config.max_seq_len}; raise max_seq_len in the config")
        position_ids = past + np.arange(T)  # (T,)
        dropout = Dropout(config.dropout, self.dropout_rng, self.training,
                          fused=config.layer_impl == "numba")
        with self._inner_loop():  # finite values vouched for at the door (fused path)
            x, embedding = self.embed.forward(ids, position_ids, dropout, inputs_embeds=inputs_embeds)
            block_caches = []
            for layer, block in enumerate(self.layers):
                x, block_cache = block.forward(
                    x, dropout, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
                    position_ids=position_ids,
                    kv_cache=None if kv_caches is None else kv_caches[layer])
                block_caches.append(block_cache)
            final = None
            if config.final_norm:
                x, final = self.final_norm.forward(x)  # (B, T, C)
            logits, head = self._head_forward(x)  # (B, T, V)
            cache = DecoderCache(embedding, block_caches, final, head, logits.shape, logits.dtype)
            return logits, cache

    # ---- backward --------------------------------------------------------------------------

    def backward_with_cache(self, dlogits: np.ndarray, cache: DecoderCache) -> np.ndarray:
        """The pure form of ``backward``: adds every parameter gradient and returns the gradient
        with respect to the token vectors (B, T, C)."""
        config = self.config
        dlogits = check_grad(dlogits, cache.logits_shape, cache.logits_dtype, "dlogits")
        with self._inner_loop():
            dx = self._head_backward(dlogits, cache.head)  # (B, T, C); the head's share of dW_tok
            if config.final_norm:
                dx = self.final_norm.backward(dx, cache.final_norm)
            for block, block_cache in zip(reversed(self.layers), reversed(cache.blocks)):
                dx = block.backward(dx, block_cache)
            return self.embed.backward(dx, cache.embedding)  # the lookup's share of dW_tok
