"""Hugging Face parity of Mistral, Qwen2, Qwen3 and Phi-3 (issue 16) through
``npformer.interop.load_hf`` / ``save_hf``.

Every checkpoint is a tiny ``transformers`` model with random, off-centre weights (norm gains
N(1, 0.25²), matrices N(0.05, 0.35²)) written by its own ``save_pretrained``. Per family:

- ``compare_hf_dir`` (the code behind ``npformer compare --hf DIR``): logits, loss and the
  gradient of every checkpoint tensor (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
  included: our q/k/v and gate/up gradients joined back by the same rule) against
  transformers, float64 under ``exact_float64`` within 1e-10 relative, float32 stock within
  1e-4 (+1e-5 absolute); the worst relative error per family and dtype is printed (-s);
- the round trip load_hf → save_hf → from_pretrained with byte-equal tensors;
- decoding with the key/value cache, token by token, equals the full forward;
- the sliding window bites: T = 7 > window, the windowed model's logits differ from the
  same weights run dense (and transformers agrees with the windowed one);
- configs we cannot reproduce (LongRoPE, an unknown activation or layer type, key/value
  heads that do not divide the heads, an odd partial rotary width, sliding layers without
  a window) are ValueErrors naming the config.json field.

Family facts checked against transformers 5.24 (models/<family>/modeling_*.py): Mistral and
Phi-3 build one sliding-window mask for all layers when ``sliding_window`` is not null;
Qwen2/Qwen3 drop ``sliding_window`` unless ``use_sliding_window`` and give each layer the mask
of its ``layer_types`` entry (absent: sliding for layers ≥ ``max_window_layers``); the window
keeps keys i − w < j ≤ i (masking_utils.sliding_window_overlay). Qwen2's q/k/v have biases and
its o does not, whatever ``attention_bias`` says; Mistral and Phi-3 have none. Phi-3 rotates
the first int(D · partial_rotary_factor) channels half-split (apply_rotary_pos_emb keeps the
rest) and accepts only the default and LongRoPE (its config renames "su" and "yarn" to
"longrope").
"""

import json

import numpy as np
import pytest
import torch
import transformers

from helpers import assert_close, assert_hf_round_trip, edit_config_json, max_errors
from npformer.config import ModelConfig
from npformer.interop import load_hf, save_hf
from npformer.interop.compare import compare_hf_dir
from npformer.interop.hf_config import GLU_ACTIVATIONS, PLAIN_ACTIVATIONS, _architecture
from npformer.interop.hf_float64 import exact_float64, float64_patches
from npformer.models import DecoderLM

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 41  # vocabulary
PAD = 1  # pad_token_id of every case (compare_hf_dir's batch may hold it)
T = 7  # compare_hf_dir's sequence length; every window below is shorter
MISMATCH = 1e-6  # a trap variant must miss by this much (10⁴ × the float64 tolerance)


def _rope(theta, **extra):
    return dict(rope_type="default", rope_theta=theta, **extra)


# (model_type, transformers config fields, what load_hf must make of it). Heads of 6 channels.
CASES = {
    # Mistral 7B's shape in small: GQA 3 → 1, window 4 on both layers, untied head
    "mistral-window": ("mistral", dict(
        hidden_size=18, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=2,
        intermediate_size=22, max_position_embeddings=16, sliding_window=4,
        tie_word_embeddings=False, rope_parameters=_rope(1000000.0)),
        dict(attention_pattern=("local",), window=4, n_kv_heads=1, qkv_bias=False,
             out_bias=False, tie_embeddings=False)),
    # Mistral v0.2+: sliding_window null (dense), H·D = 24 ≠ C = 18, tied head, GeGLU
    "mistral-dense": ("mistral", dict(
        hidden_size=18, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
        num_hidden_layers=2, intermediate_size=14, max_position_embeddings=16,
        sliding_window=None, tie_word_embeddings=True, hidden_act="gelu",
        rope_parameters=_rope(10000.0)),
        dict(attention_pattern=("dense",), window=None, n_kv_heads=2, head_dim=6, ffn="geglu",
             tie_embeddings=True)),
    # Qwen2: layers ≥ max_window_layers = 1 slide (window 3), biased q/k/v, tied (Qwen2-0.5B)
    "qwen2-window": ("qwen2", dict(
        hidden_size=24, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        intermediate_size=20, max_position_embeddings=16, use_sliding_window=True,
        sliding_window=3, max_window_layers=1, tie_word_embeddings=True,
        rope_parameters=_rope(1000000.0)),
        dict(attention_pattern=("dense", "local", "local"), window=3, qkv_bias=True,
             out_bias=False, tie_embeddings=True)),
    # Qwen2 with an explicit layer_types (it wins over max_window_layers), untied, MHA
    "qwen2-layer-types": ("qwen2", dict(
        hidden_size=12, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=20, max_position_embeddings=16, use_sliding_window=True,
        sliding_window=2, max_window_layers=5,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
        rope_parameters=_rope(10000.0)),
        dict(attention_pattern=("local", "dense"), window=2, qkv_bias=True, out_bias=False,
             tie_embeddings=False)),
    # Qwen3: q/k RMSNorms per head, layers ≥ 2 slide (window 3), biases on q, k, v and o
    # (attention_bias), the tanh-GeLU gate (geglu_tanh) under one of its ACT2FN names
    "qwen3-window": ("qwen3", dict(
        hidden_size=18, num_attention_heads=3, num_key_value_heads=1, head_dim=6,
        num_hidden_layers=3, intermediate_size=22, max_position_embeddings=16,
        use_sliding_window=True, sliding_window=3, max_window_layers=2, attention_bias=True,
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False,
        rope_parameters=_rope(1000000.0)),
        dict(attention_pattern=("dense", "dense", "local"), window=3, qk_norm=True,
             qkv_bias=True, out_bias=True, ffn="geglu_tanh", tie_embeddings=False)),
    # Qwen3 0.6B's shape in small: dense, no biases, head_dim 8 with H·D = 32 ≠ C = 24, tied
    "qwen3-dense": ("qwen3", dict(
        hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=2, intermediate_size=20, max_position_embeddings=16,
        tie_word_embeddings=True, rope_parameters=_rope(1000000.0)),
        dict(attention_pattern=("dense",) * 2, window=None, qk_norm=True, head_dim=8,
             qkv_bias=False, out_bias=False, tie_embeddings=True)),
    # Phi-3: fused weights, 4 of 6 channels rotated, window 5, GQA, residual dropout 0.1
    "phi3-partial": ("phi3", dict(
        hidden_size=24, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=20, max_position_embeddings=16, original_max_position_embeddings=16,
        sliding_window=5, resid_pdrop=0.1, tie_word_embeddings=False,
        rope_parameters=_rope(10000.0, partial_rotary_factor=2 / 3)),
        dict(attention_pattern=("local",), window=5, rotary_dim=4, n_kv_heads=2,
             qkv_bias=False, out_bias=False, dropout=0.1)),
    # Phi-3 mini's shape in small: MHA, dense, full rotation, theta 500, swish spelling
    "phi3-dense": ("phi3", dict(
        hidden_size=18, num_attention_heads=3, num_hidden_layers=2, intermediate_size=14,
        max_position_embeddings=16, sliding_window=None, hidden_act="swish",
        rope_parameters=_rope(500.0)),
        dict(attention_pattern=("dense",), window=None, rotary_dim=None, n_kv_heads=3,
             ffn="swiglu")),
}
WORST = {}  # (case, dtype) → worst relative error of any report, printed at the end


def _hf_config(case, **changes):
    model_type, fields, _ = CASES[case]
    return transformers.AutoConfig.for_model(model_type, vocab_size=V, bos_token_id=0,
                                             eos_token_id=2, pad_token_id=PAD,
                                             **{**fields, **changes})


def _hf_model(case, **changes):
    """A float64 transformers model with random off-centre weights (sdpa attention: the
    eager softmax of these families runs in float32)."""
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(case, **changes),
                                                       attn_implementation="sdpa")
    hf = hf.to(torch.float64).eval()
    rng = np.random.default_rng(0)
    gains = {f"{name}.weight" for name, module in hf.named_modules()
             if type(module).__name__.endswith("RMSNorm")}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            z = rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(1.0 + 0.25 * z if name in gains else 0.35 * z + 0.05))
    return hf


def _checkpoint(case, path, **changes):
    """(float64 HF model, its save_pretrained directory)."""
    with exact_float64():
        hf = _hf_model(case, **changes)
    hf.save_pretrained(str(path))
    return hf, str(path)




def _assert_reports_pass(reports, label):
    failing = [(r.tensor, r.max_rel_err) for r in reports if not r.passed]
    assert not failing, f"{label}: {failing}"
    assert len(reports) > 2 + 8, label  # logits, loss and every gradient
    return max(r.max_rel_err for r in reports)


def _variant(model, **changes):
    """A model of ``model.config.replace(**changes)`` holding a copy of ``model``'s weights."""
    other = DecoderLM(model.config.replace(**changes)).eval()
    for name, value in model.parameters().items():
        other.parameters()[name][...] = value
    return other


def _ids(seed=1, batch=2):
    return np.random.default_rng(seed).integers(0, V, (batch, T))


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_compare_hf_dir_passes(tmp_path, case, dtype):
    """compare_hf_dir: transformers loads every tensor, and the logits, loss and every
    gradient (by checkpoint name) agree — float64 at 1e-10, float32 at 1e-4."""
    _, directory = _checkpoint(case, tmp_path)
    worst = _assert_reports_pass(compare_hf_dir(directory, dtype), f"{case} {dtype}")
    WORST[case, dtype] = worst
    print(f"\n{case} {dtype}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("case", CASES)
def test_loaded_configs_are_the_intended_ones(tmp_path, case):
    """The cases reach the model as intended (so the parity tests test what they claim)."""
    _, directory = _checkpoint(case, tmp_path)
    config = load_hf(directory).config
    want = {**dict(norm="rmsnorm", positions="rope", rope_layout="half", ffn="swiglu",
                   block="sequential", padding_idx=PAD), **CASES[case][2]}
    got = {name: getattr(config, name) for name in want}
    assert got == want


@pytest.mark.parametrize("case", CASES)
def test_round_trip(tmp_path, case):
    """load_hf → save_hf writes transformers' very tensors (Phi-3's fused ones re-joined),
    and from_pretrained of that directory computes the original logits."""
    with exact_float64():
        hf, first = _checkpoint(case, tmp_path / "hf")
        assert_hf_round_trip(hf, first, str(tmp_path / "npformer"), CASES[case][0],
                             np.float64, _ids(2), attn_implementation="sdpa")


# ---- decoding, windows -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_decode_equals_the_full_forward(tmp_path, case):
    """A prompt of 3 then one token at a time through the key/value cache gives the logits
    of one full forward (the window, where there is one, slides over the cached keys)."""
    _, directory = _checkpoint(case, tmp_path)
    model = load_hf(directory)
    ids = _ids(3, batch=1)  # (1, T)
    full = model.forward(ids)  # (1, T, V)
    caches = model.new_kv_caches()
    steps = [model.forward(ids[:, :3], kv_caches=caches)]
    steps += [model.forward(ids[:, t:t + 1], kv_caches=caches) for t in range(3, T)]
    assert_close(np.concatenate(steps, axis=1), full, np.float64, f"{case} decode vs forward")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]["window"] is not None])
def test_the_sliding_window_bites(tmp_path, case):
    """T = 7 is longer than the window: transformers' logits match ours and differ from the
    same weights run dense (so the parity above tests the window), and a window one wider
    misses too (so it is the window transformers uses, edge included: i − w < j ≤ i)."""
    hf, directory = _checkpoint(case, tmp_path)
    model = load_hf(directory)
    ids = _ids(4)
    with exact_float64(), torch.no_grad():
        reference = hf(torch.from_numpy(ids)).logits.numpy()
    assert_close(model.forward(ids), reference, np.float64, case)
    window = model.config.window
    assert window < T
    for changes in (dict(attention_pattern=("dense",), window=None), dict(window=window + 1)):
        logits = _variant(model, **changes).forward(ids)
        assert max_errors(logits, reference)[1] > MISMATCH, f"{changes} matched {case}"


def test_qwen2_without_use_sliding_window_is_dense(tmp_path):
    """Qwen2Config drops sliding_window unless use_sliding_window: max_window_layers then
    makes no layer sliding, and the model is dense."""
    _, directory = _checkpoint("qwen2-window", tmp_path, use_sliding_window=False)
    config = load_hf(directory).config
    assert (config.attention_pattern, config.window) == (("dense",) * 3, None)
    _assert_reports_pass(compare_hf_dir(directory, "float64"), "qwen2 use_sliding_window=false")


@pytest.mark.parametrize("case, drop, expected", [
    # MistralConfig: an absent sliding_window means 4096 (≥ T: dense in effect, not null)
    ("mistral-window", ("sliding_window",), dict(window=4096, attention_pattern=("local",))),
    # Phi3Config: an absent sliding_window means dense
    ("phi3-partial", ("sliding_window",), dict(window=None, attention_pattern=("dense",))),
])
def test_absent_fields_mean_transformers_defaults(tmp_path, case, drop, expected):
    _, directory = _checkpoint(case, tmp_path)
    edit_config_json(directory, drop=drop)
    config = load_hf(directory).config
    assert {name: getattr(config, name) for name in expected} == expected
    _assert_reports_pass(compare_hf_dir(directory, "float64"), f"{case} without {drop}")


def test_mistral_absent_num_key_value_heads_is_8(tmp_path):
    """MistralConfig's num_key_value_heads default is 8, not num_attention_heads (Llama's
    None): a config.json without it has 8 key/value heads."""
    _, directory = _checkpoint("mistral-window", tmp_path, hidden_size=24,
                               num_attention_heads=8, head_dim=4, num_key_value_heads=8)
    edit_config_json(directory, drop=("num_key_value_heads",))
    assert load_hf(directory).config.kv_heads == 8
    _assert_reports_pass(compare_hf_dir(directory, "float64"), "mistral default kv heads")


# ---- what the loader refuses -------------------------------------------------------------------

_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.0],
                 long_factor=[2.0, 2.0])


@pytest.mark.parametrize("case, values, field", [
    # activations: none of these is a gated MLP npformer has (quick_gelu is x σ(1.702 x))
    ("mistral-window", dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    ("qwen2-window", dict(hidden_act="relu"), "hidden_act='relu'"),
    ("phi3-dense", dict(hidden_act="gelu_10"), "hidden_act='gelu_10'"),
    # inconsistent head sizes: 3 query heads cannot share 2 key/value heads (repeat_kv)
    ("mistral-window", dict(num_key_value_heads=2), "num_key_value_heads=2"),
    ("qwen2-window", dict(num_key_value_heads=3), "num_key_value_heads=3"),
    ("phi3-partial", dict(num_key_value_heads=3), "num_key_value_heads=3"),
    # Phi-3's LongRoPE, and its config's legacy spellings of it
    ("phi3-partial", dict(rope_parameters=_LONGROPE), "rope_type='longrope'"),
    ("phi3-partial", dict(rope_scaling=dict(type="su", short_factor=[1.0, 1.0],
                                            long_factor=[2.0, 2.0])), "rope_type='su'"),
    ("phi3-partial", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                               factor=2.0)), "rope_type='yarn'"),
    # int(6 · 0.5) = 3 rotary channels: RoPE rotates pairs
    ("phi3-partial", dict(rope_parameters=_rope(10000.0, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5"),
    # Mistral and Qwen2 rotate the whole head whatever partial_rotary_factor says
    ("mistral-window", dict(rope_parameters=_rope(10000.0, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5"),
    # layer types npformer has no attention for, or a sliding layer without a window
    ("qwen2-layer-types", dict(layer_types=["full_attention", "chunked_attention"]),
     "layer_types holds 'chunked_attention'"),
    ("qwen2-layer-types", dict(layer_types=["full_attention"]), "layer_types="),
    ("qwen2-layer-types", dict(use_sliding_window=False), "use_sliding_window"),
    ("mistral-window", dict(sliding_window=0), "sliding_window=0"),
    ("qwen2-window", dict(sliding_window=2.5), "sliding_window=2.5"),
    ("phi3-dense", dict(quantization_config=dict(quant_method="gptq")), "quantization_config"),
    # Qwen3Attention reads head_dim without a fallback: null builds nothing
    ("qwen3-dense", dict(head_dim=None), "head_dim is null"),
    ("qwen3-window", dict(layer_types=["full_attention", "mamba", "sliding_attention"]),
     "layer_types holds 'mamba'"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, case, values, field):
    """A config.json we cannot reproduce is refused with a ValueError naming the field and
    the value (and the file), never loaded into a model that computes something else."""
    _, directory = _checkpoint(case, tmp_path)
    edit_config_json(directory, **values)
    with pytest.raises(ValueError, match=rf"{directory}/config.json: .*{_escaped(field)}"):
        load_hf(directory)


def _escaped(text):
    import re

    return re.escape(text)


def test_phi3_rope_types_outside_default_and_longrope_are_refused(tmp_path):
    """Phi3Config.validate_rope accepts only 'default' and 'longrope': a 'linear' Phi-3 is no
    model transformers builds, so load_hf refuses it by name too."""
    _, directory = _checkpoint("phi3-dense", tmp_path)
    edit_config_json(directory, rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))
    with pytest.raises(ValueError, match="rope_type='linear' is not accepted for phi3"):
        load_hf(directory)


# ---- activation names --------------------------------------------------------------------------

# Every ACT2FN name (transformers 5.24) that has no npformer counterpart in a plain MLP
# act(x W₁) W₂, and in a gated one down(act(gate x) ⊙ up x). Listing them makes a new ACT2FN
# name fail test_every_act2fn_name_is_accepted_or_refused until someone decides about it.
_NOT_PLAIN = {"gelu_10", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu",
              "relu2", "relu6", "sigmoid", "silu", "swish", "sqrtsoftplus", "tanh", "prelu",
              "xielu"}
_NOT_GATED = _NOT_PLAIN - {"silu", "swish"} | {"relu"} | (
    {"gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate"}
    - set(GLU_ACTIVATIONS))


def test_every_act2fn_name_is_accepted_or_refused():
    """Each ACT2FN name is either mapped to the npformer FFN computing the same function or
    in the refused list — none is forgotten, and no accepted name is a typo."""
    from transformers.activations import ACT2FN

    assert set(PLAIN_ACTIVATIONS) | _NOT_PLAIN == set(ACT2FN)
    assert not set(PLAIN_ACTIVATIONS) & _NOT_PLAIN
    assert set(GLU_ACTIVATIONS) | _NOT_GATED == set(ACT2FN)
    assert not set(GLU_ACTIVATIONS) & _NOT_GATED


@pytest.mark.parametrize("name", sorted(_NOT_GATED))
def test_gated_activations_without_a_counterpart_are_refused_by_name(tmp_path, name):
    _, directory = _checkpoint("qwen2-layer-types", tmp_path)
    edit_config_json(directory, hidden_act=name)
    with pytest.raises(ValueError, match=rf"hidden_act={name!r} is not supported for model_type "
                                         r"'qwen2'; supported: \["):
        load_hf(directory)


@pytest.mark.parametrize("name", sorted(_NOT_PLAIN))
def test_plain_activations_without_a_counterpart_are_refused_by_name(tmp_path, name):
    directory = _neox_checkpoint(tmp_path, "gelu")
    edit_config_json(directory, hidden_act=name)
    with pytest.raises(ValueError, match=rf"hidden_act={name!r} is not supported for model_type "
                                         r"'gpt_neox'; supported: \["):
        load_hf(directory)


@pytest.mark.parametrize("name", sorted(GLU_ACTIVATIONS))
def test_gated_activation_names_reproduce_the_model(tmp_path, name):
    """Each accepted gated name, written by transformers itself, matches at 1e-10."""
    _, directory = _checkpoint("mistral-window", tmp_path, hidden_act=name)
    assert json.load(open(f"{directory}/config.json")).get("hidden_act", "silu") == name
    _assert_reports_pass(compare_hf_dir(directory, "float64"), f"mistral {name}")


def _neox_checkpoint(path, hidden_act):
    config = transformers.AutoConfig.for_model(
        "gpt_neox", vocab_size=V, bos_token_id=0, eos_token_id=2, hidden_size=16,
        num_attention_heads=2, num_hidden_layers=2, intermediate_size=20,
        max_position_embeddings=16, hidden_act=hidden_act)
    hf = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.from_numpy(0.35 * rng.standard_normal(tuple(p.shape)) + 0.05))
    hf.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpt_neox_gelu_fast_from_a_transformers_config(tmp_path, dtype):
    """Issue 16: a GPT-NeoX whose config.json says hidden_act "gelu_fast" (transformers'
    0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x²))), the tanh GeLU with √(2/π) rounded to
    10 digits, 3.6e-12 relative) loads as ffn="gelu_tanh" and matches in both dtypes."""
    directory = _neox_checkpoint(tmp_path, "gelu_fast")
    assert json.load(open(f"{directory}/config.json"))["hidden_act"] == "gelu_fast"
    assert load_hf(directory).config.ffn == "gelu_tanh"
    _assert_reports_pass(compare_hf_dir(directory, dtype), f"gpt_neox gelu_fast {dtype}")


# ---- writing our own configs, float64 patches, the CLI -------------------------------------


def _our_model(**fields):
    base = dict(vocab_size=V, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                positions="rope", norm="rmsnorm", norm_bias=False, ffn="swiglu", ffn_bias=False,
                d_ff=20, qkv_bias=False, out_bias=False, tie_embeddings=False)
    model = DecoderLM(ModelConfig(**{**base, **fields}), seed=5).eval()
    rng = np.random.default_rng(6)
    for name, p in model.parameters().items():
        p[...] = (1.0 if "norm" in name else 0.05) + 0.3 * rng.standard_normal(p.shape)
    return model


@pytest.mark.parametrize("fields, model_type", [
    (dict(attention_pattern=("local",), window=3), "mistral"),
    (dict(attention_pattern=("dense", "local"), window=3, qkv_bias=True), "qwen2"),
    (dict(qkv_bias=True), "qwen2"),
    (dict(rotary_dim=4), "phi3"),
    (dict(qk_norm=True, attention_pattern=("local", "dense"), window=2), "qwen3"),
    (dict(qk_norm=True, qkv_bias=True, out_bias=True, ffn="geglu_tanh", head_dim=8), "qwen3"),
    (dict(rotary_dim=4, attention_pattern=("local",), window=2, tie_embeddings=True), "phi3"),
])
def test_save_hf_writes_the_family_that_reproduces_the_model(tmp_path, fields, model_type):
    """A model no earlier family expresses (a window on every layer, per-layer windows, q/k/v
    biases without an o bias, partial rotary with an RMSNorm) is written under the one that
    does, and transformers computes the same logits and gradients from it."""
    model = _our_model(**fields)
    assert save_hf(model, str(tmp_path)) == model_type
    assert json.load(open(tmp_path / "config.json"))["model_type"] == model_type
    loaded = load_hf(str(tmp_path))
    assert _architecture(loaded.config) == _architecture(model.config)
    _assert_reports_pass(compare_hf_dir(str(tmp_path), "float64"), f"save_hf {fields}")


@pytest.mark.parametrize("fields", [
    dict(attention_pattern=("local", "dense"), window=3),  # per-layer windows need q/k/v biases
    dict(qkv_bias=True, out_bias=True, attention_pattern=("local",), window=3),
    dict(rotary_dim=4, qkv_bias=True, out_bias=False),
])
def test_save_hf_refuses_what_no_family_reproduces(tmp_path, fields):
    with pytest.raises(ValueError, match="no Hugging Face model_type reproduces this config"):
        save_hf(_our_model(**fields), str(tmp_path))


def test_float64_patches_change_precision_only():
    """Stock transformers (float32 RoPE tables and RMSNorms inside a float64 model) and the
    exact_float64 reference differ by a float32-sized amount for every case: the patches
    change precision, not formulas; and they are needed (stock float64 misses 1e-10)."""
    ids = _ids(1)
    for case in CASES:
        hf = _hf_model(case)
        with torch.no_grad():
            stock = hf(torch.from_numpy(ids)).logits.numpy()
            with exact_float64():
                patched = hf(torch.from_numpy(ids)).logits.numpy()
        difference = max_errors(stock, patched)[1]
        assert 1e-10 < difference < 1e-5, f"{case}: stock vs patched {difference:.3e}"


@pytest.mark.parametrize("model_type, prefix", [("mistral", "Mistral"), ("qwen2", "Qwen2"),
                                                ("qwen3", "Qwen3"), ("phi3", "Phi3")])
def test_compare_prints_the_float64_patches_of_the_family(tmp_path, capsys, model_type, prefix):
    """``npformer compare --hf DIR`` names the pieces of transformers it recomputed in
    float64 for the checkpoint's family (its rotary tables and RMSNorm)."""
    from npformer.cli import main

    case = next(c for c in CASES if CASES[c][0] == model_type)
    _, directory = _checkpoint(case, tmp_path)
    assert float64_patches(model_type) == [
        f"modeling_{model_type}.{prefix}RotaryEmbedding.forward",
        f"modeling_{model_type}.{prefix}RMSNorm.forward"]
    assert main(["compare", "--hf", directory]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("float64 reference:"))
    assert f"transformers' {model_type} code" in line
    for name in float64_patches(model_type):
        assert name in line
    assert main(["compare", "--hf", directory, "--dtype", "float32"]) == 0
    assert "float64 reference" not in capsys.readouterr().out


def test_each_family_table_declares_a_field_once():
    """A field declared twice would let the second verdict hide the first."""
    from npformer.interop.hf_config import FAMILIES

    for model_type, family in FAMILIES.items():
        names = [field.name for field in family.fields]
        assert sorted(names) == sorted(set(names)), model_type


def test_qwen3_absent_head_dim_is_128(tmp_path):
    """Qwen3Config's head_dim default is 128, not hidden_size // heads (= 12 here)."""
    _, directory = _checkpoint("qwen3-dense", tmp_path, head_dim=128)
    hf = edit_config_json(directory, drop=("head_dim",))
    assert "head_dim" not in hf
    assert load_hf(directory).config.head_size == 128
    _assert_reports_pass(compare_hf_dir(directory, "float64"), "qwen3 default head_dim")


@pytest.mark.parametrize("case, drop, values", [
    # legacy top-level rope_theta (rope_parameters absent)
    ("mistral-window", ("rope_parameters",), dict(rope_theta=1000000.0)),
    ("qwen3-window", ("rope_parameters",), dict(rope_theta=1000000.0)),
    # Phi-3's top-level partial_rotary_factor fills rope_parameters (Phi3Config: kwargs.get)
    ("phi3-partial", (), dict(rope_parameters=_rope(10000.0), partial_rotary_factor=2 / 3)),
    # legacy rope_scaling wins over rope_parameters, as in transformers
    ("qwen2-window", (), dict(rope_scaling=dict(type="default", rope_theta=1000000.0),
                              rope_parameters=_rope(77.0))),
])
def test_legacy_rope_spellings_reproduce_the_model(tmp_path, case, drop, values):
    _, directory = _checkpoint(case, tmp_path)
    edit_config_json(directory, drop=drop, **values)
    config = load_hf(directory).config
    assert config.rope_theta == (10000.0 if case == "phi3-partial" else 1000000.0)
    if case == "phi3-partial":
        assert config.rotary_dim == 4
    _assert_reports_pass(compare_hf_dir(directory, "float64"), f"{case} {values}")


# ---- scaled RoPE (branch rope's reader, through every family) ----------------------------------

_SCALED = {  # case: (base case, config changes, the rope_type npformer must load)
    "mistral-llama3": ("mistral-window", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=4.0, original_max_position_embeddings=8,
        low_freq_factor=1.0, high_freq_factor=4.0)), "llama3"),
    "qwen2-linear": ("qwen2-window", dict(rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=3.0)), "linear"),
    # dynamic NTK scales calls longer than max_position_embeddings = 4 (T = 7)
    "qwen2-dynamic": ("qwen2-layer-types", dict(max_position_embeddings=4, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "dynamic"),
    "qwen3-yarn": ("qwen3-window", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=8)),
        "yarn"),
}


@pytest.mark.parametrize("scaled", _SCALED)
def test_scaled_rope_per_family(tmp_path, scaled):
    """Each family with a scaled RoPE: compare_hf_dir passes in float64 (transformers' own
    init function in float64) and float32, and the scaling bites (the same weights with the
    default RoPE miss transformers' logits)."""
    case, changes, rope_type = _SCALED[scaled]
    hf, directory = _checkpoint(case, tmp_path, **changes)
    model = load_hf(directory)
    assert model.config.rope_type == rope_type
    for dtype in ("float64", "float32"):
        worst = _assert_reports_pass(compare_hf_dir(directory, dtype), f"{scaled} {dtype}")
        WORST[scaled, dtype] = worst
        print(f"\n{scaled} {dtype}: worst relative error {worst:.2e}")
    from npformer.config import ROPE_SCALING_DEFAULTS

    ids = _ids(4)
    with exact_float64(), torch.no_grad():
        reference = hf(torch.from_numpy(ids)).logits.numpy()
    unscaled = _variant(model, rope_type="default", **ROPE_SCALING_DEFAULTS)
    assert max_errors(unscaled.forward(ids), reference)[1] > MISMATCH, f"{scaled}: scaling idle"
    with exact_float64():  # and save_hf writes the scaling back
        assert_hf_round_trip(hf, directory, str(tmp_path / "npformer"), CASES[case][0],
                             np.float64, ids, attn_implementation="sdpa")
