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

from helpers import assert_close, assert_hf_round_trip, max_errors
from npformer.config import ModelConfig
from npformer.interop import load_hf, save_hf
from npformer.interop.compare import compare_hf_dir
from npformer.interop.hf_config import GLU_ACTIVATIONS, PLAIN_ACTIVATIONS
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


def _edit(path, drop=(), **values):
    """Rewrite path/config.json with keys dropped or set (a hand-written or older config)."""
    file = f"{path}/config.json"
    with open(file) as f:
        hf = json.load(f)
    for key in drop:
        hf.pop(key, None)
    hf.update(values)
    with open(file, "w") as f:
        json.dump(hf, f)
    return hf


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
    _edit(directory, drop=drop)
    config = load_hf(directory).config
    assert {name: getattr(config, name) for name in expected} == expected
    _assert_reports_pass(compare_hf_dir(directory, "float64"), f"{case} without {drop}")


def test_mistral_absent_num_key_value_heads_is_8(tmp_path):
    """MistralConfig's num_key_value_heads default is 8, not num_attention_heads (Llama's
    None): a config.json without it has 8 key/value heads."""
    _, directory = _checkpoint("mistral-window", tmp_path, hidden_size=24,
                               num_attention_heads=8, head_dim=4, num_key_value_heads=8)
    _edit(directory, drop=("num_key_value_heads",))
    assert load_hf(directory).config.kv_heads == 8
    _assert_reports_pass(compare_hf_dir(directory, "float64"), "mistral default kv heads")
