"""What the decoder-only LM and the 2017 encoder-decoder share: construction checks, the
output head, train/eval mode, and ``backward`` from the cache kept by the last ``forward``.

The head:  z = s · (x W_headᵀ + b)          (B, T, V),  s = ``logit_scale`` (Cohere)
           logits = c · tanh(z / c)          only with ``final_logit_softcap`` c (Gemma 2)
with W_head the token embedding itself when tied (GPT-1/2, PaLM, 2017) — its gradient then
collects this use too — or a separate ``lm_head`` Linear.  Backward, the lines in reverse:
dz = dlogits ⊙ sech²(z / c) (the soft-cap pair of
:mod:`npformer.functional.softmax_variants`: d/dz c·tanh(z/c) = c · sech²(z/c) · 1/c), then
dz ← s · dz, then the Linear (or tied) backward, db = Σ dz over (B, T).

The soft-cap keeps its slope sech²(z / c) in its cache, a fresh array: the trainer's fused
cross-entropy, which writes ∂L/∂logits over the logits array, overwrites nothing the
backward reads.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .._validate import finite_values_checked_once
from ..config import ModelConfig
from ..functional.softmax_variants import softcap_backward, softcap_forward
from ..nn.linear import Linear
from ..nn.module import Module


class LanguageModel(Module):
    """Base of :class:`DecoderLM` and :class:`EncoderDecoder` (subclasses define
    ``forward_with_cache`` and ``backward_with_cache``)."""

    architecture = ""  # "decoder" or "encoder-decoder", set by the subclass

    def _start(self, config: ModelConfig, seed: int) -> np.random.Generator:
        """Check the config, keep it, and return the generator that initialises the weights."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        if config.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} builds architecture={self.architecture!r}, got "
                             f"{config.architecture!r}; use npformer.models.build_model(config)")
        object.__setattr__(self, "config", config)
        self.dropout_rng = np.random.default_rng([seed, 1])  # dropout masks, separate from init
        self.training = True  # as in torch, a new model is in training mode
        self._last_cache = None
        return np.random.default_rng(seed)

    def _inner_loop(self):
        """The context of the layers' forward/backward. On the fused path
        (``layer_impl="numba"``) the inputs are checked once at the door of
        ``forward_with_cache`` / ``backward_with_cache``, and the layers inside skip their
        NaN/inf scans (see :func:`npformer._validate.finite_values_checked_once` for why that
        lets no NaN through silently); on the reference path every layer checks its inputs."""
        if self.config.layer_impl == "numba":
            return finite_values_checked_once()
        return contextlib.nullcontext()

    def _add_head(self, rng: np.random.Generator) -> None:
        config = self.config
        if not config.tie_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, config.lm_head_bias, rng=rng,
                                  init_std=config.init_std, dtype=config.np_dtype)
        elif config.lm_head_bias:
            self.add_parameter("lm_head_bias", np.zeros(config.vocab_size, dtype=config.np_dtype))

    def _head_forward(self, x: np.ndarray):
        """x (B, T, C) → (logits (B, T, V), head cache): (projection cache, soft-cap cache
        or None)."""
        config = self.config
        if config.tie_embeddings:
            logits, cache = self.embed.tokens.as_head_forward(x)  # x W_tokᵀ
            if config.lm_head_bias:
                logits = logits + self.params["lm_head_bias"]
        else:
            logits, cache = self.lm_head.forward(x)
        if config.logit_scale != 1.0:
            logits = logits * config.logit_scale  # z = s · (x W_headᵀ + b)
        softcap = None
        if config.final_logit_softcap is not None:
            # logits = c · tanh(z / c)    (B, T, V)
            logits, softcap = softcap_forward(logits, config.final_logit_softcap)
        return logits, (cache, softcap)

    def _head_backward(self, dlogits: np.ndarray, cache) -> np.ndarray:
        """Adds the head's gradients (the tied table's share included); returns dx (B, T, C)."""
        config = self.config
        cache, softcap = cache
        if softcap is not None:
            dlogits = softcap_backward(dlogits, softcap)  # forward: logits = c tanh(z / c)
        if config.logit_scale != 1.0:
            dlogits = dlogits * config.logit_scale  # forward: logits = s · z
        if not config.tie_embeddings:
            return self.lm_head.backward(dlogits, cache)
        if config.lm_head_bias:
            self.accumulate("lm_head_bias", dlogits.reshape(-1, config.vocab_size).sum(axis=0))
        return self.embed.tokens.as_head_backward(dlogits, cache)

    def train(self, mode: bool = True):
        """Dropout on (``mode=True``) or off."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Dropout off (inference, sampling, comparisons)."""
        return self.train(False)

    def backward(self, dlogits: np.ndarray):
        """Adds ∂L/∂θ into every gradient, given dlogits = ∂L/∂logits of the last ``forward``."""
        if self._last_cache is None:
            raise ValueError("backward needs a forward first (and not a KV-cached one: "
                             "decoding with kv_caches is inference only)")
        return self.backward_with_cache(dlogits, self._last_cache)
