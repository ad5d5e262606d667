"""Parameter counts and forward FLOPs per token (npformer.models.stats)."""

import numpy as np
import pytest

from npformer.models import build_model
from npformer.models.stats import forward_flops_per_token, parameter_count
from npformer.presets import preset_config, preset_names, tiny_config


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_equals_the_built_model(name):
    variants = [
        preset_config(name),
        tiny_config(name),
        preset_config(name, tie_embeddings=not preset_config(name).tie_embeddings, lm_head_bias=False),
        preset_config(name, d_model=96, n_heads=6, n_layers=3, vocab_size=300, max_seq_len=64),
    ]
    for config in variants:
        assert parameter_count(config) == build_model(config).num_parameters()


def test_flops_of_a_plain_decoder_by_hand():
    # gpt2-like: C=16, H=2, D=8, F=64, V=10, L=2, T=4, dense causal
    config = preset_config("gpt2", d_model=16, n_heads=2, n_layers=2, vocab_size=10, max_seq_len=4)
    C, F, V, T, L = 16, 64, 10, 4, 2
    per_layer = 2 * 4 * C * C + 2 * 2 * C * F + 2 * 2 * C * (T + 1) / 2
    assert forward_flops_per_token(config) == L * per_layer + 2 * C * V
    # Kaplan et al.: 2 · (non-embedding matrix parameters) + 2 · L · T_mean · C per token, + head
    matrices = L * (4 * C * C + 2 * C * F)
    assert forward_flops_per_token(config) == 2 * matrices + 2 * L * C * (T + 1) + 2 * C * V


def test_local_layers_cost_less_at_long_sequences():
    dense = preset_config("gpt2", max_seq_len=1024)
    banded = preset_config("gpt3", max_seq_len=1024)
    assert forward_flops_per_token(banded) < forward_flops_per_token(dense)
    # a window wider than the sequence is dense attention
    wide = preset_config("gpt3", max_seq_len=32, window=64)
    assert forward_flops_per_token(wide) == forward_flops_per_token(preset_config("gpt2", max_seq_len=32))


def test_grouped_query_attention_saves_projection_flops():
    llama1 = preset_config("llama1")
    llama2 = preset_config("llama2")
    C, D, L = llama1.d_model, llama1.head_size, llama1.n_layers
    saved_kv_heads = llama1.kv_heads - llama2.kv_heads
    assert forward_flops_per_token(llama1) - forward_flops_per_token(llama2) == \
        L * 2 * (2 * saved_kv_heads * D * C)
    assert np.isclose(parameter_count(llama1) - parameter_count(llama2), L * 2 * saved_kv_heads * D * C)
