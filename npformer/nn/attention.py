"""``MultiHeadAttention``: projections, optional RoPE, the attention core, and a KV cache.

Forward (self-attention; cross-attention takes k and v from ``memory`` instead of x):

    q = x W_qᵀ (+ b_q)        (B, T, H·D) → (B, H, T, D)
    k = x W_kᵀ (+ b_k)        (B, T, K·D) → (B, K, T, D)
    v = x W_vᵀ (+ b_v)        (B, T, K·D) → (B, K, T, D)
    q, k = n_q(q), n_k(k)     (optional qk_norm, Qwen3 / Gemma 3: RMSNorm over each head's D)
    q, k = rope(q), rope(k)   (optional; rotary positions, GPT-J onward)
    o = attention(q, k, v)    (B, H, T, D)   the maths: npformer.functional.attention
    o = σ(a) ⊙ o              (optional attention_gate, Bondarenko et al. 2023: per head and
                              token a gate from the head's C/H slice of x,
                              npformer.functional.attention_gate)
    y = o W_oᵀ (+ b_o)        (B, T, H·D) → (B, T, C)

Backward runs the same lines in reverse with the pairs' backward functions; the projection
gradients are added into ``grads``. With ``fused_qkv`` the three projections are one
parameter ``qkv_proj.weight`` ((H + 2K)·D, C) whose rows are [W_q; W_k; W_v], the layout of
``torch.nn.MultiheadAttention.in_proj_weight`` and GPT-2's ``c_attn``.

QK norm (Qwen3, Gemma 3; ``qk_norm=True``)
------------------------------------------
After the projections and before RoPE, each head's D channels of q and of k are RMS-normalised
with one weight (D,) per projection, shared by all heads. For every row (b, t, h):

    r = √(mean_d q[b,t,h,d]² + eps),   q̃ = q[b,t,h,:] / r,   n_q(q)[b,t,h,:] = q̃ ⊙ s_q

with s_q = w_q, or 1 + w_q with Gemma's unit offset (∂s_q/∂w_q = I), and the same for k with
w_k. This is :class:`~npformer.nn.norm.RMSNorm` applied to q viewed as (B, T, H, D), every
(b, t, h) a row of D channels, so the backward is RMSNorm's (:mod:`npformer.functional.rmsnorm`):
with y the normalised q and dy = ∂L/∂y, per row g = dy ⊙ s_q and dq = (1/r)(g − q̃ ⊙ mean(g ⊙ q̃));
and because one weight scales every row, its gradient sums over batch, heads and positions:

    dw_q = Σ_b Σ_h Σ_t dy[b,t,h,:] ⊙ q̃[b,t,h,:]          (D,)

which is the pair's Σ_rows dy ⊙ x̂ over the B·T·H rows (B·S·K rows for k). Grouped-query
sharing changes nothing here: k's rows are its K heads. Keys are normalised before they
enter the KV cache, so a cached key is the key a full forward computes.

Head sharing: ``n_kv_heads`` K = H is multi-head attention (2017), K = 1 multi-query (PaLM),
1 < K < H grouped-query (Llama 2); H must be divisible by K.

KV cache (incremental decoding, inference only)
-----------------------------------------------
Causal attention lets token t see keys 0..t only, so when tokens arrive one at a time the
keys and values of earlier tokens never change. :class:`KVCache` keeps them (after RoPE,
which is applied at each token's absolute position), and a forward with ``kv_cache`` computes
q, k, v for the new tokens only, appends k, v, and attends over everything cached. The
attention core aligns causal masks "bottom-right" (query i of T new ones sits at position
S − T + i), so decoding token by token gives the same outputs as one full forward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_int
from ..config import ATTENTION_IMPLS, check_impl
from ..functional.attention import attention_backward, attention_forward
from ..functional.attention_gate import head_gate_backward, head_gate_forward
from ..functional.linear import linear_backward, linear_forward
from ..functional import rope as rope_reference
from ..functional.rope import check_rope_scaling, check_rotary_dim
from ..kernels import rope as rope_kernels
from .linear import Linear
from .module import Module
from .norm import RMSNorm


def _attention_core(attention_impl: str, softmax: str):
    """The (forward, backward) pair that computes ``o = attention(q, k, v)``."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, "
                         f"got {attention_impl!r}")
    if attention_impl == "numba":
        from ..kernels.flash_attention import (FLASH_SOFTMAX_VARIANTS, flash_attention_backward,
                                               flash_attention_forward)

        if softmax in FLASH_SOFTMAX_VARIANTS:
            return flash_attention_forward, flash_attention_backward
    return attention_forward, attention_backward


class KVCache:
    """Keys and values (after RoPE) of every token seen so far, for one attention layer.

    k, v: (B, K, S, D); doc_ids: (B, S) when document masking is used. Inference only.
    """

    def __init__(self) -> None:
        self.k: Optional[np.ndarray] = None
        self.v: Optional[np.ndarray] = None
        self.doc_ids: Optional[np.ndarray] = None

    @property
    def length(self) -> int:
        """S, the number of cached positions."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: np.ndarray, v: np.ndarray, doc_ids: Optional[np.ndarray]):
        """Add the new tokens' k, v (B, K, T, D) and return the full (B, K, S, D) pair."""
        if self.k is None:
            self.k, self.v = k, v
            self.doc_ids = doc_ids
        else:
            if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or k.dtype != self.k.dtype:
                raise ValueError(
                    f"KV cache holds keys of shape {self.k.shape} ({self.k.dtype}); new keys of "
                    f"shape {k.shape} ({k.dtype}) do not match in batch, heads, head size or dtype"
                )
            if (doc_ids is None) != (self.doc_ids is None):
                raise ValueError("doc_ids must be given on every cached call or on none")
            self.k = np.concatenate([self.k, k], axis=2)
            self.v = np.concatenate([self.v, v], axis=2)
            if doc_ids is not None:
                self.doc_ids = np.concatenate([self.doc_ids, doc_ids], axis=1)
        return self.k, self.v


class MultiHeadAttentionCache(NamedTuple):
    q_in: object  # linear cache(s) of the projections
    k_in: object
    v_in: object
    q_norm: object  # RMSNorm caches of the qk norm, or None
    k_norm: object
    rope_q: object  # rope caches, or None
    rope_k: object
    core: object  # attention_forward cache
    out: object  # output projection cache
    shape: tuple  # (B, T, S)
    used_kv_cache: bool
    gate: object = None  # head_gate_forward cache (attention_gate), or None


class MultiHeadAttention(Module):
    """Multi-head / multi-query / grouped-query attention with its projections.

    d_model C, n_heads H, n_kv_heads K (default H), head_dim D (default C // H).
    qkv_bias / out_bias: GPT-2 and the 2017 model have both; GPT-Neo has only the output
    bias; PaLM and Llama have neither.
    rope: apply rotary positions to q and k (``rope_theta``, ``rotary_dim``, ``rope_layout``
    "half" (GPT-NeoX, Llama) or "interleaved" (GPT-J), ``rope_scaling`` None or a
    :class:`~npformer.functional.rope.RopeScaling`: linear, dynamic, yarn, llama3).
    causal, window, scale, softmax, clip_gamma, clip_zeta, clip_alpha, softcap: passed to the
    core (:func:`npformer.functional.attention.attention_forward`). softmax="sink" gives the
    module a parameter ``sinks`` (H,), one learned logit per query head, initialised to 0
    (where the sink softmax is softmax₁).
    attention_impl: "numba" computes the core with the fused kernels
    (:mod:`npformer.kernels.flash_attention`, same results, no T×S matrix); the clipped
    softmax, which they do not implement, falls back to the reference. "numpy": always the
    reference. layer_impl: "numba" rotates q and k with :mod:`npformer.kernels.rope`, "numpy"
    with :mod:`npformer.functional.rope` (``ModelConfig.layer_impl``).
    cross: cross-attention (2017 decoder): k, v come from ``memory``; no causal mask, no RoPE.
    qk_norm: RMS-normalise each head of q and of k (Qwen3, Gemma 3) with the weights
    ``q_norm.weight`` and ``k_norm.weight`` (D,), epsilon ``qk_norm_eps``; ``norm_unit_offset``
    makes them Gemma's (1 + w) norms.
    attention_gate: multiply each head's output by σ(x_h · w_h + b_h), x_h the head's C/H
    slice of the input x (Bondarenko et al. 2023; needs d_model divisible by n_heads), with
    ``gate_weight`` (H, C/H) ~ N(0, init_std²), drawn from ``gate_rng`` (default: ``rng``, after
    every other parameter, so a model without the gate keeps its initial weights; the models
    pass a child stream so that a gated model's other weights are the gateless model's too),
    and ``gate_bias`` (H,) = logit(attention_gate_init), the initial gate value (0.25 as the
    paper's OPT runs).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, qkv_bias: bool = True, out_bias: bool = True,
                 fused_qkv: bool = False, rope: bool = False, rope_theta: float = 10000.0,
                 rotary_dim: Optional[int] = None, rope_layout: str = "half",
                 rope_scaling=None, causal: bool = True, window: Optional[int] = None, scale: Optional[float] = None,
                 softmax: str = "softmax", clip_gamma: float = -0.03, clip_zeta: float = 1.0,
                 clip_alpha: Optional[float] = None,
                 softcap: Optional[float] = None, attention_impl: str = "numba", layer_impl: str = "numpy",
                 cross: bool = False,
                 qk_norm: bool = False, qk_norm_eps: float = 1e-6, norm_unit_offset: bool = False,
                 attention_gate: bool = False, attention_gate_init: float = 0.25,
                 rng: Optional[np.random.Generator] = None,
                 gate_rng: Optional[np.random.Generator] = None, init_std: float = 0.02,
                 dtype=np.float64) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        d_model = check_int(d_model, "d_model", 1)
        n_heads = check_int(n_heads, "n_heads", 1)
        n_kv_heads = check_int(n_kv_heads, "n_kv_heads", 1)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}); valid "
                f"n_kv_heads: {[k for k in range(1, n_heads + 1) if n_heads % k == 0]}"
            )
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model ({d_model}) is not divisible by n_heads ({n_heads}); "
                    "choose head_dim explicitly"
                )
            head_dim = d_model // n_heads
        head_dim = check_int(head_dim, "head_dim", 1)
        if cross and (rope or causal or window is not None):
            raise ValueError(
                "cross-attention takes no causal mask, window or RoPE "
                "(set causal=False, window=None, rope=False)"
            )
        if rope and rotary_dim is not None:  # checked here so a bad config fails at build time
            check_rotary_dim(rotary_dim, head_dim, " (head_dim)")
        if rope and head_dim % 2 and rotary_dim is None:
            raise ValueError(f"RoPE over the whole head needs an even head_dim, got {head_dim}; "
                             "set an even rotary_dim < head_dim for partial rotary")
        rng = np.random.default_rng(0) if rng is None else rng
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.fused_qkv, self.cross = fused_qkv, cross
        if rope:  # a bad schedule fails at build time too
            check_rope_scaling(rope_scaling, head_dim if rotary_dim is None else rotary_dim)
        self.rope = dict(theta=rope_theta, rotary_dim=rotary_dim, layout=rope_layout,
                         scaling=rope_scaling) if rope else None
        rope_module = rope_kernels if check_impl(layer_impl) == "numba" else rope_reference
        self.rope_pair = (rope_module.rope_forward, rope_module.rope_backward)
        self.core_options = dict(causal=causal, window=window, scale=scale, softmax=softmax,
                                 clip_gamma=clip_gamma, clip_zeta=clip_zeta, softcap=softcap,
                                 clip_alpha=clip_alpha)
        if softmax == "sink":  # one sink logit per query head; 0 = softmax₁ (passed to the
            self.add_parameter("sinks", np.zeros(n_heads, dtype=dtype))  # core at each call)
        self.core = _attention_core(attention_impl, softmax)  # (forward, backward) pair
        q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
        make = dict(rng=rng, init_std=init_std, dtype=dtype)
        if fused_qkv:
            self.qkv_proj = Linear(d_model, q_width + 2 * kv_width, qkv_bias, **make)
        else:
            self.q_proj = Linear(d_model, q_width, qkv_bias, **make)
            self.k_proj = Linear(d_model, kv_width, qkv_bias, **make)
            self.v_proj = Linear(d_model, kv_width, qkv_bias, **make)
        self.out_proj = Linear(q_width, d_model, out_bias, **make)
        self.qk_norm = bool(qk_norm)
        if self.qk_norm:  # one (D,) weight each, shared by all heads
            norm = dict(dtype=dtype, impl=layer_impl, unit_offset=norm_unit_offset)
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, **norm)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, **norm)
        self.attention_gate = bool(attention_gate)
        if self.attention_gate:  # drawn last: the other parameters are those of a gateless model
            self._add_gate(rng if gate_rng is None else gate_rng, init_std, attention_gate_init,
                           dtype)

    def _add_gate(self, rng, init_std: float, gate_init: float, dtype) -> None:
        """``gate_weight`` (H, C/H) ~ N(0, init_std²) and ``gate_bias`` (H,) = logit(gate_init),
        so every gate starts near σ(b) = gate_init."""
        if self.d_model % self.n_heads:
            raise ValueError(f"attention_gate splits x's d_model={self.d_model} channels into "
                             f"n_heads={self.n_heads} slices; d_model must be divisible by n_heads")
        if isinstance(gate_init, (bool, np.bool_)) or not isinstance(
                gate_init, (int, float, np.floating)) or not 0.0 < float(gate_init) < 1.0:
            raise ValueError(f"attention_gate_init is the initial gate value σ(bias), strictly "
                             f"inside (0, 1); got {gate_init!r}")
        width = self.d_model // self.n_heads
        self.add_parameter("gate_weight",
                           (rng.standard_normal((self.n_heads, width)) * init_std).astype(dtype))
        logit = np.log(gate_init) - np.log1p(-gate_init)  # σ⁻¹(gate_init)
        self.add_parameter("gate_bias", np.full(self.n_heads, logit, dtype=dtype))

    # ---- projections ------------------------------------------------------------------

    def _row_slices(self):
        """Rows of the fused weight that belong to q, k and v."""
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return (slice(0, q_width), slice(q_width, q_width + kv_width),
                slice(q_width + kv_width, q_width + 2 * kv_width))

    def _project(self, which: int, x: np.ndarray):
        """Apply the q (0), k (1) or v (2) projection to x (B, T, C)."""
        if self.fused_qkv:
            rows = self._row_slices()[which]
            bias = self.qkv_proj.params.get("bias")
            return linear_forward(x, self.qkv_proj.params["weight"][rows],
                                  None if bias is None else bias[rows])
        return (self.q_proj, self.k_proj, self.v_proj)[which].forward(x)

    def _project_backward(self, which: int, dy: np.ndarray, cache) -> np.ndarray:
        if self.fused_qkv:
            rows = self._row_slices()[which]
            dx, dweight, dbias = linear_backward(dy, cache)
            self.qkv_proj.grads["weight"][rows] += dweight
            if dbias is not None:
                self.qkv_proj.grads["bias"][rows] += dbias
            return dx
        return (self.q_proj, self.k_proj, self.v_proj)[which].backward(dy, cache)

    def _split_heads(self, x: np.ndarray, n: int) -> np.ndarray:
        B, T, _ = x.shape
        return x.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)  # (B, n, T, D)

    def _norm_heads(self, which: str, x: np.ndarray, n: int):
        """The qk norm ``which`` ("q_norm" or "k_norm") of x (B, T, n·D), viewed as
        (B, T, n, D): (normalised x (B, T, n·D), RMSNorm cache); (x, None) without qk_norm."""
        if not self.qk_norm:
            return x, None
        B, T, _ = x.shape
        y, cache = getattr(self, which).forward(x.reshape(B, T, n, self.head_dim))  # (B, T, n, D)
        return y.reshape(B, T, n * self.head_dim), cache

    def _norm_heads_backward(self, which: str, dy: np.ndarray, cache) -> np.ndarray:
        """dy (B, T, n·D) → dx (B, T, n·D); adds the weight's gradient (summed over batch,
        heads and positions by the RMSNorm pair's row sum)."""
        if cache is None:
            return dy
        B, T, width = dy.shape
        heads = dy.reshape(B, T, width // self.head_dim, self.head_dim)  # (B, T, n, D)
        return getattr(self, which).backward(heads, cache).reshape(B, T, width)

    @staticmethod
    def _merge_heads(x: np.ndarray) -> np.ndarray:
        B, n, T, D = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, n * D)  # (B, T, n·D)

    # ---- forward / backward -----------------------------------------------------------

    def forward(self, x: np.ndarray, *, memory: Optional[np.ndarray] = None,
                position_ids: Optional[np.ndarray] = None, doc_ids: Optional[np.ndarray] = None,
                key_padding_mask: Optional[np.ndarray] = None,
                kv_cache: Optional[KVCache] = None):
        """x (B, T, C) → y (B, T, C).

        memory: (B, S, C) encoder output, required for cross-attention and refused otherwise.
        position_ids: (T,) or (B, T) absolute positions for RoPE; default: past + arange(T).
        doc_ids: (B, T) document ids of the new tokens (Llama 3 document mask).
        key_padding_mask: (B, S) True = padding key (S counts cached keys too).
        kv_cache: a :class:`KVCache` to read and extend (inference only).
        """
        if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), got "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        if self.cross and memory is None:
            raise ValueError("cross-attention needs memory (B, S, C), the encoder output")
        if not self.cross and memory is not None:
            raise ValueError("memory is only for cross-attention (cross=True)")
        if self.cross and memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory batch {memory.shape[0]} != x batch {x.shape[0]}")
        B, T, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length
        source = memory if self.cross else x  # (B, S_new, C)

        q, q_in = self._project(0, x)  # (B, T, H·D)
        q, q_norm = self._norm_heads("q_norm", q, self.n_heads)
        k_norm = None
        if self.cross and kv_cache is not None and kv_cache.length:
            k_in = v_in = None  # the memory's keys and values were projected on the first call
            k = v = None
        else:
            k, k_in = self._project(1, source)  # (B, S_new, K·D)
            k, k_norm = self._norm_heads("k_norm", k, self.n_kv_heads)
            v, v_in = self._project(2, source)
        q = self._split_heads(q, self.n_heads)  # (B, H, T, D)
        if k is not None:
            k = self._split_heads(k, self.n_kv_heads)  # (B, K, S_new, D)
            v = self._split_heads(v, self.n_kv_heads)

        rope_q = rope_k = None
        if self.rope is not None:
            if position_ids is None:
                position_ids = past + np.arange(T)
            rope_forward = self.rope_pair[0]
            q, rope_q = rope_forward(q, position_ids, **self._rope_kwargs())
            k, rope_k = rope_forward(k, position_ids, **self._rope_kwargs())

        if kv_cache is not None:
            if self.cross:
                if kv_cache.length == 0:
                    kv_cache.append(k, v, None)
                k, v = kv_cache.k, kv_cache.v
            else:
                k, v = kv_cache.append(k, v, doc_ids)
                doc_ids = kv_cache.doc_ids
        core_forward, _ = self.core
        o, core = core_forward(q, k, v, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
                               sinks=self.params.get("sinks"),  # (H,) with softmax="sink"
                               **self.core_options)  # (B, H, T, D)
        gate = None
        if self.attention_gate:  # o = σ(a) ⊙ o, a from the heads' slices of x (the q input)
            o, gate = head_gate_forward(x, o, self.params["gate_weight"], self.params["gate_bias"])
        y, out = self.out_proj.forward(self._merge_heads(o))  # (B, T, C)
        cache = MultiHeadAttentionCache(q_in, k_in, v_in, q_norm, k_norm, rope_q, rope_k, core, out,
                               (B, T, k.shape[2]), kv_cache is not None, gate)
        return y, cache

    def _rope_kwargs(self) -> dict:
        return dict(theta=self.rope["theta"], rotary_dim=self.rope["rotary_dim"],
                    layout=self.rope["layout"], scaling=self.rope["scaling"])

    def backward(self, dy: np.ndarray, cache: MultiHeadAttentionCache):
        """Adds every projection gradient into ``grads``.

        Returns dx (B, T, C); for cross-attention ``(dx, dmemory)`` with dmemory (B, S, C).
        """
        if cache.used_kv_cache:
            raise ValueError("backward through a KV-cached forward is not supported: "
                             "the cache is for inference (decoding); train without kv_cache")
        # forward: y = merge(o) W_oᵀ + b_o
        do = self.out_proj.backward(dy, cache.out)  # (B, T, H·D)
        do = self._split_heads(do, self.n_heads)  # (B, H, T, D)
        dx_gate = None
        if cache.gate is not None:
            # forward: o = σ(a) ⊙ o, a = x_h · w_h + b_h: the gate's share of dx, and do
            dx_gate, do, dweight, dbias = head_gate_backward(do, cache.gate)
            self.accumulate("gate_weight", dweight)
            self.accumulate("gate_bias", dbias)
        # forward: o = attention(q, k, v)
        _, core_backward = self.core
        dq, dk, dv, *dsinks = core_backward(do, cache.core)  # (B,H,T,D), (B,K,S,D), (B,K,S,D)
        if dsinks:  # softmax="sink": the sink logits' gradient (H,), summed over b and t
            self.accumulate("sinks", dsinks[0])
        if self.rope is not None:
            # forward: q = rope(q), k = rope(k): the inverse rotation
            rope_backward = self.rope_pair[1]
            dq = rope_backward(dq, cache.rope_q)
            dk = rope_backward(dk, cache.rope_k)
        # forward: q = n_q(q), k = n_k(k) (qk_norm): RMSNorm's backward per head row
        dq = self._norm_heads_backward("q_norm", self._merge_heads(dq), cache.q_norm)  # (B, T, H·D)
        dk = self._norm_heads_backward("k_norm", self._merge_heads(dk), cache.k_norm)  # (B, S, K·D)
        # forward: q = x W_qᵀ + b_q etc., heads split
        dx = self._project_backward(0, dq, cache.q_in)
        if dx_gate is not None:
            dx = dx + dx_gate  # x fed the gate too
        dsource = (self._project_backward(1, dk, cache.k_in)
                   + self._project_backward(2, self._merge_heads(dv), cache.v_in))
        if self.cross:
            return dx, dsource
        return dx + dsource  # x fed q, k and v: the three paths add
