"""The lineage: each preset really is what its LINEAGE row says, checked on built models.

Where a claim is about behaviour (a window, a RoPE layout, an attention scale, where the norm
sits, a document mask) it is checked by running the built modules against references
written here from the papers' formulas, with loops, and by showing that the neighbouring
variant (the other RoPE layout, the other scale, ...) would give a different answer — so
the test can tell the variants apart.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from npformer.models import DecoderLM, EncoderDecoder, build_model
from npformer.models.blocks import Dropout, ParallelBlock, SequentialBlock
from npformer.nn.norm import LayerNorm, RMSNorm
from npformer.presets import (
    LINEAGE,
    PRESETS,
    ancestry,
    preset_config,
    preset_fields,
    preset_names,
    tiny_config,
)

F64 = np.float64
NO_DROPOUT = Dropout(0.0, np.random.default_rng(0), False)
DECODERS = [name for name in preset_names() if name != "transformer-2017"]


def tiny(name, **overrides):
    return build_model(tiny_config(name, **overrides), seed=1).eval()


def scramble(module, rng, std=0.3):
    """Replace every parameter of ``module`` by unusual random values (in place), so that
    scales, biases and norm weights all matter."""
    for name, p in module.parameters().items():
        is_norm_weight = name.endswith("norm.weight") or (
            name == "weight" and isinstance(module, (LayerNorm, RMSNorm)))
        if is_norm_weight:
            p[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            p[...] = std * rng.standard_normal(p.shape) + (0.05 if name.endswith("bias") else 0.0)


def assert_differs(a, b, what, rel=1e-4):
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert diff > rel * float(np.max(np.abs(b))), f"{what}: the two variants agree (max diff {diff:.3e})"


def assert_same(a, b, what):
    # changes that must not propagate leave the values equal up to rounding
    assert_close(a, b, F64, what, rtol=1e-13, atol=0.0)


def param_names(model):
    return set(model.parameters())


# ------------------------------------------------------------------------------------------
# References, from the formulas
# ------------------------------------------------------------------------------------------


def linear(x, module):
    bias = module.params.get("bias")
    return x @ module.params["weight"].T + (0.0 if bias is None else bias)


def reference_rope(x, theta, rotary_dim, layout):
    """x (B, n, T, D) at positions 0..T-1: rotate pair i by pos · theta^(-2i/r).

    half (GPT-NeoX, Llama): pairs (i, i + r/2); interleaved (GPT-J): pairs (2i, 2i + 1);
    dims >= r pass through."""
    T, D = x.shape[-2:]
    r = D if rotary_dim is None else rotary_dim
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, r, 2) / r)  # (T, r/2)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (np.arange(r // 2), np.arange(r // 2, r)) if layout == "half" else \
        (np.arange(0, r, 2), np.arange(1, r, 2))
    y = x.copy()
    y[..., a] = x[..., a] * cos - x[..., b] * sin
    y[..., b] = x[..., b] * cos + x[..., a] * sin
    return y


def reference_attention(attn, x, *, scale, causal=True, window=None, rope=None, doc_ids=None,
                        memory=None):
    """One query at a time: softmax over the visible keys of scale · q·k, then Σ p v."""
    B, T, _ = x.shape
    source = x if memory is None else memory
    S = source.shape[1]
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = linear(x, attn.q_proj).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = linear(source, attn.k_proj).reshape(B, S, K, D).transpose(0, 2, 1, 3)
    v = linear(source, attn.v_proj).reshape(B, S, K, D).transpose(0, 2, 1, 3)
    if rope is not None:
        q, k = reference_rope(q, **rope), reference_rope(k, **rope)
    o = np.zeros((B, H, T, D))
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)  # query head h reads kv head h // G
            for i in range(T):
                visible = [j for j in range(S)
                           if (not causal or j <= i)
                           and (window is None or i - j < window)
                           and (doc_ids is None or doc_ids[b, i] == doc_ids[b, j])]
                s = scale * (k[b, kv, visible] @ q[b, h, i])
                p = np.exp(s - s.max())
                o[b, h, i] = (p / p.sum()) @ v[b, kv, visible]
    return linear(o.transpose(0, 2, 1, 3).reshape(B, T, H * D), attn.out_proj)


def reference_sinusoids(T, C):
    """2017: PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(pos / 10000^(2i/C))."""
    pe = np.zeros((T, C))
    for pos in range(T):
        for i in range(C // 2):
            pe[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / C))
            pe[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / C))
    return pe


def torch_ffn(ffn, x, kind):
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=F64))  # noqa: E731
    xt = t(x)
    up = F.linear(xt, t(ffn.up.params["weight"]),
                  None if "bias" not in ffn.up.params else t(ffn.up.params["bias"]))
    if kind in ("swiglu", "geglu"):
        gate = F.linear(xt, t(ffn.gate.params["weight"]))
        act = F.silu(gate) if kind == "swiglu" else F.gelu(gate)
        h = act * up
    else:
        h = {"relu": F.relu, "gelu": F.gelu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[kind](up)
    down_bias = ffn.down.params.get("bias")
    return F.linear(h, t(ffn.down.params["weight"]), None if down_bias is None else t(down_bias)).numpy()


def residual_input(rng, B=2, T=7, C=12):
    return rng.standard_normal((B, T, C)) * 1.3 + 0.4


# what each preset's attention is, written out by hand from the LINEAGE rows (tiny sizes:
# head 6, rotary 4 where the preset is partial, window 3 where it is local)
INV_SQRT_D = 1 / math.sqrt(6)
ROPE_WHOLE_HEAD = dict(theta=10000.0, rotary_dim=None, layout="half")
ATTENTION = {
    "gpt1": dict(scale=INV_SQRT_D, windows=(None,), rope=None),
    "gpt2": dict(scale=INV_SQRT_D, windows=(None,), rope=None),
    "gpt3": dict(scale=INV_SQRT_D, windows=(None, 3), rope=None),
    "gpt-neo": dict(scale=1.0, windows=(None, 3), rope=None),
    "gpt-j": dict(scale=INV_SQRT_D, windows=(None,),
                  rope=dict(theta=10000.0, rotary_dim=4, layout="interleaved")),
    "gpt-neox": dict(scale=INV_SQRT_D, windows=(None,),
                     rope=dict(theta=10000.0, rotary_dim=4, layout="half")),
    "palm": dict(scale=INV_SQRT_D, windows=(None,), rope=ROPE_WHOLE_HEAD),
    "llama1": dict(scale=INV_SQRT_D, windows=(None,), rope=ROPE_WHOLE_HEAD),
    "llama2": dict(scale=INV_SQRT_D, windows=(None,), rope=ROPE_WHOLE_HEAD),
    "llama3": dict(scale=INV_SQRT_D, windows=(None,), rope=dict(ROPE_WHOLE_HEAD, theta=500000.0)),
}


def test_every_decoder_preset_has_an_attention_row():
    assert sorted(ATTENTION) == sorted(DECODERS)


# ------------------------------------------------------------------------------------------
# The lineage table itself
# ------------------------------------------------------------------------------------------


def test_lineage_is_a_tree_rooted_at_2017():
    names = [p.name for p in LINEAGE]
    assert names == preset_names() and len(set(names)) == len(names)
    assert LINEAGE[0].name == "transformer-2017" and LINEAGE[0].parent is None
    years = [p.year for p in LINEAGE]
    assert years == sorted(years), f"LINEAGE years go backwards: {years}"
    for index, preset in enumerate(LINEAGE):
        line = ancestry(preset.name)
        assert line[0].name == "transformer-2017"
        assert line[-1] is preset
        if preset.parent is not None:
            assert preset.parent in PRESETS
            assert preset.parent in names[:index], f"{preset.name}'s parent comes after it"
            assert PRESETS[preset.parent].year <= preset.year
        for older, newer in zip(line, line[1:]):
            assert newer.parent == older.name
        assert preset.paper and preset.changes


@pytest.mark.parametrize("name", preset_names())
def test_every_listed_change_lands_in_the_config(name):
    merged = {}
    for preset in ancestry(name):
        merged.update(preset.fields)
    assert preset_fields(name) == merged
    config = preset_config(name)
    for field, value in merged.items():
        actual = getattr(config, field)
        assert (tuple(actual) if isinstance(value, tuple) else actual) == value, field


# ------------------------------------------------------------------------------------------
# Attention of every layer of every decoder preset, against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
def test_attention_of_every_layer_matches_the_reference(name):
    expected = ATTENTION[name]
    model = tiny(name, n_layers=4)
    rng = np.random.default_rng(7)
    x = residual_input(rng, C=model.config.d_model)
    for layer, block in enumerate(model.layers):
        scramble(block.attn, rng)
        window = expected["windows"][layer % len(expected["windows"])]
        y, _ = block.attn.forward(x)
        ref = reference_attention(block.attn, x, scale=expected["scale"], window=window,
                                  rope=expected["rope"])
        assert_close(y, ref, F64, f"{name} layer {layer} attention", rtol=1e-12)


# ------------------------------------------------------------------------------------------
# transformer-2017
# ------------------------------------------------------------------------------------------


def test_transformer_2017_is_an_encoder_decoder():
    model = tiny("transformer-2017")
    assert isinstance(model, EncoderDecoder) and not isinstance(model, DecoderLM)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 7))
    logits = model.train().forward(src, tgt)
    assert logits.shape == (2, 7, 11) and logits.dtype == F64
    d_src, d_tgt = model.backward(rng.standard_normal(logits.shape))
    assert d_src.shape == (2, 5, 12) and d_tgt.shape == (2, 7, 12)
    names = param_names(model)
    assert any(".cross_attn.q_proj.weight" in n for n in names)  # cross-attention
    assert {n.split(".")[0] for n in names} == {"embed", "encoder", "decoder"}
    # one table for source, target and output; sinusoids (no parameters); no final norms
    assert [n for n in names if n.startswith("embed")] == ["embed.tokens.weight"]
    assert model.source_embedding is model.embed
    assert not any("position" in n or "norm" in n.split(".")[0] or n.startswith("lm_head")
                   for n in names)


def test_transformer_2017_embeddings_are_scaled_plus_sinusoids():
    model = tiny("transformer-2017")
    ids = np.array([[3, 1, 4, 1, 5, 9, 2]])
    x, _ = model.embed.forward(ids, np.arange(7), NO_DROPOUT)
    W = model.embed.tokens.params["weight"]
    assert_close(x, math.sqrt(12) * W[ids] + reference_sinusoids(7, 12), F64, "embedding")
    assert_differs(x, W[ids] + reference_sinusoids(7, 12), "unscaled")


@pytest.mark.parametrize("name", ["transformer-2017", "gpt1"])
def test_post_norm_blocks_end_with_a_norm(name):
    # post-norm: y = n(x + ffn(x)), so each block output is normalised (unit norm weights);
    # a pre-norm block's output is the raw residual stream
    model = tiny(name)
    rng = np.random.default_rng(3)
    x = residual_input(rng) * 2.0 + 1.0
    blocks = list(model.encoder) + list(model.decoder) if name == "transformer-2017" else list(model.layers)
    for block in blocks:
        assert isinstance(block, SequentialBlock) and not block.pre_norm
        kwargs = dict(memory=residual_input(rng, T=5)) if block.has_cross else {}
        y, _ = block.forward(x, NO_DROPOUT, **kwargs)
        assert np.allclose(y.mean(axis=-1), 0.0, atol=1e-12)
        assert np.allclose(y.var(axis=-1), 1.0, atol=1e-4)
    pre = tiny("gpt2").layers[0]
    y, _ = pre.forward(x, NO_DROPOUT)
    assert not np.allclose(y.mean(axis=-1), 0.0, atol=1e-2)


def test_transformer_2017_attention_and_relu_ffn():
    model = tiny("transformer-2017")
    rng = np.random.default_rng(5)
    x, memory = residual_input(rng), residual_input(rng, T=5)
    scale = INV_SQRT_D
    encoder_block, decoder_block = model.encoder[1], model.decoder[1]
    for module in (encoder_block, decoder_block):
        scramble(module, rng)
    y, _ = encoder_block.attn.forward(x)  # the encoder sees the whole source
    assert_close(y, reference_attention(encoder_block.attn, x, scale=scale, causal=False), F64, "encoder")
    y, _ = decoder_block.attn.forward(x)
    assert_close(y, reference_attention(decoder_block.attn, x, scale=scale), F64, "decoder self")
    y, _ = decoder_block.cross_attn.forward(x, memory=memory)
    ref = reference_attention(decoder_block.cross_attn, x, scale=scale, causal=False, memory=memory)
    assert_close(y, ref, F64, "cross")
    y, _ = encoder_block.ffn.forward(x)
    assert_close(y, torch_ffn(encoder_block.ffn, x, "relu"), F64, "relu FFN")
    assert_differs(y, torch_ffn(encoder_block.ffn, x, "gelu"), "relu vs gelu")


# ------------------------------------------------------------------------------------------
# Tied / untied heads, behaviourally: a row of W_tok that no input uses
# ------------------------------------------------------------------------------------------

TIED = {"transformer-2017": True, "gpt1": True, "gpt2": True, "gpt3": True, "gpt-neo": True,
        "gpt-j": False, "gpt-neox": False, "palm": True, "llama1": False, "llama2": False,
        "llama3": False}


@pytest.mark.parametrize("name", preset_names())
def test_head_is_tied_exactly_where_the_lineage_says(name):
    model = tiny(name)
    ids = np.array([[1, 2, 3, 4, 2, 1]])
    run = (lambda: model.forward(ids, ids)) if name == "transformer-2017" else (lambda: model.forward(ids))
    before = run()
    # token 7 is not an input (a random change: a constant one is invisible after a LayerNorm,
    # whose output sums to zero)
    model.embed.tokens.params["weight"][7] += 0.5 * np.random.default_rng(0).standard_normal(12)
    after = run()
    others = np.delete(np.arange(11), 7)
    assert_same(after[..., others], before[..., others], "logits of other tokens")
    if TIED[name]:
        assert "lm_head.weight" not in param_names(model)
        assert_differs(after[..., 7], before[..., 7], "logit of the changed row")
    else:
        assert model.parameters()["lm_head.weight"].shape == (11, 12)
        assert_same(after[..., 7], before[..., 7], "untied head")


# ------------------------------------------------------------------------------------------
# gpt1, gpt2
# ------------------------------------------------------------------------------------------


def test_gpt1_learned_positions_post_norm_gelu_tanh():
    model = tiny("gpt1")
    assert isinstance(model, DecoderLM)
    names = param_names(model)
    assert model.parameters()["embed.position_table"].shape == (16, 12)  # (max_seq_len, C)
    assert not any(n.startswith("final_norm") for n in names)
    ids = np.array([[3, 1, 4, 1, 5]])
    x, _ = model.embed.forward(ids, np.arange(5), NO_DROPOUT)
    P = model.parameters()["embed.position_table"]
    assert_close(x, model.embed.tokens.params["weight"][ids] + P[:5], F64, "learned positions")
    rng = np.random.default_rng(11)
    ffn = model.layers[0].ffn
    scramble(ffn, rng, std=0.8)
    h = residual_input(rng)
    y, _ = ffn.forward(h)
    assert_close(y, torch_ffn(ffn, h, "gelu_tanh"), F64, "gelu tanh FFN", rtol=1e-12)
    assert_differs(y, torch_ffn(ffn, h, "gelu"), "tanh vs exact gelu", rel=1e-6)


def test_gpt2_pre_norm_final_norm_tied():
    model = tiny("gpt2")
    names = param_names(model)
    assert {"final_norm.weight", "final_norm.bias"} <= names
    assert not any(n.startswith("lm_head") for n in names)
    assert all(block.pre_norm for block in model.layers)
    # the final norm is applied: with a zero final-norm bias and weight w, scaling w scales logits
    ids = np.array([[1, 2, 3]])
    before = model.forward(ids)
    model.parameters()["final_norm.weight"][...] *= 3.0
    assert_close(model.forward(ids), 3.0 * before, F64, "final norm weight scales the logits")


@pytest.mark.parametrize("name, scaled", [("gpt2", True), ("gpt3", True), ("gpt-neo", False),
                                          ("gpt1", False)])
def test_residual_projections_init(name, scaled):
    # default size (C = 128, L = 4): GPT-2's out_proj and ffn.down start with std 0.02 / √(2L)
    model = build_model(preset_config(name))
    L = model.config.n_layers
    expected = 1 / math.sqrt(2 * L) if scaled else 1.0
    for block in model.layers:
        reference = block.attn.q_proj.params["weight"].std()
        assert abs(reference / 0.02 - 1) < 0.05
        for proj in (block.attn.out_proj, block.ffn.down):
            ratio = proj.params["weight"].std() / reference
            assert abs(ratio / expected - 1) < 0.05, (name, ratio, expected)


# ------------------------------------------------------------------------------------------
# gpt3 / gpt-neo: local layers
# ------------------------------------------------------------------------------------------


def test_gpt3_local_layer_does_not_see_beyond_its_window():
    model = tiny("gpt3", n_layers=4)  # window 3: query i sees keys i-2, i-1, i
    rng = np.random.default_rng(2)
    x = residual_input(rng, B=1, T=8)
    x_changed = x.copy()
    x_changed[0, 0] += 1.5  # token 0: more than `window` positions behind queries 3..7
    for layer, block in enumerate(model.layers):
        scramble(block.attn, rng)
        y, _ = block.attn.forward(x)
        y_changed, _ = block.attn.forward(x_changed)
        if layer % 2:  # local
            assert_same(y_changed[0, 3:], y[0, 3:], f"local layer {layer} beyond its window")
            assert_differs(y_changed[0, 1:3], y[0, 1:3], f"local layer {layer} inside its window")
        else:  # dense
            assert_differs(y_changed[0, 3:], y[0, 3:], f"dense layer {layer}")


def test_a_one_layer_local_model_is_blind_beyond_its_window():
    model = tiny("gpt3", n_layers=1, attention_pattern=("local",))
    rng = np.random.default_rng(4)
    scramble(model, rng)
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    changed = ids.copy()
    changed[0, 0] = 9
    before, after = model.forward(ids), model.forward(changed)
    assert_same(after[0, 3:], before[0, 3:], "logits beyond the window")
    assert_differs(after[0, :3], before[0, :3], "logits inside the window")
    # the same weights in a dense layer: the change reaches every later position
    dense = tiny("gpt3", n_layers=1, attention_pattern=("dense",), window=None)
    for name, p in dense.parameters().items():
        p[...] = model.parameters()[name]
    assert_differs(dense.forward(changed)[0, 3:], dense.forward(ids)[0, 3:], "dense model")


def test_gpt_neo_scores_are_not_scaled_and_only_out_proj_has_a_bias():
    model = tiny("gpt-neo")
    names = param_names(model)
    for layer in range(2):
        prefix = f"layers.{layer}.attn."
        assert not any(f"{prefix}{p}.bias" in names for p in ("q_proj", "k_proj", "v_proj"))
        assert f"{prefix}out_proj.bias" in names
    rng = np.random.default_rng(6)
    attn = model.layers[0].attn
    scramble(attn, rng)
    x = residual_input(rng)
    y, _ = attn.forward(x)
    assert_close(y, reference_attention(attn, x, scale=1.0), F64, "unscaled scores")
    assert_differs(y, reference_attention(attn, x, scale=INV_SQRT_D), "1/sqrt(D) scores")


# ------------------------------------------------------------------------------------------
# Parallel blocks and RoPE: gpt-j, gpt-neox, palm
# ------------------------------------------------------------------------------------------


def attention_bias_names(names):
    return [n for n in names if ".attn." in n and n.endswith("bias")]


def check_parallel_block(block, two_norms, rng):
    scramble(block, rng)
    x = residual_input(rng)
    y, _ = block.forward(x, NO_DROPOUT)
    n1 = block.attn_norm.forward(x)[0]
    n2 = block.ffn_norm.forward(x)[0] if two_norms else n1
    expected = x + block.attn.forward(n1)[0] + block.ffn.forward(n2)[0]
    assert_close(y, expected, F64, "parallel block")
    if two_norms:  # with distinct norm weights, sharing n1 would be wrong
        assert_differs(y, x + block.attn.forward(n1)[0] + block.ffn.forward(n1)[0], "one norm")


def test_gpt_j_parallel_one_norm_interleaved_partial_rope_untied_biased_head():
    model = tiny("gpt-j")
    names = param_names(model)
    assert all(isinstance(b, ParallelBlock) for b in model.layers)
    assert not any("ffn_norm" in n for n in names)
    assert attention_bias_names(names) == []
    assert {"lm_head.weight", "lm_head.bias"} <= names
    rng = np.random.default_rng(8)
    check_parallel_block(model.layers[0], False, rng)
    attn = model.layers[1].attn
    scramble(attn, rng)
    x = residual_input(rng)
    y, _ = attn.forward(x)
    rope = dict(theta=10000.0, rotary_dim=4, layout="interleaved")
    assert_close(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=rope), F64, "interleaved")
    for other in (dict(rope, layout="half"), dict(rope, rotary_dim=None)):
        assert_differs(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=other), str(other))
    # the head's bias is added to the logits
    ids = np.array([[1, 2, 3]])
    before = model.forward(ids)
    bias = rng.standard_normal(11)
    model.parameters()["lm_head.bias"][...] += bias
    assert_close(model.forward(ids), before + bias, F64, "head bias")


def test_gpt_neox_parallel_two_norms_half_split_rope():
    model = tiny("gpt-neox")
    names = param_names(model)
    assert all(isinstance(b, ParallelBlock) for b in model.layers)
    assert {f"layers.{l}.ffn_norm.weight" for l in range(2)} <= names
    assert "lm_head.bias" not in names and "lm_head.weight" in names
    rng = np.random.default_rng(9)
    check_parallel_block(model.layers[0], True, rng)
    attn = model.layers[1].attn
    scramble(attn, rng)
    x = residual_input(rng)
    y, _ = attn.forward(x)
    rope = dict(theta=10000.0, rotary_dim=4, layout="half")
    assert_close(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=rope), F64, "half")
    assert_differs(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=dict(rope, layout="interleaved")),
                   "interleaved")


def test_palm_no_bias_multi_query_swiglu_tied():
    for model in (tiny("palm"), build_model(preset_config("palm"))):
        params = model.parameters()
        assert [n for n in params if n.endswith("bias")] == []
        D = model.config.head_size
        for l in range(model.config.n_layers):
            prefix = f"layers.{l}."
            assert params[prefix + "attn.k_proj.weight"].shape[0] == D  # one K/V head
            assert params[prefix + "attn.v_proj.weight"].shape[0] == D
            assert params[prefix + "attn.q_proj.weight"].shape[0] == model.config.n_heads * D
            assert prefix + "ffn.gate.weight" in params
        assert not any(n.startswith("lm_head") for n in params)
    model = tiny("palm")
    rng = np.random.default_rng(10)
    check_parallel_block(model.layers[0], False, rng)
    ffn = model.layers[1].ffn
    scramble(ffn, rng)
    x = residual_input(rng)
    y, _ = ffn.forward(x)
    assert_close(y, torch_ffn(ffn, x, "swiglu"), F64, "swiglu", rtol=1e-12)
    assert_differs(y, torch_ffn(ffn, x, "geglu"), "geglu")
    # default size: SwiGLU of width 4C (not 8C/3)
    assert build_model(preset_config("palm")).parameters()["layers.0.ffn.up.weight"].shape == (512, 128)


# ------------------------------------------------------------------------------------------
# Llama
# ------------------------------------------------------------------------------------------


def test_llama1_rmsnorm_sequential_untied_mha():
    model = tiny("llama1")
    names = param_names(model)
    assert [n for n in names if "norm" in n and n.endswith("bias")] == []
    assert all(isinstance(b, SequentialBlock) and b.pre_norm for b in model.layers)
    assert "lm_head.weight" in names and "lm_head.bias" not in names
    params = model.parameters()
    assert params["layers.0.attn.k_proj.weight"].shape == params["layers.0.attn.q_proj.weight"].shape
    norm = model.layers[0].attn_norm
    assert isinstance(norm, RMSNorm)
    rng = np.random.default_rng(12)
    x = residual_input(rng) * 3.0 + 2.0  # a non-zero mean: LayerNorm would remove it
    y, _ = norm.forward(x)
    rms = np.sqrt(np.mean(y ** 2, axis=-1))
    ms = np.mean(x ** 2, axis=-1)
    assert_close(rms, np.sqrt(ms / (ms + 1e-6)), F64, "rms of the output")  # eps 1e-6
    assert np.all(np.abs(y.mean(axis=-1)) > 0.1)  # not centred
    assert_close(y, x / np.sqrt(ms + 1e-6)[..., None], F64, "rmsnorm")


def test_llama2_grouped_query_attention():
    for model in (tiny("llama2"), build_model(preset_config("llama2"))):
        params = model.parameters()
        q, k, v = (params[f"layers.0.attn.{p}_proj.weight"].shape[0] for p in "qkv")
        assert 1 < model.config.kv_heads < model.config.n_heads
        assert k == v == model.config.kv_heads * model.config.head_size < q
    # the rmsnorm eps went back to 1e-5
    assert tiny("llama2").layers[0].attn_norm.eps == 1e-5


def test_llama3_document_mask():
    model = tiny("llama3")
    rng = np.random.default_rng(13)
    scramble(model, rng)
    ids = np.array([[1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1]])
    doc_ids = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]])
    changed = ids.copy()
    changed[0, :3] = [9, 10, 8]  # rewrite document 0 of row 0
    changed[1, 2:5] = [0, 0, 0]  # rewrite document 1 of row 1
    before, after = model.forward(ids, doc_ids), model.forward(changed, doc_ids)
    assert_same(after[0, 3:], before[0, 3:], "document 1 of row 0")
    assert_same(after[1, :2], before[1, :2], "document 0 of row 1")
    assert_same(after[1, 5:], before[1, 5:], "document 2 of row 1")
    assert_differs(after[0, :3], before[0, :3], "the rewritten document")
    # without doc_ids the later documents see the change
    plain_before, plain_after = model.forward(ids), model.forward(changed)
    assert_differs(plain_after[0, 3:], plain_before[0, 3:], "no document mask")
    assert_differs(plain_after[1, 5:], plain_before[1, 5:], "no document mask")
    # the masked model's first document is just a model run on that document alone
    assert_same(before[0, :3], model.forward(ids[:1, :3], doc_ids[:1, :3])[0], "document 0 alone")


def test_llama3_rope_theta_is_500000():
    model = tiny("llama3")
    rng = np.random.default_rng(14)
    attn = model.layers[0].attn
    scramble(attn, rng)
    x = residual_input(rng, T=9)
    y, _ = attn.forward(x)
    rope = dict(theta=500000.0, rotary_dim=None, layout="half")
    assert_close(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=rope), F64, "theta 5e5")
    assert_differs(y, reference_attention(attn, x, scale=INV_SQRT_D, rope=dict(rope, theta=10000.0)),
                   "theta 1e4")


# ------------------------------------------------------------------------------------------
# Post-norm vs pre-norm
# ------------------------------------------------------------------------------------------


def test_post_and_pre_norm_differ_with_the_same_weights():
    post = tiny("gpt1")
    pre = tiny("gpt2", final_norm=False)
    control = build_model(tiny_config("gpt1"), seed=5).eval()
    shapes = {n: p.shape for n, p in post.parameters().items()}
    assert {n: p.shape for n, p in pre.parameters().items()} == shapes
    rng = np.random.default_rng(15)
    scramble(post, rng)
    for model in (pre, control):
        for n, p in model.parameters().items():
            p[...] = post.parameters()[n]
    ids = np.array([[1, 5, 2, 8, 3]])
    assert_close(control.forward(ids), post.forward(ids), F64, "same config, same weights")
    assert_differs(pre.forward(ids), post.forward(ids), "pre vs post norm")


def zero_branches(block):
    for name, p in block.parameters().items():
        if name.startswith(("attn.", "ffn.")):
            p[...] = 0.0


@pytest.mark.parametrize("name", ["gpt2", "gpt-j", "gpt-neox", "llama2"])
def test_pre_norm_residual_stream_is_the_identity_when_branches_are_zero(name):
    block = tiny(name).layers[0]
    rng = np.random.default_rng(16)
    scramble(block, rng)
    zero_branches(block)
    x = residual_input(rng)
    y, cache = block.forward(x, NO_DROPOUT)
    np.testing.assert_array_equal(y, x)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(block.backward(dy, cache), dy)


def test_post_norm_residual_stream_is_not_the_identity():
    block = tiny("gpt1").layers[0]
    rng = np.random.default_rng(17)
    scramble(block, rng)
    zero_branches(block)
    x = residual_input(rng)
    y, cache = block.forward(x, NO_DROPOUT)
    assert_differs(y, x, "post-norm forward")
    dy = rng.standard_normal(x.shape)
    dx = block.backward(dy, cache)
    assert_differs(dx, dy, "post-norm backward")
    # with zero branches the post-norm block is two norms in a row
    n1 = block.attn_norm.forward(x)[0]
    assert_close(y, block.ffn_norm.forward(n1)[0], F64, "n2(n1(x))")


# ------------------------------------------------------------------------------------------
# Every preset runs, end to end
# ------------------------------------------------------------------------------------------


def structurally_zero(name, config):
    """Entries whose gradient is zero for a structural reason, not a bug (True = zero).

    A key bias b_k adds q_i·b_k to every score of row i, the same for every key j, and softmax
    is invariant to a shift of its row, so ∂L/∂b_k = Σ_i q_i Σ_j ds_ij = 0 (each row of the
    softmax backward ds sums to zero); it comes out as rounding noise, ~1e-18. With RoPE this
    holds only for the channels that are not rotated: a rotated bias R_j b_k differs from key
    to key, so the rotated channels (the first rotary_dim of each head, GPT-NeoX) do learn.
    """
    if not name.endswith("k_proj.bias"):
        return None
    zero = np.ones((config.kv_heads, config.head_size), dtype=bool)
    if config.positions == "rope" and ".cross_attn." not in name:
        zero[:, : config.rotary_dim or config.head_size] = False
    return zero.reshape(-1)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_runs_forward_and_backward(name):
    config = tiny_config(name)
    model = build_model(config, seed=3)  # training mode: presets with dropout use it
    rng = np.random.default_rng(18)
    B, T, V, C = 2, 9, config.vocab_size, config.d_model
    ids = rng.integers(0, V, (B, T))
    if config.architecture == "encoder-decoder":
        src = rng.integers(0, V, (B, 6))
        logits = model.forward(src, ids)
    else:
        doc_ids = np.array([[0] * 4 + [1] * 5, [0] * 9]) if config.document_mask else None
        logits = model.forward(ids, doc_ids)
    assert logits.shape == (B, T, V) and logits.dtype == F64
    assert np.all(np.isfinite(logits))
    model.zero_grad()
    d_tokens = model.backward(rng.standard_normal((B, T, V)))
    if config.architecture == "encoder-decoder":
        assert d_tokens[0].shape == (B, 6, C) and d_tokens[1].shape == (B, T, C)
    else:
        assert d_tokens.shape == (B, T, C)
    grads = model.gradients()
    assert set(grads) == set(model.parameters())
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    for n, g in grads.items():
        assert g.shape == model.parameters()[n].shape and g.dtype == F64
        assert np.all(np.isfinite(g)), n
        zero = structurally_zero(n, config)
        if zero is None:
            zero = np.zeros(g.shape, dtype=bool)
        else:
            assert np.max(np.abs(g[zero])) <= 1e-12 * scale, f"{n}: {np.max(np.abs(g[zero])):.3e}"
        if not zero.all():
            assert np.max(np.abs(g[~zero])) > 1e-9 * scale, f"{n} got no gradient"


def test_parameter_counts_at_default_size():
    counts = {name: build_model(preset_config(name)).num_parameters() for name in preset_names()}
    assert all(c > 0 for c in counts.values())
    # presets whose parameters are the same shapes (they differ in masks and init only)
    same = [("gpt2", "gpt3"), ("llama2", "llama3")]
    for a, b in same:
        assert counts[a] == counts[b]
    distinct = {counts[n] for n in preset_names() if n not in ("gpt3", "llama3")}
    assert len(distinct) == len(preset_names()) - 2, counts
    assert counts["palm"] != counts["gpt-j"]
    # by hand: gpt2, V = 65, C = 128, P = 256, L = 4, F = 512
    V, C, P, L, F_ = 65, 128, 256, 4, 512
    per_layer = (4 * C * C + 4 * C) + (2 * C * F_ + F_ + C) + 2 * 2 * C
    assert counts["gpt2"] == V * C + P * C + L * per_layer + 2 * C
    # llama2: K·D = 2·32 = 64, F = int(8·128/3) = 341 -> 352 (multiple of 32), untied head, RMSNorm
    F_ = 352
    per_layer = 2 * C * C + 2 * C * 64 + 3 * C * F_ + 2 * C
    assert counts["llama2"] == 2 * V * C + L * per_layer + C
