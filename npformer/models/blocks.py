"""Transformer blocks: where the norm sits and how the two branches meet the residual stream.

Three layouts, with ``n`` a norm, ``drop`` dropout, and x (B, T, C) the residual stream:

    post-norm sequential (2017, GPT-1)     x = n₁(x + drop(attn(x)))
                                           x = n₂(x + drop(ffn(x)))
    pre-norm sequential (GPT-2 → Llama)    x = x + drop(attn(n₁(x)))
                                           x = x + drop(ffn(n₂(x)))
    parallel (GPT-J, PaLM: n₁ = n₂;        x = x + drop(attn(n₁(x))) + drop(ffn(n₂(x)))
              GPT-NeoX: two norms)
    sandwich (Gemma 2, pre-norm            x = x + drop(m₁(attn(n₁(x))))
              sequential + sandwich_norm)  x = x + drop(m₂(ffn(n₂(x))))

where the sandwich's post-norms m₁ (``attn_post_norm``) and m₂ (``ffn_post_norm``) are norms
of the model's kind with their own weights: each branch output is normalised before it
meets the residual stream, so no branch can write arbitrarily large values into it.

The 2017 decoder inserts a third sub-layer, cross-attention over the encoder output
``memory``, between the two: ``x = n(x + drop(cross(x, memory)))`` (post) or
``x = x + drop(cross(n(x), memory))`` (pre).

Backward of one sub-layer, from the forward lines above:

    pre:   y = x + b(n(x))          dx = dy + n'ᵀ( b'ᵀ dy )      the residual carries dy through
    sandwich: y = x + m(b(n(x)))    dx = dy + n'ᵀ( b'ᵀ ( m'ᵀ dy ) )
                                    (m'ᵀ: the post-norm's backward, which also adds its
                                    weight gradient; the chain rule through one more layer)
    post:  y = n(x + b(x))          ds = n'ᵀ dy;  dx = ds + b'ᵀ ds
    parallel: y = x + a(n₁(x)) + f(n₂(x))
                                    dx = dy + n₁'ᵀ(a'ᵀ dy) + n₂'ᵀ(f'ᵀ dy)
                                    (one shared norm: dx = dy + n'ᵀ(a'ᵀ dy + f'ᵀ dy))

Post-norm puts a norm on the residual path itself, so the gradient reaching early layers
passes through every norm's Jacobian; pre-norm leaves an identity path from the loss to the
embeddings — the reason GPT-2 moved the norm and deep models train without warm-up tricks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..config import ModelConfig
from ..functional.dropout import dropout_backward, dropout_forward
from ..functional.rope import RopeScaling
from ..kernels import residual_dropout as residual_dropout_kernels
from ..nn.attention import MultiHeadAttention
from ..nn.feedforward import FeedForward
from ..nn.module import Module
from ..nn.norm import make_norm


class Dropout:
    """What a block needs to apply dropout: the probability, the generator, and the mode.

    One object is shared by every block of a model; each call draws a fresh mask from ``rng``
    and returns it in the cache (the mask is never kept on the object). ``fused`` (the
    models' ``layer_impl="numba"``) computes the residual add ``x + drop(b)`` as one kernel
    pass (:mod:`npformer.kernels.residual_dropout`, the same masks from the same draws)."""

    def __init__(self, p: float, rng: np.random.Generator, training: bool, fused: bool = False) -> None:
        self.p, self.rng, self.training, self.fused = p, rng, training, fused

    def forward(self, x: np.ndarray):
        return dropout_forward(x, self.p, self.rng, self.training)

    def add_forward(self, x: np.ndarray, b: np.ndarray):
        """``(x + drop(b), dropout cache)``; the fused form in one kernel pass."""
        if self.fused:
            return residual_dropout_kernels.residual_dropout_forward(x, b, self.p, self.rng,
                                                                     self.training)
        b, cache = self.forward(b)
        return x + b, cache

    @staticmethod
    def backward(dy: np.ndarray, cache, fused: bool = False) -> np.ndarray:
        """dy ⊙ mask / (1 − p); ``fused``: one kernel pass (same cache, same numbers)."""
        if cache.mask is None and cache.scale == 1.0:
            # the forward was the identity (p = 0 or evaluation): dy itself, not a copy
            # (every branch backward only reads its dy)
            return dy
        if fused:
            return residual_dropout_kernels.dropout_backward(dy, cache)
        return dropout_backward(dy, cache)


def make_attention(config: ModelConfig, layer: int, rng: np.random.Generator, *,
                   causal: bool = True, cross: bool = False) -> MultiHeadAttention:
    """The attention of layer ``layer``: dense or local per ``attention_pattern``, RoPE if the
    config uses it (never on cross-attention or the encoder's bidirectional attention
    windows)."""
    std = config.init_std
    attention = MultiHeadAttention(
        config.d_model, config.n_heads, config.kv_heads, config.head_size,
        qkv_bias=config.qkv_bias, out_bias=config.out_bias,
        rope=config.positions == "rope" and not cross, rope_theta=config.rope_theta,
        rotary_dim=config.rotary_dim, rope_layout=config.rope_layout,
        rope_scaling=RopeScaling.from_config(config),
        causal=causal and not cross, window=None if cross or not causal else config.layer_window(layer),
        scale=config.attention_scale, softmax=config.softmax, clip_gamma=config.clip_gamma,
        clip_zeta=config.clip_zeta, clip_alpha=config.clip_alpha,
        softcap=config.attention_softcap,
        attention_impl=config.attention_impl, layer_impl=config.layer_impl, cross=cross, rng=rng, init_std=std, dtype=config.np_dtype,
        qk_norm=config.qk_norm, qk_norm_eps=config.norm_eps, norm_unit_offset=config.norm_unit_offset,
        attention_gate=config.attention_gate, attention_gate_init=config.attention_gate_init,
        # the gate's weights from a child stream: spawning leaves rng's own draws untouched,
        # so every other weight of a gated model equals the gateless model's (paired seeds)
        gate_rng=rng.spawn(1)[0] if config.attention_gate else None,
    )
    _scale_residual_projection(config, attention.out_proj, rng)
    return attention


def make_feedforward(config: ModelConfig, rng: np.random.Generator) -> FeedForward:
    ffn = FeedForward(config.d_model, config.ffn_width, config.ffn, config.ffn_bias, rng=rng,
                      init_std=config.init_std, dtype=config.np_dtype, impl=config.layer_impl)
    _scale_residual_projection(config, ffn.down, rng)
    return ffn


def _scale_residual_projection(config: ModelConfig, linear, rng: np.random.Generator) -> None:
    """GPT-2: the projections that write into the residual stream start with std / √(2L), so
    the stream's variance does not grow with depth (2 such writes per layer)."""
    if config.scaled_residual_init:
        std = config.init_std / np.sqrt(2 * config.n_layers)
        weight = linear.params["weight"]
        weight[...] = rng.standard_normal(weight.shape) * std


# --------------------------------------------------------------------------------------
# Sequential blocks (post-norm and pre-norm), with optional cross-attention
# --------------------------------------------------------------------------------------


class SublayerCache(NamedTuple):
    norm: object  # norm cache
    branch: object  # attention / FFN cache
    dropout: object  # dropout cache
    post_norm: object = None  # the sandwich's post-norm cache (Gemma 2), or None


class SequentialBlockCache(NamedTuple):
    attn: SublayerCache
    cross: Optional[SublayerCache]
    ffn: SublayerCache


class SequentialBlock(Module):
    """Post-norm (2017, GPT-1) or pre-norm (GPT-2 onward) block.

    cross=True adds cross-attention over ``memory`` (the 2017 decoder); causal=False makes
    the self-attention bidirectional (the 2017 encoder). ``sandwich_norm`` (Gemma 2) adds
    ``attn_post_norm`` and ``ffn_post_norm`` on the branch outputs.
    """

    def __init__(self, config: ModelConfig, layer: int, rng: np.random.Generator, *,
                 causal: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.fused = config.layer_impl == "numba"  # the kernels of dropout's backward
        self.pre_norm = config.norm_placement == "pre"
        self.sandwich = config.sandwich_norm  # validated: pre-norm, decoder (no cross)
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config, layer, rng, causal=causal)
        if self.sandwich:
            self.attn_post_norm = make_norm(config)
        self.has_cross = cross
        if cross:
            self.cross_norm = make_norm(config)
            self.cross_attn = make_attention(config, layer, rng, cross=True)
        self.ffn_norm = make_norm(config)
        self.ffn = make_feedforward(config, rng)
        if self.sandwich:
            self.ffn_post_norm = make_norm(config)

    def _sublayer_forward(self, x, norm, branch, dropout: Dropout, post_norm=None):
        post_norm_cache = None
        if self.pre_norm:
            # y = x + drop(branch(n(x)))    sandwich: y = x + drop(m(branch(n(x))))
            h, norm_cache = norm.forward(x)  # (B, T, C)
            b, branch_cache = branch(h)  # (B, T, C)
            if post_norm is not None:
                b, post_norm_cache = post_norm.forward(b)  # (B, T, C)
            y, drop_cache = dropout.add_forward(x, b)
        else:
            # y = n(x + drop(branch(x)))
            b, branch_cache = branch(x)
            s, drop_cache = dropout.add_forward(x, b)
            y, norm_cache = norm.forward(s)
        return y, SublayerCache(norm_cache, branch_cache, drop_cache, post_norm_cache)

    def _sublayer_backward(self, dy, cache: SublayerCache, norm, branch_backward, post_norm=None):
        """Returns dx (and whatever else the branch's backward returned besides its dx)."""
        if self.pre_norm:
            # forward: y = x + b(n(x)), so dx = dy + n'ᵀ b'ᵀ dy
            #    sandwich: y = x + m(b(n(x))), so dx = dy + n'ᵀ b'ᵀ m'ᵀ dy
            db = Dropout.backward(dy, cache.dropout, self.fused)
            if post_norm is not None:
                db = post_norm.backward(db, cache.post_norm)  # (B, T, C)
            dh, extra = _split(branch_backward(db, cache.branch))
            dx = norm.backward(dh, cache.norm)
            dx += dy  # the residual path (dx is the norm's fresh array)
        else:
            # forward: y = n(s), s = x + b(x), so ds = n'ᵀ dy and dx = ds + b'ᵀ ds
            ds = norm.backward(dy, cache.norm)
            db = Dropout.backward(ds, cache.dropout, self.fused)
            dbranch, extra = _split(branch_backward(db, cache.branch))
            dx = ds + dbranch
        return dx, extra

    def forward(self, x: np.ndarray, dropout: Dropout, *, memory: Optional[np.ndarray] = None,
                doc_ids=None, key_padding_mask=None, memory_padding_mask=None,
                position_ids=None, kv_cache=None, cross_kv_cache=None):
        """x (B, T, C) → y (B, T, C). memory (B, S, C): the encoder output (cross blocks)."""

        def self_attention(h):
            return self.attn.forward(h, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
                                     position_ids=position_ids, kv_cache=kv_cache)

        x, attn = self._sublayer_forward(x, self.attn_norm, self_attention, dropout,
                                         self.attn_post_norm if self.sandwich else None)
        cross = None
        if self.has_cross:
            def cross_attention(h):
                return self.cross_attn.forward(h, memory=memory, key_padding_mask=memory_padding_mask,
                                               kv_cache=cross_kv_cache)

            x, cross = self._sublayer_forward(x, self.cross_norm, cross_attention, dropout)
        x, ffn = self._sublayer_forward(x, self.ffn_norm, self.ffn.forward, dropout,
                                        self.ffn_post_norm if self.sandwich else None)
        return x, SequentialBlockCache(attn, cross, ffn)

    def backward(self, dy: np.ndarray, cache: SequentialBlockCache):
        """Returns dx (B, T, C); a cross block returns ``(dx, dmemory)``."""
        dx, _ = self._sublayer_backward(dy, cache.ffn, self.ffn_norm, self.ffn.backward,
                                        self.ffn_post_norm if self.sandwich else None)
        dmemory = None
        if self.has_cross:
            dx, dmemory = self._sublayer_backward(dx, cache.cross, self.cross_norm,
                                                  self.cross_attn.backward)
        dx, _ = self._sublayer_backward(dx, cache.attn, self.attn_norm, self.attn.backward,
                                        self.attn_post_norm if self.sandwich else None)
        return (dx, dmemory) if self.has_cross else dx


def _split(result):
    """A branch backward returns dx, or (dx, dmemory) for cross-attention."""
    return result if isinstance(result, tuple) else (result, None)


# --------------------------------------------------------------------------------------
# Parallel block (GPT-J, GPT-NeoX, PaLM)
# --------------------------------------------------------------------------------------


class ParallelBlockCache(NamedTuple):
    attn_norm: object
    ffn_norm: object  # None when the norm is shared
    attn: object
    ffn: object
    attn_dropout: object
    ffn_dropout: object


class ParallelBlock(Module):
    """``x + drop(attn(n₁(x))) + drop(ffn(n₂(x)))``; one shared norm (n₁ = n₂: GPT-J, PaLM)
    or two (GPT-NeoX's ``use_parallel_residual``)."""

    def __init__(self, config: ModelConfig, layer: int, rng: np.random.Generator) -> None:
        super().__init__()
        self.fused = config.layer_impl == "numba"  # the kernels of dropout's backward
        self.attn_norm = make_norm(config)
        self.shared_norm = config.parallel_norms == 1
        if not self.shared_norm:
            self.ffn_norm = make_norm(config)
        self.attn = make_attention(config, layer, rng)
        self.ffn = make_feedforward(config, rng)

    def forward(self, x: np.ndarray, dropout: Dropout, *, doc_ids=None, key_padding_mask=None,
                position_ids=None, kv_cache=None):
        """x (B, T, C) → y (B, T, C)."""
        h_attn, attn_norm = self.attn_norm.forward(x)  # (B, T, C)
        if self.shared_norm:
            h_ffn, ffn_norm = h_attn, None
        else:
            h_ffn, ffn_norm = self.ffn_norm.forward(x)
        a, attn = self.attn.forward(h_attn, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
                                    position_ids=position_ids, kv_cache=kv_cache)
        f, ffn = self.ffn.forward(h_ffn)
        y, attn_dropout = dropout.add_forward(x, a)  # x + drop(a)
        y, ffn_dropout = dropout.add_forward(y, f)  # + drop(f)
        return y, ParallelBlockCache(attn_norm, ffn_norm, attn, ffn, attn_dropout, ffn_dropout)

    def backward(self, dy: np.ndarray, cache: ParallelBlockCache) -> np.ndarray:
        # forward: y = x + a(n₁(x)) + f(n₂(x)): dy reaches x directly and through both branches
        dh_attn = self.attn.backward(Dropout.backward(dy, cache.attn_dropout, self.fused),
                                     cache.attn)
        dh_ffn = self.ffn.backward(Dropout.backward(dy, cache.ffn_dropout, self.fused), cache.ffn)
        if self.shared_norm:
            # n₁ = n₂: both branches read the same normalised h, so their gradients add first
            return dy + self.attn_norm.backward(dh_attn + dh_ffn, cache.attn_norm)
        return (dy + self.attn_norm.backward(dh_attn, cache.attn_norm)
                + self.ffn_norm.backward(dh_ffn, cache.ffn_norm))


def make_block(config: ModelConfig, layer: int, rng: np.random.Generator) -> Module:
    """The decoder block of layer ``layer`` of a decoder-only model."""
    if config.block == "parallel":
        return ParallelBlock(config, layer, rng)
    return SequentialBlock(config, layer, rng)
