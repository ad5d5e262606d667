"""The lineage, 2017 → 2024, as presets: each one is its parent plus what that model changed.

Reading ``LINEAGE`` top to bottom is reading the history: every entry lists only the fields
its paper changed, so ``ModelConfig`` of a preset is the 2017 Transformer with every change
along its ancestry applied in order. Sizes are small (C = 128, 4 layers, 4 heads) so that
each runs on a laptop CPU; scale them with overrides:

    config = preset_config("llama2", d_model=256, n_layers=8)

Facts that are a paper's choice and not forced by the architecture (eps values, the window
of a local layer, the rotary fraction) follow the published configurations where we know
them, scaled to the small default size; each is named in ``changes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    parent: Optional[str]
    year: int
    paper: str
    changes: str  # what changed relative to the parent, in words
    fields: Dict[str, object] = field(default_factory=dict)  # ... and as config fields


LINEAGE: List[Preset] = [
    Preset(
        "transformer-2017", None, 2017, "Vaswani et al., Attention Is All You Need",
        "encoder-decoder with cross-attention; post-LN; ReLU FFN; sinusoidal positions; "
        "biases everywhere; one embedding shared by encoder, decoder and output, scaled by √d",
        dict(architecture="encoder-decoder", norm_placement="post", final_norm=False,
             ffn="relu", positions="sinusoidal", qkv_bias=True, out_bias=True, ffn_bias=True,
             tie_embeddings=True, scale_embeddings=True, dropout=0.1, init_std=0.02),
    ),
    Preset(
        "gpt1", "transformer-2017", 2018, "Radford et al., Improving Language Understanding by "
        "Generative Pre-Training",
        "decoder only (no encoder, no cross-attention); learned positions; GeLU (tanh form); "
        "embeddings not scaled; still post-LN",
        dict(architecture="decoder", positions="learned", ffn="gelu_tanh",
             scale_embeddings=False),
    ),
    Preset(
        "gpt2", "gpt1", 2019, "Radford et al., Language Models are Unsupervised Multitask Learners",
        "pre-LN (norm before each branch); final LayerNorm; residual projections initialised "
        "with std/√(2L)",
        dict(norm_placement="pre", final_norm=True, scaled_residual_init=True),
    ),
    Preset(
        "gpt3", "gpt2", 2020, "Brown et al., Language Models are Few-Shot Learners",
        "alternating dense and locally banded (sliding-window) attention layers",
        dict(attention_pattern=("dense", "local"), window=64),
    ),
    Preset(
        "gpt-neo", "gpt3", 2021, "Black et al., GPT-Neo (EleutherAI)",
        "global/local alternation with a 256-key window in the original (64 here); "
        "no 1/√D attention scaling; no q/k/v biases (output bias kept); no dropout; plain "
        "N(0, 0.02²) init of the residual projections",
        dict(attention_pattern=("dense", "local"), window=64, attention_scale=1.0,
             qkv_bias=False, out_bias=True, dropout=0.0, scaled_residual_init=False),
    ),
    Preset(
        "gpt-j", "gpt-neo", 2021, "Wang & Komatsuzaki, GPT-J-6B",
        "parallel attention + FFN sharing one LayerNorm; RoPE, interleaved pairs on the first "
        "quarter of each head (64 of 256); all layers dense with 1/√D scaling; no attention "
        "biases; untied head with a bias",
        dict(block="parallel", parallel_norms=1, positions="rope", rope_layout="interleaved",
             rotary_dim=8, attention_pattern=("dense",), window=None, attention_scale=None,
             qkv_bias=False, out_bias=False, tie_embeddings=False, lm_head_bias=True),
    ),
    Preset(
        "gpt-neox", "gpt-j", 2022, "Black et al., GPT-NeoX-20B",
        "two LayerNorms in the parallel block (one per branch); RoPE half-split on 25% of "
        "each head; attention biases back; exact GeLU; head without bias",
        dict(parallel_norms=2, rope_layout="half", rotary_dim=8, qkv_bias=True, out_bias=True,
             ffn="gelu", lm_head_bias=False),
    ),
    Preset(
        "palm", "gpt-j", 2022, "Chowdhery et al., PaLM",
        "multi-query attention (one K/V head); no biases anywhere (not even LayerNorm's); "
        "SwiGLU FFN (width 4C); RoPE on the whole head; input and output embeddings shared",
        dict(n_kv_heads=1, qkv_bias=False, out_bias=False, ffn_bias=False, norm_bias=False,
             lm_head_bias=False, ffn="swiglu", ffn_multiplier=4.0, rotary_dim=None, rope_layout="half",
             tie_embeddings=True),
    ),
    Preset(
        "llama1", "palm", 2023, "Touvron et al., LLaMA",
        "back to a sequential pre-norm block; RMSNorm (eps 1e-6); multi-head attention again; "
        "SwiGLU width (8/3)C rounded up to a multiple (256 in the original, 32 here); untied head",
        dict(block="sequential", norm="rmsnorm", norm_eps=1e-6, n_kv_heads=None, ffn_multiplier=None,
             ffn_multiple_of=32, tie_embeddings=False),
    ),
    Preset(
        "llama2", "llama1", 2023, "Touvron et al., Llama 2",
        "grouped-query attention (K < H: 2 K/V heads for 4 query heads here); RMSNorm eps 1e-5",
        dict(n_kv_heads=2, norm_eps=1e-5),
    ),
    Preset(
        "llama3", "llama2", 2024, "Llama Team, The Llama 3 Herd of Models",
        "document mask: packed documents do not attend to each other; RoPE θ = 500000",
        dict(document_mask=True, rope_theta=500000.0),
    ),
]

PRESETS: Dict[str, Preset] = {p.name: p for p in LINEAGE}


def preset_names() -> List[str]:
    return [p.name for p in LINEAGE]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {preset_names()}")
    return PRESETS[name]


def ancestry(name: str) -> List[Preset]:
    """The preset's line from the 2017 Transformer down to it, oldest first."""
    line = []
    preset: Optional[Preset] = get_preset(name)
    while preset is not None:
        line.append(preset)
        preset = None if preset.parent is None else PRESETS[preset.parent]
    return line[::-1]


def preset_fields(name: str) -> Dict[str, object]:
    """The config fields of a preset: its ancestors' changes applied in order."""
    merged: Dict[str, object] = {}
    for preset in ancestry(name):
        merged.update(preset.fields)
    return merged


def preset_config(name: str, **overrides) -> ModelConfig:
    """The preset's ``ModelConfig`` with ``overrides`` applied (e.g. ``d_model=256``).

    An override naming an unknown field, or making the config impossible, raises a
    ``ValueError`` naming the field.
    """
    return ModelConfig().replace(**{**preset_fields(name), **overrides})


def tiny_overrides(name: str) -> Dict[str, object]:
    """Sizes for a tiny instance of a preset (gradient checks and tests): every feature of the
    preset kept, every dimension a handful, head size 6 (not a power of two)."""
    fields = preset_fields(name)
    tiny: Dict[str, object] = dict(vocab_size=11, d_model=12, n_heads=2, head_dim=6,
                                   n_layers=2, max_seq_len=16, d_ff=20)
    if fields.get("architecture") == "encoder-decoder":
        tiny["n_encoder_layers"] = 2
    if "local" in fields.get("attention_pattern", ()):
        tiny["window"] = 3
    if fields.get("rotary_dim") is not None:
        tiny["rotary_dim"] = 4  # partial rotary: 4 of the 6 dims of each head
    if fields.get("n_kv_heads") not in (None, 1):
        tiny.update(n_heads=4, n_kv_heads=2)  # grouped-query: 2 query heads per K/V head
    return tiny


def tiny_config(name: str, **overrides) -> ModelConfig:
    """A tiny instance of the preset (float64), for gradient checks."""
    return preset_config(name, **{**tiny_overrides(name), **overrides})
