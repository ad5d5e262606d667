"""``EncoderDecoder``: the 2017 Transformer ("Attention Is All You Need").

    m = encoder(src_ids)                 (B, S, C)  embedding, then N blocks of bidirectional
                                                    self-attention + FFN (post-LN)
    x = decoder(tgt_ids, m)              (B, T, C)  embedding, then N blocks of causal
                                                    self-attention, cross-attention over m, FFN
    logits = head(x)                     (B, T, V)

Embeddings: one matrix shared by the source embedding, the target embedding and the
pre-softmax layer (``tie_embeddings``), multiplied by √C on the way in (``scale_embeddings``),
plus fixed sinusoidal positions. The paper's model has no final norm after either stack;
``torch.nn.Transformer`` adds one to each — ``final_norm=True`` builds that variant
(``encoder_norm`` and ``decoder_norm``).

Backward: the decoder runs in reverse first; every cross-attention layer returns a gradient
for the memory m, and since all N decoder layers read the same m, those gradients add up
before flowing back through the encoder:  dm = Σ_l ∂L/∂m through cross-attention l.
With shared embeddings the table's gradient collects three uses: source lookup, target
lookup and the output layer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_grad, check_ids
from ..config import ModelConfig
from ..nn.module import ModuleList
from ..nn.norm import make_norm
from .blocks import Dropout, SequentialBlock
from .input_embedding import InputEmbedding, check_row_ids, check_token_ids
from .language_model import LanguageModel


class EncoderDecoderCache(NamedTuple):
    src_embedding: object
    encoder: list
    encoder_norm: object
    tgt_embedding: object
    decoder: list
    decoder_norm: object
    head: object
    logits_shape: tuple
    logits_dtype: np.dtype


class EncoderDecoder(LanguageModel):
    """The 2017 encoder-decoder, built from a config with ``architecture="encoder-decoder"``.

    Parameters: ``embed`` (shared, or the target's when untied), ``src_embed`` (untied only),
    ``encoder.{l}.*`` and ``decoder.{l}.*`` blocks (decoder blocks add ``cross_attn`` and
    ``cross_norm``), optional ``encoder_norm`` / ``decoder_norm``, ``lm_head`` (untied only).
    """

    architecture = "encoder-decoder"

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        rng = self._start(config, seed)
        self.embed = InputEmbedding(config, rng)
        if not config.tie_embeddings:
            self.src_embed = InputEmbedding(config, rng)
        self.encoder = ModuleList(SequentialBlock(config, layer, rng, causal=False)
                                  for layer in range(config.encoder_layers))
        self.decoder = ModuleList(SequentialBlock(config, layer, rng, cross=True)
                                  for layer in range(config.n_layers))
        if config.final_norm:
            self.encoder_norm = make_norm(config)
            self.decoder_norm = make_norm(config)
        self._add_head(rng)

    @property
    def source_embedding(self) -> InputEmbedding:
        return self.embed if self.config.tie_embeddings else self.src_embed

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, *,
                src_padding_mask: Optional[np.ndarray] = None,
                tgt_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """src_ids (B, S), tgt_ids (B, T) → logits (B, T, V); keeps the cache for backward.

        src_padding_mask (B, S) / tgt_padding_mask (B, T): True marks a padding token, which
        no query attends to (the source mask applies to encoder self-attention and to every
        cross-attention).
        """
        logits, cache = self.forward_with_cache(src_ids, tgt_ids, src_padding_mask=src_padding_mask,
                                                tgt_padding_mask=tgt_padding_mask)
        self._last_cache = cache
        return logits

    def forward_with_cache(self, src_ids, tgt_ids, *, src_padding_mask=None, tgt_padding_mask=None):
        config = self.config
        src_ids = check_ids(check_token_ids(src_ids, "src_ids", config.vocab_size), "src_ids",
                            config.vocab_size)
        tgt_ids = check_ids(check_token_ids(tgt_ids, "tgt_ids", config.vocab_size), "tgt_ids",
                            config.vocab_size)
        (B, S), (B_tgt, T) = src_ids.shape, tgt_ids.shape
        if B != B_tgt:
            raise ValueError(f"src_ids batch {B} != tgt_ids batch {B_tgt}")
        for name, length in (("src_ids", S), ("tgt_ids", T)):
            if length > config.max_seq_len:
                raise ValueError(f"{name} has {length} positions, more than max_seq_len="
                                 f"{config.max_seq_len}")
        src_padding_mask = check_row_ids(src_padding_mask, "src_padding_mask", (B, S))
        tgt_padding_mask = check_row_ids(tgt_padding_mask, "tgt_padding_mask", (B, T))
        dropout = Dropout(config.dropout, self.dropout_rng, self.training,
                          fused=config.layer_impl == "numba")
        with self._inner_loop():  # finite values vouched for at the door (fused path)
            # encoder: m = blocks(embed(src))
            m, src_embedding = self.source_embedding.forward(src_ids, np.arange(S), dropout)
            encoder_caches = []
            for block in self.encoder:
                m, block_cache = block.forward(m, dropout, key_padding_mask=src_padding_mask)
                encoder_caches.append(block_cache)
            encoder_norm = None
            if config.final_norm:
                m, encoder_norm = self.encoder_norm.forward(m)  # (B, S, C)

            # decoder: x = blocks(embed(tgt), m)
            x, tgt_embedding = self.embed.forward(tgt_ids, np.arange(T), dropout)
            decoder_caches = []
            for block in self.decoder:
                x, block_cache = block.forward(x, dropout, memory=m, key_padding_mask=tgt_padding_mask,
                                               memory_padding_mask=src_padding_mask)
                decoder_caches.append(block_cache)
            decoder_norm = None
            if config.final_norm:
                x, decoder_norm = self.decoder_norm.forward(x)  # (B, T, C)

            logits, head = self._head_forward(x)  # (B, T, V)
            cache = EncoderDecoderCache(src_embedding, encoder_caches, encoder_norm, tgt_embedding,
                                        decoder_caches, decoder_norm, head, logits.shape, logits.dtype)
            return logits, cache

    # ---- backward --------------------------------------------------------------------------

    def backward_with_cache(self, dlogits: np.ndarray, cache: EncoderDecoderCache):
        """Adds every parameter gradient; returns the gradients with respect to the source and
        target token vectors ``(d_src (B, S, C), d_tgt (B, T, C))``."""
        config = self.config
        dlogits = check_grad(dlogits, cache.logits_shape, cache.logits_dtype, "dlogits")
        with self._inner_loop():
            dx = self._head_backward(dlogits, cache.head)  # (B, T, C)
            if config.final_norm:
                dx = self.decoder_norm.backward(dx, cache.decoder_norm)

            # decoder, in reverse; every layer's cross-attention adds its share of dm
            dm = None
            for block, block_cache in zip(reversed(self.decoder), reversed(cache.decoder)):
                dx, dm_layer = block.backward(dx, block_cache)
                dm = dm_layer if dm is None else dm + dm_layer  # (B, S, C)
            d_tgt = self.embed.backward(dx, cache.tgt_embedding)

            # encoder, in reverse, from dm
            if config.final_norm:
                dm = self.encoder_norm.backward(dm, cache.encoder_norm)
            for block, block_cache in zip(reversed(self.encoder), reversed(cache.encoder)):
                dm = block.backward(dm, block_cache)
            d_src = self.source_embedding.backward(dm, cache.src_embedding)
        return d_src, d_tgt
