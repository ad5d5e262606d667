"""Parameter count and forward FLOPs per token, from the config alone (no model built).

Parameters, per piece (C width, V vocab, P positions, H/K heads, D head size, F FFN width):

    token table          V·C                 (+ the head V·C when untied, + V head bias)
    learned positions    P·C
    attention            C·(H + 2K)·D + H·D·C   (+ (H + 2K)·D q/k/v biases, + C output bias)
    FFN                  2·C·F (plain) or 3·C·F (GLU)   (+ F + C biases)
    norm                 C (+ C bias for LayerNorm); a sandwich block (Gemma 2) has two more
    qk norm              2·D per attention (Qwen3, Gemma 3: q_norm and k_norm, shared by heads)
    attention gate       C + H per attention (gate_weight (H, C/H), gate_bias (H,))

Forward FLOPs per token count the matrix products only (2 per multiply-add; norms,
activations and softmax are lower order):

    projections + FFN + head    2 · (number of matrix weights used per token)
    attention scores and mix    2 · 2 · H · D · S̄   where S̄ is the mean number of keys a
                                query sees: (T + 1)/2 causal dense, ≈ w for a window w ≪ T,
                                T bidirectional (2017 encoder), S for cross-attention.

This is Kaplan et al.'s "C_forward ≈ 2N + 2·L·T·C" made exact for each variant; a test checks
``parameter_count`` against the parameters of the built model.
"""

from __future__ import annotations

from typing import Optional

from ..config import GLU_TYPES, ModelConfig


def _norm_params(config: ModelConfig) -> int:
    if config.norm == "rmsnorm":
        return config.d_model
    return config.d_model * (2 if config.norm_bias else 1)


def _attention_params(config: ModelConfig) -> int:
    C, H, K, D = config.d_model, config.n_heads, config.kv_heads, config.head_size
    n = C * (H + 2 * K) * D + H * D * C
    if config.qkv_bias:
        n += (H + 2 * K) * D
    if config.out_bias:
        n += C
    if config.qk_norm:
        n += 2 * D  # q_norm, k_norm: one (D,) weight each
    if config.softmax == "sink":
        n += H  # sinks: one learned logit per query head
    if config.attention_gate:
        n += C + H  # gate_weight (H, C/H), gate_bias (H,)
    return n


def _ffn_params(config: ModelConfig) -> int:
    C, F = config.d_model, config.ffn_width
    if config.ffn in GLU_TYPES:
        return 3 * C * F
    return 2 * C * F + ((F + C) if config.ffn_bias else 0)


def _block_params(config: ModelConfig, cross: bool = False) -> int:
    norms = 2 if not (config.block == "parallel" and config.parallel_norms == 1) else 1
    if config.sandwich_norm:
        norms += 2  # attn_post_norm, ffn_post_norm
    n = _attention_params(config) + _ffn_params(config) + norms * _norm_params(config)
    if cross:
        n += _attention_params(config) + _norm_params(config)
    return n


def parameter_count(config: ModelConfig) -> int:
    """The number of scalars a model built from ``config`` holds."""
    C, V = config.d_model, config.vocab_size
    n = V * C
    if config.positions == "learned":
        n += config.max_seq_len * C
    if config.tie_embeddings:
        n += V if config.lm_head_bias else 0
    else:
        n += V * C + (V if config.lm_head_bias else 0)
    if config.architecture == "encoder-decoder":
        if not config.tie_embeddings:  # a separate source embedding (and its position table)
            n += V * C + (config.max_seq_len * C if config.positions == "learned" else 0)
        n += config.encoder_layers * _block_params(config)
        n += config.n_layers * _block_params(config, cross=True)
        n += 2 * _norm_params(config) if config.final_norm else 0
    else:
        n += config.n_layers * _block_params(config)
        n += _norm_params(config) if config.final_norm else 0
    return n


def _mean_visible_keys(T: int, window: Optional[int]) -> float:
    """S̄ for causal attention over T tokens: Σ_i min(i + 1, w) / T."""
    w = T if window is None else min(window, T)
    # rows 0 … w−1 see 1 … w keys; rows w … T−1 see w keys each
    return (w * (w + 1) / 2 + (T - w) * w) / T


def forward_flops_per_token(config: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Matrix-product FLOPs of one forward pass, per token, at sequence length ``seq_len``
    (default ``max_seq_len``). Encoder-decoder: per target token, with a source of the same
    length (the encoder's cost per source token is included)."""
    T = config.max_seq_len if seq_len is None else seq_len
    C, H, K, D, V = config.d_model, config.n_heads, config.kv_heads, config.head_size, config.vocab_size
    F = config.ffn_width
    projections = 2 * (C * (H + 2 * K) * D + H * D * C)
    ffn = 2 * C * F * (3 if config.ffn in GLU_TYPES else 2)
    head = 2 * C * V

    def attention_core(keys: float) -> float:
        return 2 * 2 * H * D * keys  # q kᵀ and p v

    if config.architecture == "encoder-decoder":
        encoder = config.encoder_layers * (projections + ffn + attention_core(T))
        cross = projections + attention_core(T)
        decoder = config.n_layers * (projections + ffn + attention_core(_mean_visible_keys(T, None)) + cross)
        return float(encoder + decoder + head)
    layers = sum(projections + ffn + attention_core(_mean_visible_keys(T, config.layer_window(layer)))
                 for layer in range(config.n_layers))
    return float(layers + head)
