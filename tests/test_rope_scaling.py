"""Scaled RoPE (issue 16): linear, dynamic NTK, yarn and llama3, against transformers 5.24.

What is checked, per rope type:
1. the frequencies θ'_i and the attention factor t of npformer.functional.rope.rope_frequencies
   against transformers' own ROPE_INIT_FUNCTIONS — stock (float32 tensors) at float32
   precision, and run under hf_float64.in_model_dtype (float64) at 1e-13 — for Llama-shaped
   and GPT-NeoX (partial rotary) configs read through config_from_hf, at lengths below and
   above the original one (dynamic changes only there);
2. the rope pair by float64 finite differences (the gradcheck registry's rope_linear,
   rope_dynamic, rope_yarn, rope_llama3) and the numba kernel against its functional twin,
   forward and backward, including the kernel's table cache (keyed on the scaling);
3. whole models: a random-weight LlamaForCausalLM, GPTNeoXForCausalLM and CohereForCausalLM
   per type, written
   with save_pretrained and compared by compare_hf_dir (logits, loss, every gradient) in
   float64 at 1e-10 and float32 at 1e-4 with sequences longer than the original length (the
   scaled logits are asserted to differ from the unscaled ones, so the test sees the
   scaling); load_hf → save_hf → from_pretrained round trip;
4. KV-cache decoding: equal to one full forward for every type but dynamic; for dynamic
   (stateless here: L = max(position) + 1 of each call) equal to the full forward while the
   sequence stays within the original length, different past it — and there equal to
   transformers' own cached decode, which rotates the prefill keys with the prefill's base too;
5. configs we refuse, each naming the field.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import (assert_close, assert_gradcheck_passes, assert_hf_round_trip, max_errors,
                     assert_subset_passes_without_jit)
from npformer.config import ModelConfig
from npformer.functional import rope as rope_functional
from npformer.functional.rope import RopeScaling, rope_angles, rope_frequencies
from npformer.gradcheck import run_checks
from npformer.interop import load_hf
from npformer.interop.compare import compare_hf_dir
from npformer.interop.hf_config import config_from_hf
from npformer.interop.hf_float64 import exact_float64, in_model_dtype
from npformer.kernels import rope as rope_kernel
from npformer.models import DecoderLM

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 29  # vocabulary
THETA = 100.0  # with D = 8 the four pairs fall in different bands of yarn and llama3
ORIGINAL = 32  # yarn / llama3 original_max_position_embeddings
DYNAMIC_ORIGINAL = 16  # dynamic: max_position_embeddings, the length it starts scaling at
T = 40  # longer than both

# rope_parameters (besides rope_type, rope_theta) and max_position_embeddings per type
ROPE = {
    "default": ({}, 64),
    "linear": (dict(factor=2.5), 64),
    "dynamic": (dict(factor=3.0), DYNAMIC_ORIGINAL),  # our max_seq_len = 48
    "yarn": (dict(factor=4.0, original_max_position_embeddings=ORIGINAL), 64),
    "llama3": (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=ORIGINAL), 64),
}
SCALED = [t for t in ROPE if t != "default"]
# Llama: GQA 2:1, D = 8 rotated whole; GPT-NeoX: D = 16, half of it rotated (rotary_dim 8);
# Cohere: D = 8, interleaved
FAMILIES = {
    "llama": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                  num_hidden_layers=2, intermediate_size=24, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
    "gpt_neox": dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                     intermediate_size=40, use_parallel_residual=True, hidden_act="gelu"),
    # Cohere: interleaved pairs (its float64 patch is float64_rotary_forward(interleaved=True))
    "cohere": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                   num_hidden_layers=2, intermediate_size=24, logit_scale=0.5, use_qk_norm=False,
                   tie_word_embeddings=True),
}


def _rope_parameters(model_type, rope_type, theta=THETA):
    extra, _ = ROPE[rope_type]
    params = dict(rope_type=rope_type, rope_theta=theta, **extra)
    if model_type == "gpt_neox":
        params["partial_rotary_factor"] = 0.5
    return params


def _hf_config(model_type, rope_type, **changes):
    fields = dict(FAMILIES[model_type], max_position_embeddings=ROPE[rope_type][1],
                  rope_parameters=_rope_parameters(model_type, rope_type))
    return transformers.AutoConfig.for_model(model_type, vocab_size=V, bos_token_id=0,
                                             eos_token_id=2, pad_token_id=None,
                                             **{**fields, **changes})


def _hf_model(model_type, rope_type, seed=0, **changes):
    """Random weights drawn in float64: norm gains N(1, 0.25²), everything else off-centre."""
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(model_type, rope_type, **changes))
    hf = hf.to(torch.float64).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            z = rng.standard_normal(tuple(p.shape))
            is_gain = "norm" in name and name.endswith("weight") and p.ndim == 1
            p.copy_(torch.from_numpy(1.0 + 0.25 * z if is_gain else 0.35 * z + 0.05))
    return hf


def _checkpoint(tmp_path, model_type, rope_type, **changes):
    hf = _hf_model(model_type, rope_type, **changes)
    path = str(tmp_path / f"{model_type}-{rope_type}")
    hf.save_pretrained(path)
    return hf, path


def _ids(seed=3, length=T):
    return np.random.default_rng(seed).integers(0, V, (2, length))


# ---- 1. frequencies and attention factor vs transformers' ROPE_INIT_FUNCTIONS -------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("rope_type", SCALED)
@pytest.mark.parametrize("theta", [THETA, 10000.0, 500000.0])
def test_frequencies_and_attention_factor_equal_transformers(model_type, rope_type, theta):
    hf_config = _hf_config(model_type, rope_type,
                           rope_parameters=_rope_parameters(model_type, rope_type, theta))
    config = config_from_hf(hf_config.to_dict())
    rotary = config.rotary_dim or config.head_size
    assert rotary == 8
    init = ROPE_INIT_FUNCTIONS[rope_type]
    for seq_len in (None, 7, DYNAMIC_ORIGINAL, DYNAMIC_ORIGINAL + 1, T, 1000):
        ours, t = rope_frequencies(rotary, config.rope_theta, RopeScaling.from_config(config),
                                   seq_len)
        stock, stock_t = init(hf_config, None, seq_len=seq_len)
        assert stock.dtype == torch.float32
        assert_close(ours, stock.double().numpy(), np.float32, f"{rope_type} stock inv_freq",
                     rtol=1e-6, atol=0.0)
        exact, exact_t = in_model_dtype(init, torch)(hf_config, None, seq_len=seq_len)
        assert exact.dtype == torch.float64
        assert_close(ours, exact.numpy(), np.float64, f"{rope_type} float64 inv_freq",
                     rtol=1e-13, atol=0.0)
        assert abs(t - stock_t) <= 1e-15 * abs(stock_t) and abs(t - exact_t) <= 1e-15
    if rope_type in ("yarn", "llama3", "linear"):  # the scaling changed some frequency
        default, _ = rope_frequencies(rotary, config.rope_theta)
        assert np.max(default / ours) > 1.5


def test_each_type_hits_the_bands_it_is_made_of():
    """With D = 8 and theta 100 the ratios θ_i / θ'_i show every band: yarn keeps pair 0,
    ramps pair 1 and interpolates 2, 3; llama3 keeps, smooths, then slows by the factor."""
    default, _ = rope_frequencies(8, THETA)
    ratio = {t: default / rope_frequencies(8, THETA, RopeScaling.from_config(
        config_from_hf(_hf_config("llama", t).to_dict())), T)[0] for t in SCALED}
    np.testing.assert_allclose(ratio["linear"], 2.5, rtol=1e-15)
    np.testing.assert_allclose(ratio["yarn"], [1.0, 1.6, 4.0, 4.0], rtol=1e-14)
    assert ratio["llama3"][0] == 1.0 and 1.0 < ratio["llama3"][1] < 8.0
    np.testing.assert_allclose(ratio["llama3"][2:], 8.0, rtol=1e-14)
    # dynamic: nothing up to L0, then the base grows: pair 0 stays, the others slow down
    scaling = RopeScaling("dynamic", rope_factor=3.0, rope_original_max_seq_len=16)
    assert np.array_equal(rope_frequencies(8, THETA, scaling, 16)[0], default)
    grown = default / rope_frequencies(8, THETA, scaling, 17)[0]
    assert grown[0] == 1.0 and np.all(np.diff(grown) > 0)


def test_yarn_attention_factor_scales_every_rotated_pair():
    """t multiplies cos and sin: each rotated pair's length grows by t = 0.1 ln 4 + 1, the
    pass-through channels stay; an explicit attention_factor replaces the default."""
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 10))
    for scaling, t in ((RopeScaling("yarn", rope_factor=4.0, rope_original_max_seq_len=32),
                        0.1 * np.log(4.0) + 1),
                       (RopeScaling("yarn", rope_factor=4.0, rope_original_max_seq_len=32,
                                    rope_attention_factor=0.7), 0.7)):
        y, _ = rope_functional.rope_forward(x, np.arange(6) + 50, rotary_dim=8, scaling=scaling)
        pair = lambda a: np.hypot(a[..., :4], a[..., 4:8])  # half layout: (i, i + 4)
        np.testing.assert_allclose(pair(y), t * pair(x), rtol=1e-14)
        assert np.array_equal(y[..., 8:], x[..., 8:])


def test_dynamic_reads_the_longest_position_of_the_call():
    """L = max(position_ids) + 1, over the whole (B, T) batch: one row past L0 changes the
    other row's angles too (as transformers' torch.max(position_ids) + 1)."""
    scaling = RopeScaling("dynamic", rope_factor=2.0, rope_original_max_seq_len=16)
    short = np.array([[0, 1, 2], [3, 4, 5]])
    cos_short, _ = rope_angles(short, 8, THETA, scaling=scaling)
    cos_default, _ = rope_angles(short, 8, THETA)
    assert np.array_equal(cos_short, cos_default)
    long = np.array([[0, 1, 2], [3, 4, 30]])
    cos_long, _ = rope_angles(long, 8, THETA, scaling=scaling)
    assert not np.allclose(cos_long[0], cos_default[0], rtol=1e-6)


# ---- 2. finite differences and the kernel twin ---------------------------------------------------


@pytest.mark.parametrize("name", ["rope_linear", "rope_dynamic", "rope_yarn", "rope_llama3"])
def test_scaled_rope_gradchecks(name):
    assert_gradcheck_passes(run_checks([name]))


KERNEL_SCALINGS = [
    RopeScaling("linear", rope_factor=2.5),
    RopeScaling("dynamic", rope_factor=3.0, rope_original_max_seq_len=16),
    RopeScaling("yarn", rope_factor=4.0, rope_original_max_seq_len=32, rope_beta_fast=16.0,
                rope_beta_slow=2.0, rope_truncate=False),
    RopeScaling("llama3", rope_factor=8.0, rope_original_max_seq_len=32),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", KERNEL_SCALINGS, ids=lambda s: s.rope_type)
def test_kernel_equals_the_functional_twin(scaling, layout, dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 9, 10)) * 1.3 + 0.2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for positions in (np.arange(9) + 30, rng.integers(0, 60, (2, 9))):
        kwargs = dict(theta=THETA, rotary_dim=8, layout=layout, scaling=scaling)
        y_ref, cache_ref = rope_functional.rope_forward(x, positions, **kwargs)
        y, cache = rope_kernel.rope_forward(x, positions, **kwargs)
        assert_close(y, y_ref, dtype, "forward", rtol=tol, atol=0.0)
        assert_close(rope_kernel.rope_backward(dy, cache),
                     rope_functional.rope_backward(dy, cache_ref), dtype, "backward",
                     rtol=tol, atol=0.0)


def test_kernel_table_cache_is_keyed_on_the_scaling():
    """Same positions, rotary_dim, theta and dtype, another schedule: another table."""
    x = np.random.default_rng(6).standard_normal((1, 2, 5, 8))
    positions = np.arange(5) + 40
    previous = None
    for scaling in [None] + KERNEL_SCALINGS:
        y, _ = rope_kernel.rope_forward(x, positions, theta=THETA, scaling=scaling)
        y_ref, _ = rope_functional.rope_forward(x, positions, theta=THETA, scaling=scaling)
        assert_close(y, y_ref, np.float64, str(scaling), rtol=1e-12, atol=0.0)
        assert previous is None or max_errors(y, previous)[1] > 1e-3
        previous = y


def test_kernel_tests_pass_as_plain_python_under_numba_disable_jit():
    """The kernel-vs-twin and table-cache tests (4 types × 2 layouts × 2 dtypes + 1) in a
    child process with NUMBA_DISABLE_JIT=1."""
    assert_subset_passes_without_jit(__file__, "test_kernel_equals or test_kernel_table_cache",
                                     17, "npformer.kernels.rope:_rotate_kernel")


@pytest.mark.parametrize("pair", [rope_functional, rope_kernel], ids=["functional", "kernel"])
def test_bad_scaling_arguments_are_refused(pair):
    x = np.zeros((1, 1, 3, 8)) + 0.5
    with pytest.raises(ValueError, match="scaling must be None or a npformer.functional.rope.RopeScaling"):
        pair.rope_forward(x, scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="config field rope_factor=0.5"):
        pair.rope_forward(x, scaling=RopeScaling("linear", rope_factor=0.5))
    with pytest.raises(ValueError, match="config field rope_original_max_seq_len=None"):
        pair.rope_forward(x, scaling=RopeScaling("yarn", rope_factor=2.0))
    with pytest.raises(ValueError, match="config field rope_type='longrope'"):
        pair.rope_forward(x, scaling=RopeScaling("longrope", rope_factor=2.0))
    with pytest.raises(ValueError, match="rotary_dim=2 cannot use rope_type='dynamic'"):
        pair.rope_forward(x, rotary_dim=2, scaling=RopeScaling(
            "dynamic", rope_factor=2.0, rope_original_max_seq_len=4))


def test_config_refuses_dynamic_with_two_rotated_channels():
    with pytest.raises(ValueError, match=r"config field rotary_dim=2 .*d/\(d−2\)"):
        ModelConfig(positions="rope", d_model=16, n_heads=2, rotary_dim=2, rope_type="dynamic",
                    rope_factor=2.0, rope_original_max_seq_len=8)


# ---- 3. whole models against transformers --------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("rope_type", list(ROPE))
def test_model_parity_and_round_trip(tmp_path, model_type, rope_type):
    hf, path = _checkpoint(tmp_path, model_type, rope_type)
    config = load_hf(path).config
    assert config.rope_type == rope_type
    if rope_type == "dynamic":  # max_seq_len = int(factor · max_position_embeddings)
        assert (config.max_seq_len, config.rope_original_max_seq_len) == (48, DYNAMIC_ORIGINAL)
    for dtype in ("float64", "float32"):
        reports = compare_hf_dir(path, dtype, seq_len=T)
        failing = [(r.tensor, r.max_rel_err) for r in reports if not r.passed]
        assert not failing, (dtype, failing)
        assert len(reports) > 10

    # the scaling matters at this length: the unscaled model computes something else
    model = load_hf(path).eval()
    ids = _ids()
    if rope_type != "default":
        unscaled = DecoderLM(config.replace(rope_type="default", **{
            f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.name.startswith("rope_") and f.name not in ("rope_type", "rope_theta",
                                                             "rope_layout")})).eval()
        for name, value in model.parameters().items():
            unscaled.parameters()[name][...] = value
        assert max_errors(model.forward(ids), unscaled.forward(ids))[1] > 1e-2

    # load_hf → save_hf → from_pretrained rebuilds the same rope (in float64, patched)
    with exact_float64():
        assert_hf_round_trip(hf, path, str(tmp_path / "again"), model_type, np.float64, ids,
                             attn_implementation="sdpa")
    written = json.loads(open(os.path.join(str(tmp_path / "again"), "config.json")).read())
    assert written["rope_parameters"]["rope_type"] == rope_type
    assert written["max_position_embeddings"] == ROPE[rope_type][1]


def test_stock_float32_rope_differs_from_the_float64_patch_by_rounding_only():
    """The float64 patch runs transformers' own init function: stock float64 models (float32
    inv_freq and tables) differ from it by a float32-sized amount, never more, per type."""
    ids = torch.from_numpy(_ids())
    for model_type in FAMILIES:
        for rope_type in ROPE:
            hf = _hf_model(model_type, rope_type)
            with torch.no_grad():
                stock = hf(ids).logits.numpy()
                with exact_float64():
                    patched = hf(ids).logits.numpy()
            difference = max_errors(stock, patched)[1]
            assert 1e-11 < difference < 1e-5, (model_type, rope_type, difference)


def test_float64_patch_keeps_transformers_dynamic_state():
    """transformers' dynamic_rope_update keeps the largest length seen and resets only below
    the original one; the float64 patch replays that state machine: after a 30-token call, a
    20-token call still uses the 30-token base (stock and patched agree at rounding level,
    and both differ from a fresh model's 20-token call)."""
    ids = torch.from_numpy(_ids(length=30))
    stock, patched, fresh = (_hf_model("llama", "dynamic") for _ in range(3))
    with torch.no_grad():
        outputs = {}
        for name, hf, patch in (("stock", stock, False), ("patched", patched, True)):
            with exact_float64(enabled=patch):
                outputs[name] = [hf(ids[:, :n]).logits.numpy() for n in (30, 20, 10, 20)]
        with exact_float64():
            fresh_20 = fresh(ids[:, :20]).logits.numpy()
    for after, (a, b) in enumerate(zip(outputs["stock"], outputs["patched"])):
        assert max_errors(a, b)[1] < 1e-5, after
    assert max_errors(outputs["patched"][1], fresh_20)[1] > 1e-3  # kept the 30-token base
    assert max_errors(outputs["patched"][3], fresh_20)[1] < 1e-12  # reset by the 10-token call


# ---- 4. KV-cache decoding --------------------------------------------------------------------------


def _decode(model, ids, prefill):
    """Logits of ids (B, T) fed as one prefill of ``prefill`` tokens, then one token at a time."""
    caches = model.new_kv_caches()
    steps = [model.forward(ids[:, :prefill], kv_caches=caches)]
    for t in range(prefill, ids.shape[1]):
        steps.append(model.forward(ids[:, t:t + 1], kv_caches=caches))
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("rope_type", [t for t in ROPE if t != "dynamic"])
def test_kv_cache_decode_equals_the_full_forward(tmp_path, rope_type):
    _, path = _checkpoint(tmp_path, "llama", rope_type)
    model = load_hf(path).eval()
    ids = _ids()
    assert_close(_decode(model, ids, 5), model.forward(ids), np.float64,
                 f"{rope_type}: decode vs full forward", rtol=1e-12, atol=0.0)


def test_dynamic_kv_cache_decode_is_what_transformers_decodes(tmp_path):
    """Dynamic NTK is a function of each call's L = max(position) + 1. Within the original
    length (16) decoding equals the full forward. Past it, each step's query and new key use
    that step's base while the cached keys keep the base of their own call: decoding differs
    from one full forward — and equals transformers' own cached decode, whose
    dynamic_rope_update grows the base with each step the same way."""
    hf, path = _checkpoint(tmp_path, "llama", "dynamic")
    model = load_hf(path).eval()
    ids = _ids(length=30)
    short = ids[:, :DYNAMIC_ORIGINAL]
    assert_close(_decode(model, short, 5), model.forward(short), np.float64,
                 "dynamic within L0: decode vs full forward", rtol=1e-12, atol=0.0)
    decoded = _decode(model, ids, 20)  # the prefill is already past L0
    assert max_errors(decoded, model.forward(ids))[1] > 1e-3
    with exact_float64(), torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        out = hf(torch.from_numpy(ids[:, :20]), use_cache=True)
        steps, cache = [out.logits.numpy()], out.cache
        for t in range(20, ids.shape[1]):
            out = hf(torch.from_numpy(ids[:, t:t + 1]), cache=cache, use_cache=True)
            steps.append(out.logits.numpy())
            cache = out.cache
    assert_close(decoded, np.concatenate(steps, axis=1), np.float64,
                 "dynamic past L0: decode vs transformers' cached decode")


NATIVE = {  # every field each type reads, away from its default where it can be
    "linear": dict(rope_factor=1.5),
    "dynamic": dict(rope_factor=2.0, rope_original_max_seq_len=24),
    "yarn": dict(rope_factor=3.0, rope_original_max_seq_len=24, rope_beta_fast=16.0,
                 rope_beta_slow=2.0, rope_truncate=False, rope_attention_factor=1.2),
    "llama3": dict(rope_factor=4.0, rope_original_max_seq_len=24, rope_low_freq_factor=2.0,
                   rope_high_freq_factor=6.0),
}


@pytest.mark.parametrize("rope_type", sorted(NATIVE))
def test_an_npformer_model_saved_with_scaling_is_what_transformers_loads(tmp_path, rope_type):
    """A scaled npformer model (llama3 preset shape, not read from a checkpoint) → save_hf →
    compare_hf_dir: transformers rebuilds the same RoPE from the written rope_parameters
    (yarn's truncate=false, betas and explicit attention_factor included), and load_hf
    reads back the same config (dynamic: max_seq_len becomes int(factor · original))."""
    from npformer.interop import save_hf
    from npformer.presets import tiny_config

    config = tiny_config("llama3").replace(
        document_mask=False, rope_theta=THETA, rope_type=rope_type, max_seq_len=64,
        **NATIVE[rope_type])
    save_hf(DecoderLM(config), str(tmp_path))
    reports = compare_hf_dir(str(tmp_path), "float64", seq_len=T)
    assert all(r.passed for r in reports), [(r.tensor, r.max_rel_err) for r in reports]
    back = load_hf(str(tmp_path)).config
    rope_fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("rope_")]
    assert {name: getattr(back, name) for name in rope_fields} == {
        name: getattr(config, name) for name in rope_fields}
    assert back.max_seq_len == (48 if rope_type == "dynamic" else 64)


# ---- 5. what is refused, by name -------------------------------------------------------------------


def _edited(tmp_path, model_type, rope_type, **top):
    _, path = _checkpoint(tmp_path, model_type, rope_type)
    hf = json.loads(open(os.path.join(path, "config.json")).read())
    for key, value in top.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return path


@pytest.mark.parametrize("model_type, params, message", [
    ("llama", dict(rope_type="ntk-by-parts", factor=2.0),
     r"rope_type='ntk-by-parts' is not supported; supported: \['default', 'dynamic'"),
    ("llama", dict(rope_type="longrope", factor=2.0, short_factor=[1.0] * 4,
                   long_factor=[2.0] * 4, original_max_position_embeddings=32),
     r"rope_type='longrope' is not supported"),
    ("gpt_neox", dict(rope_type="proportional", factor=2.0), r"rope_type='proportional'"),
    ("llama", dict(rope_type="linear"), r"lacks 'factor', which rope_type='linear' requires"),
    ("gpt_neox", dict(rope_type="dynamic", factor=None), r"rope_parameters.factor=None must be a number"),
    ("llama", dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0),
     r"lacks 'low_freq_factor'"),
    ("llama", dict(rope_type="yarn", factor=4.0, mscale=0.7, mscale_all_dim=0.7),
     r"\['mscale', 'mscale_all_dim'\] are not read .* not implemented"),
    ("llama", dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=8),
     r"\['original_max_position_embeddings'\] are not read by npformer for rope_type='dynamic'"),
    ("llama", dict(rope_type="yarn", factor=4.0, truncate="yes"), r"truncate='yes' must be true or false"),
    ("llama", dict(rope_type="linear", type="yarn", factor=2.0), r"gives rope_type='linear' and the legacy type='yarn'"),
    ("llama", dict(rope_type="yarn", factor=0.5), r"config field rope_factor=0.5"),
    ("llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0),
     r"config field rope_high_freq_factor=1.0"),
])
def test_bad_rope_configs_are_refused_by_name(tmp_path, model_type, params, message):
    path = _edited(tmp_path, model_type, "default",
                   rope_parameters=dict(rope_theta=THETA, **params))
    with pytest.raises(ValueError, match=message):
        load_hf(path)


def test_original_length_defaults_and_precedence_as_in_transformers(tmp_path):
    """yarn / llama3 without original_max_position_embeddings take max_position_embeddings
    (transformers' standardize_rope_params); a top-level one wins over the dict's (its Phi-3
    exception) — both checked against transformers itself; contradicting ones are refused."""
    path = _edited(tmp_path, "llama", "llama3",
                   rope_parameters=dict(rope_type="llama3", rope_theta=THETA, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0))
    assert load_hf(path).config.rope_original_max_seq_len == 64
    assert all(r.passed for r in compare_hf_dir(path, "float64", seq_len=T))
    path = _edited(tmp_path / "top", "llama", "yarn", original_max_position_embeddings=20,
                   rope_parameters=dict(rope_type="yarn", rope_theta=THETA, factor=4.0))
    assert load_hf(path).config.rope_original_max_seq_len == 20
    assert all(r.passed for r in compare_hf_dir(path, "float64", seq_len=T))
    path = _edited(tmp_path / "both", "llama", "yarn", original_max_position_embeddings=20)
    with pytest.raises(ValueError, match=r"original_max_position_embeddings=20 at the top level "
                                         r"and 32 in rope_parameters"):
        load_hf(path)


def test_yarn_null_factor_and_zero_betas_follow_transformers(tmp_path):
    """yarn's factor null means max_position_embeddings / original (64/32 = 2), and
    beta_fast / beta_slow 0 or null mean 32 / 1 (transformers' `or`): compared with it."""
    path = _edited(tmp_path, "llama", "yarn",
                   rope_parameters=dict(rope_type="yarn", rope_theta=THETA, factor=None,
                                        original_max_position_embeddings=ORIGINAL,
                                        beta_fast=0, beta_slow=None, attention_factor=1.3))
    config = load_hf(path).config
    assert (config.rope_factor, config.rope_beta_fast, config.rope_beta_slow,
            config.rope_attention_factor) == (2.0, 32.0, 1.0, 1.3)
    assert all(r.passed for r in compare_hf_dir(path, "float64", seq_len=T))

