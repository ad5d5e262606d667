"""Tiny random-weight checkpoints of every Hugging Face family, written by transformers itself.

``npformer compare --family NAME|all`` needs a checkpoint of each family without a model hub:
:func:`write_example` builds the family's ``transformers`` model from a config object (a few
channels, two or three layers), gives every parameter off-centre random values — norm gains
and Gemma's (1 + w) included, so no weight sits at its neutral value and hides a mistake —
and writes the directory with the model's own ``save_pretrained``. What the directory then
goes through is exactly what a downloaded checkpoint goes through.

Each example exercises what its family adds: grouped kv heads, a head size other than C/H,
a sliding window shorter than the compared sequence (7 tokens), Qwen2's biases, Qwen3's q/k
norms, Phi-3's fused matrices and partial rotary, Gemma's (1 + w) norms and √C embeddings,
Gemma 2's sandwich norms, alternating windows and both soft-caps at values that saturate.
The ``llama-rope-*`` examples scale RoPE past an original length of 4 positions, so the
7-token batch reaches the scaled frequencies.

torch and transformers are needed here (the test extra).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

VOCAB_SIZE = 61
SEQ_LEN = 7  # the compared batch is (2, SEQ_LEN): every window and original length is shorter


def _rope(rope_type: str = "default", theta: float = 10000.0, **extra) -> dict:
    return dict(rope_type=rope_type, rope_theta=theta, **extra)


_LLAMA = dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, intermediate_size=24, max_position_embeddings=16,
              tie_word_embeddings=False)

# name → (model_type, transformers config fields)
EXAMPLES: Dict[str, Tuple[str, dict]] = {
    "llama-rope-linear": ("llama", dict(_LLAMA, rope_parameters=_rope("linear", factor=2.0))),
    "llama-rope-dynamic": ("llama", dict(_LLAMA, max_position_embeddings=4,
                                         rope_parameters=_rope("dynamic", factor=4.0))),
    "llama-rope-yarn": ("llama", dict(_LLAMA, rope_parameters=_rope(
        "yarn", factor=4.0, original_max_position_embeddings=4))),
    "llama-rope-llama3": ("llama", dict(_LLAMA, rope_parameters=_rope(
        "llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=4))),
    # every layer windowed (Mistral 7B v0.1), GQA 4 → 1
    "mistral": ("mistral", dict(_LLAMA, num_key_value_heads=1, sliding_window=3,
                                rope_parameters=_rope(theta=1000000.0))),
    # q/k/v biases without an o bias; the last layer windowed (max_window_layers), tied head
    "qwen2": ("qwen2", dict(_LLAMA, num_hidden_layers=3, use_sliding_window=True,
                            sliding_window=3, max_window_layers=2, tie_word_embeddings=True)),
    # per-head q/k RMSNorms, head_dim 6 ≠ C/H = 4
    "qwen3": ("qwen3", dict(_LLAMA, head_dim=6, rope_parameters=_rope(theta=1000000.0))),
    # fused qkv_proj and gate_up_proj, half the head rotated, a window on every layer
    "phi3": ("phi3", dict(_LLAMA, sliding_window=5, pad_token_id=0,
                          rope_parameters=_rope(partial_rotary_factor=0.5))),
    # (1 + w) RMSNorms, √C embeddings, tanh GeGLU, multi-query, head_dim 8 ≠ C/H, tied head
    "gemma": ("gemma", dict(_LLAMA, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                            tie_word_embeddings=True)),
    # + sandwich norms, sliding/full layers, query_pre_attn_scalar, both soft-caps biting
    "gemma2": ("gemma2", dict(_LLAMA, head_dim=8, num_hidden_layers=2, sliding_window=3,
                              query_pre_attn_scalar=5, attn_logit_softcapping=1.5,
                              final_logit_softcapping=2.0, pad_token_id=0,
                              tie_word_embeddings=True)),
}


def write_example(name: str, path: str, dtype: str = "float64", seed: int = 0,
                  **changes) -> str:
    """Write example ``name`` into directory ``path`` with transformers' ``save_pretrained``
    (weights in ``dtype``); returns ``path``. ``changes``: config fields to set or override
    (e.g. a tokenizer's ``vocab_size``, ``bos_token_id``, ``eos_token_id``)."""
    import torch
    import transformers

    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose among {sorted(EXAMPLES)}")
    model_type, fields = EXAMPLES[name]
    fields = {"vocab_size": VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2, **fields, **changes}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            # N(0.05, 0.35²): off-centre, drawn in float64 and rounded once to the dtype
            values = 0.05 + 0.35 * rng.standard_normal(tuple(parameter.shape))
            parameter.copy_(torch.from_numpy(values))
    model.save_pretrained(path)
    return path
