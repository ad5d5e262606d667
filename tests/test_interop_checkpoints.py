"""Hugging Face checkpoint directories in and out (load_hf, save_hf, hf_state_dict, the config
mapping) and torch.nn.Transformer state dicts ↔ the 2017 EncoderDecoder.

- save_hf of every preset Hugging Face can express → transformers' from_pretrained gives our
  logits (float64 1e-10, float32 1e-4) and gradients; load_hf(save_hf(m)) is exact.
- load_hf refuses, with a message naming the culprit: non-checkpoints, unknown families,
  pickles (never unpickled), missing / extra / mis-shaped tensors, config fields we cannot
  reproduce. Sharded and tied checkpoints load.
- hf_state_dict: gradients under HF names and layouts (tied table once, Conv1D transposed,
  GPT-NeoX's per-head fused qkv rows).
- torch.nn.Transformer: the state-dict mapping both ways, and the stacks' outputs and
  gradients against torch's encoder and decoder.

Float64 references. transformers 5 computes some pieces in float32 even in a float64 model,
which would cap parity near 1e-7. Rather than loosen 1e-10 we make the reference honest, with
patches that change only the dtype of a computation, never its formula (all via monkeypatch, so
nothing leaks between tests):
  1. GPT-Neo: ``GPTNeoSelfAttention._attn`` casts q and k to float32 → the same function with
     ``torch.float32`` read as float64 (as in test_mha_module.py).
  2. GPT-J: ``eager_attention_forward`` casts q and k to float32 → the ``sdpa`` attention path,
     which stays in the model's dtype; its sin/cos table (``create_sinusoidal_positions``) is
     float32 → rebuilt with the same formula in float64 after loading.
  3. GPT-NeoX and Llama: the rotary tables are computed from float32 ``inv_freq`` and float32
     positions → the same formula in float64 (as in test_rope.py); Llama's eager softmax is
     float32 → the ``sdpa`` path.
  4. Llama: ``LlamaRMSNorm`` normalises in float32 → the same formula in the input's dtype.
GPT-1 and GPT-2 need no patch: stock eager transformers already agrees to ~1e-15. The loss is
never HF's built-in one: we backpropagate a fixed dlogits through both.
"""

import json
import os
import pickle
import re
import types

import numpy as np
import pytest
import torch
import transformers
from transformers.models.gpt_neo import modeling_gpt_neo
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama

from helpers import assert_close, to_torch
from npformer.interop import config_from_hf, hf_config_from_config, hf_state_dict, load_hf, save_hf
from npformer.interop.hf_config import READERS
from npformer.interop.safetensors_file import load_file, read_header, save_file
from npformer.interop.torch_transformer import (load_torch_transformer_state_dict,
                                                torch_transformer_state_dict)
from npformer.models import DecoderLM, EncoderDecoder
from npformer.models.blocks import Dropout
from npformer.presets import preset_config, tiny_config

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# every preset Hugging Face can express, and the family it is written as
HF_PRESETS = {"gpt1": "openai-gpt", "gpt2": "gpt2", "gpt-neo": "gpt_neo", "gpt-j": "gptj",
              "gpt-neox": "gpt_neox", "llama1": "llama", "llama2": "llama", "llama3": "llama"}
# attention path of the float64 reference (see the module docstring)
ATTENTION = {"openai-gpt": "eager", "gpt2": "eager", "gpt_neo": "eager", "gptj": "sdpa",
             "gpt_neox": "sdpa", "llama": "sdpa"}
# transformers 5 calls GPT-NeoX's head ``lm_head`` in the module but keeps ``embed_out`` in
# checkpoint files (its conversion_mapping renames on load and back on save)
FILE_NAMES = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def _tiny(name, **overrides):
    """tiny_config sizes (head size 6, window 3, partial rotary 4 of 6, GQA 2:1). GPT-1's MLP
    width is fixed at 4·n_embd in openai-gpt's config, so its d_ff goes back to the default 4C."""
    if name == "gpt1":
        overrides.setdefault("d_ff", None)
    return tiny_config(name, **overrides)


def _model(config, seed=0):
    """A model with unusual weights: norm weights away from 1, biases non-zero."""
    model = DecoderLM(config, seed=seed).eval()
    rng = np.random.default_rng(seed + 100)
    for name, value in model.parameters().items():
        if "norm" in name and name.endswith(".weight"):
            value[...] = 1.0 + 0.3 * rng.standard_normal(value.shape)
        else:
            value[...] = 0.4 * rng.standard_normal(value.shape) + 0.05
    return model


# ---- honest float64 references (patches documented in the module docstring) ----------------


class _TorchInModelDtype:
    """Stands in for ``torch`` inside GPT-Neo's ``_attn``: ``torch.float32`` reads as float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


_stock_neo_attn = modeling_gpt_neo.GPTNeoSelfAttention._attn
_neo_attn_float64 = types.FunctionType(_stock_neo_attn.__code__,
                                       {**_stock_neo_attn.__globals__, "torch": _TorchInModelDtype()})


def _half_rotary_float64(self, x, position_ids):
    """LlamaRotaryEmbedding / GPTNeoXRotaryEmbedding.forward (default rope type) in float64:
    inv_freq = 1 / θ^(2i/dim), angles = position · inv_freq, tables cos/sin of cat(angles, angles)."""
    dim = 2 * self.inv_freq.shape[-1]
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, dim/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm.forward without the float32 round trip: w · x / sqrt(mean(x²) + eps)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _gptj_positions_float64(hf_model):
    """GPT-J's create_sinusoidal_positions ([sin | cos] of pos · 10000^(−2i/dim)) in float64."""
    for module in hf_model.modules():
        if isinstance(module, modeling_gptj.GPTJRotaryEmbedding):
            dim = module.pos_embd_dim
            inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            angles = torch.arange(module.max_positions, dtype=torch.float64)[:, None] * inv_freq
            module.embed_positions = torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


@pytest.fixture
def float64_hf(monkeypatch):
    monkeypatch.setattr(modeling_gpt_neo.GPTNeoSelfAttention, "_attn", _neo_attn_float64)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _half_rotary_float64)
    monkeypatch.setattr(modeling_gpt_neox.GPTNeoXRotaryEmbedding, "forward", _half_rotary_float64)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)


def _from_pretrained(path, model_type, dtype=torch.float64):
    """transformers' own loader; asserts that every tensor was found and used."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=ATTENTION[model_type], output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info[key]}"
    assert hf.config._attn_implementation == ATTENTION[model_type]
    if model_type == "gptj" and dtype == torch.float64:
        _gptj_positions_float64(hf)
    return hf.eval()


def _ids(config, seed, shape=(2, 9)):
    # T = 9 > the window (3) of the local layers
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


# ---- save_hf → transformers ------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_PRESETS)
def test_save_hf_then_from_pretrained_float64(tmp_path, float64_hf, name):
    model = _model(_tiny(name), seed=len(name))
    assert save_hf(model, str(tmp_path)) == HF_PRESETS[name]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == HF_PRESETS[name] and written["dtype"] == "float64"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = _from_pretrained(tmp_path, HF_PRESETS[name])

    ids = _ids(model.config, 1)
    logits = model.forward(ids)
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    model.zero_grad()
    model.backward(dlogits)
    ref = hf(torch.from_numpy(ids)).logits
    ref.backward(to_torch(dlogits))
    assert logits.dtype == np.float64 and ref.dtype == torch.float64
    assert_close(logits, ref, np.float64, f"{name} logits")
    # every parameter gradient, through hf_state_dict's names and layouts
    grads = hf_state_dict(model, grads=True)
    renames = FILE_NAMES.get(HF_PRESETS[name], {})
    hf_params = {renames.get(k, k): p for k, p in hf.named_parameters()}  # tied: once here too
    assert sorted(grads) == sorted(hf_params)
    for hf_name, p in hf_params.items():
        assert grads[hf_name].dtype == np.float64
        assert_close(grads[hf_name], p.grad, np.float64, f"{name} d{hf_name}")


@pytest.mark.parametrize("name", HF_PRESETS)
def test_save_hf_then_from_pretrained_float32(tmp_path, name):
    """Stock transformers, no patches: float32 throughout on both sides."""
    model = _model(_tiny(name), seed=len(name) + 1)
    save_hf(model, str(tmp_path))
    ours = load_hf(str(tmp_path), dtype=np.float32)
    hf = _from_pretrained(tmp_path, HF_PRESETS[name], dtype=torch.float32)
    ids = _ids(model.config, 3)
    logits = ours.forward(ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits
    assert logits.dtype == np.float32 and ref.dtype == torch.float32
    assert_close(logits, ref, np.float32, f"{name} float32 logits")


@pytest.mark.parametrize("name, reason", [
    ("gpt3", r"gpt2: cannot express windows=\[None, 3\]"),                     # banded layers
    ("palm", r"llama: cannot express block='parallel'.*\n.*cohere: cannot express "
             r"rope_layout='half'"),
])
def test_save_hf_of_inexpressible_presets_raises(tmp_path, name, reason):
    model = _model(_tiny(name))
    with pytest.raises(ValueError, match=r"no Hugging Face model_type reproduces this config"):
        save_hf(model, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=reason):
        hf_config_from_config(model.config)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_save_hf_of_the_2017_encoder_decoder_raises(tmp_path):
    config = _tiny("transformer-2017")
    with pytest.raises(ValueError, match="save_hf takes a DecoderLM, got EncoderDecoder"):
        save_hf(EncoderDecoder(config), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="hf_state_dict takes a DecoderLM"):
        hf_state_dict(EncoderDecoder(config))
    # and no family's config.json can describe it: every candidate names the architecture
    with pytest.raises(ValueError, match="no Hugging Face model_type reproduces this config") as error:
        hf_config_from_config(config)
    reasons = str(error.value).splitlines()[1:]
    assert [r.split(":")[0].strip() for r in reasons] == list(READERS)  # every family, in order
    assert list(READERS)[:7] == ["openai-gpt", "gpt2", "gpt_neo", "gptj", "gpt_neox", "llama",
                                 "cohere"]
    assert all("cannot express architecture='encoder-decoder'" in r for r in reasons), reasons
    assert not (tmp_path / "out").exists()


def test_save_hf_under_a_family_that_cannot_express_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"gpt_neo: cannot express .*qkv_bias=True"):
        save_hf(_model(_tiny("gpt2")), str(tmp_path), model_type="gpt_neo")
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'"):
        save_hf(_model(_tiny("gpt2")), str(tmp_path), model_type="bert")


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_PRESETS)
def test_load_hf_of_save_hf_is_exact(tmp_path, name):
    model = _model(_tiny(name), seed=7)
    save_hf(model, str(tmp_path / "a"))
    loaded = load_hf(str(tmp_path / "a"))
    assert isinstance(loaded, DecoderLM) and not loaded.training
    assert loaded.hf_model_type == HF_PRESETS[name]
    ours, theirs = model.parameters(), loaded.parameters()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert theirs[key].dtype == np.float64 and np.array_equal(theirs[key], ours[key]), key
    ids = _ids(model.config, 4)
    assert_close(loaded.forward(ids), model.forward(ids), np.float64, f"{name} reloaded logits")
    # load_hf → save_hf writes the same bytes
    save_hf(loaded, str(tmp_path / "b"))
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    # float32: the same values, rounded once
    single = load_hf(str(tmp_path / "a"), dtype=np.float32)
    for key, value in single.parameters().items():
        assert value.dtype == np.float32 and np.array_equal(value, ours[key].astype(np.float32)), key


# fields that only name a size another way (resolved and compared separately) ...
_SPELLINGS = ("head_dim", "d_ff", "ffn_multiplier", "ffn_multiple_of", "n_kv_heads",
              "attention_pattern", "window", "rotary_dim")
# ... and the only ones config.json has no place for: both are training-time, not architecture
_LOST = {"gpt2": {"scaled_residual_init"}, "llama3": {"document_mask"}}


@pytest.mark.parametrize("size", ["tiny", "preset"])
@pytest.mark.parametrize("name", HF_PRESETS)
def test_config_from_hf_of_hf_config_from_config(name, size):
    config = _tiny(name) if size == "tiny" else preset_config(name)
    hf = hf_config_from_config(config)
    assert hf["model_type"] == HF_PRESETS[name]
    json.dumps(hf)  # a JSON document
    back = config_from_hf(hf)
    # the architecture: every size resolved, every layer's window
    assert back.kv_heads == config.kv_heads
    assert back.head_size == config.head_size
    assert back.ffn_width == config.ffn_width
    assert [back.layer_window(l) for l in range(back.n_layers)] == \
        [config.layer_window(l) for l in range(config.n_layers)]
    if config.positions == "rope":
        assert (back.rotary_dim or back.head_size) == (config.rotary_dim or config.head_size)
    mine, theirs = config.to_dict(), back.to_dict()
    differing = {k for k in mine if k not in _SPELLINGS and mine[k] != theirs[k]}
    assert differing == _LOST.get(name, set()), {k: (mine[k], theirs[k]) for k in differing}
    assert config_from_hf(hf, "float32").dtype == "float32"
    # and transformers itself accepts the dict
    hf_config = transformers.AutoConfig.for_model(**hf)
    assert hf_config.model_type == HF_PRESETS[name]


def test_llama3_rope_theta_reaches_the_config():
    hf = hf_config_from_config(_tiny("llama3"))
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config_from_hf(hf).rope_theta == 500000.0


def test_llama_pad_token_id_becomes_padding_idx(tmp_path):
    """HF builds nn.Embedding(padding_idx=pad_token_id): that row gets no gradient."""
    model = _model(_tiny("llama2", padding_idx=3))
    save_hf(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == 3
    loaded = load_hf(str(tmp_path))
    assert loaded.config.padding_idx == 3
    ids = np.array([[3, 1, 3, 4, 5], [2, 3, 3, 0, 1]])
    logits = loaded.forward(ids)
    loaded.zero_grad()
    loaded.backward(np.ones_like(logits))
    d_table = hf_state_dict(loaded, grads=True)["model.embed_tokens.weight"]
    assert np.all(d_table[3] == 0) and np.all(d_table[1] != 0)
    # a pad id outside the vocabulary (common in published configs) is no padding row
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "pad_token_id": 11}))
    assert load_hf(str(tmp_path)).config.padding_idx is None


def test_save_hf_gptj_with_full_rotary(tmp_path, float64_hf):
    model = _model(_tiny("gpt-j", rotary_dim=None))
    assert save_hf(model, str(tmp_path)) == "gptj"
    hf = _from_pretrained(tmp_path, "gptj")
    ids = _ids(model.config, 5)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits
    assert_close(model.forward(ids), ref, np.float64, "gpt-j full rotary logits")


# ---- load_hf errors --------------------------------------------------------------------------


def _checkpoint(tmp_path, name="gpt2", **overrides):
    """A saved checkpoint directory; returns (path, its tensors, its config.json dict)."""
    path = tmp_path / "ckpt"
    save_hf(_model(_tiny(name, **overrides)), str(path))
    return path, load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def test_load_hf_needs_a_checkpoint_directory(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    for not_a_checkpoint in (path / "model.safetensors", tmp_path / "nowhere", tmp_path):
        with pytest.raises(ValueError, match=r"is not a Hugging Face checkpoint directory \(no config.json\)"):
            load_hf(str(not_a_checkpoint))
    with pytest.raises(ValueError, match="dtype must be float64 or float32, got float16"):
        load_hf(str(path), dtype=np.float16)


def test_load_hf_config_json_not_json(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError):
        load_hf(str(path))


def test_load_hf_config_json_not_an_object(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json"):
        load_hf(str(path))


@pytest.mark.parametrize("model_type", ["bert", None])
def test_load_hf_unknown_model_type_names_the_supported_ones(tmp_path, model_type):
    path, _, hf = _checkpoint(tmp_path)
    hf["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(hf))
    assert {"cohere", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "openai-gpt"} <= set(READERS)
    with pytest.raises(ValueError, match=rf"unsupported model_type {model_type!r}; supported: "
                                         + re.escape(repr(sorted(READERS)))):
        load_hf(str(path))


class _Canary:
    """Unpickling this creates ``path``: if the file appears, a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("file", ["pytorch_model.bin", "model.safetensors"])
def test_load_hf_never_unpickles(tmp_path, file):
    path, tensors, _ = _checkpoint(tmp_path)
    os.unlink(path / "model.safetensors")
    marker = tmp_path / "pickle_ran"
    payload = pickle.dumps({name: _Canary(str(marker)) for name in tensors})
    (path / file).write_bytes(payload)
    expected = ("npformer reads safetensors only and never loads pickled checkpoints such as "
                "pytorch_model.bin" if file.endswith(".bin") else "is not a safetensors file")
    with pytest.raises(ValueError, match=expected):
        load_hf(str(path))
    assert not marker.exists()
    pickle.loads(payload)["transformer.wte.weight"].close()  # the canary is live
    assert marker.exists()


def _rewrite(path, tensors):
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_load_hf_missing_tensor_is_named(tmp_path):
    path, tensors, _ = _checkpoint(tmp_path)
    del tensors["transformer.h.1.ln_2.bias"]
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"checkpoint lacks tensor\(s\) \['transformer.h.1.ln_2.bias'\] "
                                         r"that a gpt2 model of this config needs"):
        load_hf(str(path))


def test_load_hf_extra_tensor_is_named(tmp_path):
    path, tensors, _ = _checkpoint(tmp_path)
    tensors["transformer.h.2.ln_1.weight"] = np.ones(12)  # a third layer in a 2-layer config
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"checkpoint has tensor\(s\) \['transformer.h.2.ln_1.weight'\] "
                                         r"that a gpt2 model of this config does not have"):
        load_hf(str(path))


def _re_tuple(shape):
    """A shape as the regex of its printed tuple."""
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("name, tensor, bad_shape, good_shape", [
    ("gpt2", "transformer.h.0.attn.c_attn.weight", (36, 12), (12, 36)),   # Linear layout, not Conv1D
    ("gpt2", "transformer.wpe.weight", (15, 12), (16, 12)),
    ("llama2", "model.layers.1.self_attn.k_proj.weight", (24, 12), (12, 12)),  # MHA-sized k in GQA
    ("gpt-neox", "gpt_neox.layers.0.attention.query_key_value.bias", (37,), (36,)),
])
def test_load_hf_wrong_shape_names_tensor_and_both_shapes(tmp_path, name, tensor, bad_shape, good_shape):
    path, tensors, _ = _checkpoint(tmp_path, name)
    assert tensors[tensor].shape == good_shape
    tensors[tensor] = np.zeros(bad_shape)
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=rf"tensor '{tensor}' has shape {_re_tuple(bad_shape)}, "
                                         rf"but the config needs {_re_tuple(good_shape)}"):
        load_hf(str(path))


def test_load_hf_integer_weights_are_refused(tmp_path):
    path, tensors, _ = _checkpoint(tmp_path)
    tensors["transformer.ln_f.weight"] = np.ones(12, np.int64)
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"final_norm.weight has dtype int64; weights must be floats"):
        load_hf(str(path))


_DELETE = object()  # _edit: remove the field


def _edit(hf, **changes):
    hf = dict(hf)
    for key, value in changes.items():
        if value is _DELETE:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf

_LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("name, changes, message", [
    ("llama2", dict(rope_parameters={**_LLAMA3_SCALING, "rope_type": "longrope"}),
     r"rope_type='longrope' is not supported"),
    # transformers 4.x spelling: rope_scaling with "type", theta at the top level; llama3
    # without its low/high frequency factors (transformers raises KeyError)
    ("llama2", dict(rope_parameters=_DELETE, rope_theta=500000.0,
                    rope_scaling={"type": "llama3", "factor": 8.0}),
     r"rope_scaling lacks 'low_freq_factor', which rope_type='llama3' requires"),
    ("gpt-neox", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                       "mscale": 1.0, "mscale_all_dim": 0.5}),
     r"key\(s\) \['mscale', 'mscale_all_dim'\] are not read by npformer for rope_type='yarn'"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True),
     r"field scale_attn_by_inverse_layer_idx=True is not supported \(a per-layer attention scale\)"),
    ("gpt2", dict(activation_function="quick_gelu"),
     r"activation_function='quick_gelu' is not supported for model_type 'gpt2'; supported: \["),
    ("llama1", dict(mlp_bias=True), r"field mlp_bias=True is not supported"),
    ("llama1", dict(hidden_act="relu"),  # (gelu_new is geglu_tanh since issue 16)
     r"field hidden_act='relu' is not supported for model_type 'llama'; supported: "
     r"\['gelu', 'gelu_accurate', 'gelu_fast', 'gelu_new', 'gelu_python', 'gelu_python_tanh', "
     r"'gelu_pytorch_tanh', 'silu', 'swish'\]"),
    # an absent field means transformers' default (LlamaConfig: hidden_size 4096), which the
    # weights then contradict
    ("llama1", dict(hidden_size=_DELETE), r"has shape \(\d+, 12\), but the config needs \(\d+, 4096\)"),
    ("llama1", dict(model_type=_DELETE), r"unsupported model_type None"),
    ("gpt-neo", dict(attention_types=[[["global", "local"], 2]]),
     r"attention_layers has 4 entries for num_layers=2"),
])
def test_load_hf_unsupported_config_fields_are_named(tmp_path, name, changes, message):
    path, _, hf = _checkpoint(tmp_path, name)
    (path / "config.json").write_text(json.dumps(_edit(hf, **changes)))
    with pytest.raises(ValueError, match=message):
        load_hf(str(path))


def test_load_hf_reads_a_config_json_written_by_transformers_with_llama3_scaling(tmp_path):
    path, _, hf = _checkpoint(tmp_path, "llama2")
    config = transformers.LlamaConfig(**{k: hf[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "max_position_embeddings")}, rope_parameters=_LLAMA3_SCALING)
    config.save_pretrained(str(path))  # overwrites config.json, weights stay
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    config = load_hf(str(path)).config
    assert (config.rope_type, config.rope_theta, config.rope_factor, config.rope_low_freq_factor,
            config.rope_high_freq_factor, config.rope_original_max_seq_len) == (
        "llama3", 500000.0, 8.0, 1.0, 4.0, 8)


# ---- sharded and tied checkpoints ------------------------------------------------------------


def _hf_model(kind):
    """A small transformers model with every parameter random (norm weights not 1)."""
    if kind == "llama":  # GQA 3:1, H·D = 18 ≠ C = 15
        config = transformers.LlamaConfig(
            vocab_size=13, hidden_size=15, num_attention_heads=3, num_key_value_heads=1, head_dim=6,
            intermediate_size=22, num_hidden_layers=3, max_position_embeddings=16, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    else:
        config = transformers.GPT2Config(vocab_size=13, n_embd=15, n_head=3, n_layer=3, n_positions=16,
                                         bos_token_id=0, eos_token_id=1, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float64)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4 + (1.0 if "norm" in name or ".ln_" in name else 0.05))
    return hf.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sharded_checkpoint_loads_like_the_unsharded_one(tmp_path, float64_hf, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(str(tmp_path / "single"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="4KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    single, sharded = load_hf(str(tmp_path / "single")), load_hf(str(tmp_path / "sharded"))
    assert sorted(single.parameters()) == sorted(sharded.parameters())
    for key, value in single.parameters().items():
        assert np.array_equal(sharded.parameters()[key], value), key
    # the values are transformers' own
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = hf_state_dict(sharded)
    for key, value in ours.items():
        assert np.array_equal(value, state[key]), key
    assert set(state) - set(ours) == ({"lm_head.weight"} if kind == "gpt2" else set())  # tied
    ids = np.random.default_rng(11).integers(0, 13, (2, 9))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits
    assert_close(sharded.forward(ids), ref, np.float64, f"sharded {kind} logits")


def test_bfloat16_checkpoint_loads_as_its_float_values(tmp_path):
    """Most published checkpoints are bfloat16: read exactly, then widened."""
    hf = _hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path))
    header, _ = read_header(str(tmp_path / "model.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    for dtype in (np.float64, np.float32):
        ours = hf_state_dict(load_hf(str(tmp_path), dtype=dtype))
        for name, p in hf.state_dict().items():
            assert ours[name].dtype == dtype
            assert np.array_equal(ours[name], p.float().numpy().astype(dtype)), name


def test_shard_outside_the_checkpoint_is_refused(tmp_path):
    hf = _hf_model("llama")
    path = tmp_path / "sharded"
    hf.save_pretrained(str(path), max_shard_size="4KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(index["weight_map"])[0]
    for shard, message in (("../elsewhere.safetensors", "shards must be .safetensors files inside"),
                           ("pytorch_model-00001.bin", "shards must be .safetensors files inside")):
        edited = {**index, "weight_map": {**index["weight_map"], victim: shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=message):
            load_hf(str(path))
    # an index that lists a tensor its shard does not hold
    shard = index["weight_map"][victim]
    edited = {**index, "weight_map": {**index["weight_map"], "model.extra.weight": shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"shard {shard} lacks tensor\(s\) \['model.extra.weight'\]"):
        load_hf(str(path))


def test_tied_checkpoint_saved_by_transformers_loads(tmp_path):
    """transformers omits lm_head.weight of a tied model; logits and gradients still agree."""
    hf = _hf_model("gpt2")
    hf.save_pretrained(str(tmp_path))
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = load_hf(str(tmp_path))
    assert model.config.tie_embeddings and "lm_head.weight" not in model.parameters()
    ids = np.random.default_rng(6).integers(0, 13, (2, 7))
    logits = model.forward(ids)
    dlogits = np.random.default_rng(7).standard_normal(logits.shape)
    model.zero_grad()
    model.backward(dlogits)
    ref = hf(torch.from_numpy(ids)).logits
    ref.backward(to_torch(dlogits))
    assert_close(logits, ref, np.float64, "tied gpt2 logits")
    # the table's gradient is the sum of its two uses, in HF as in ours
    assert_close(hf_state_dict(model, grads=True)["transformer.wte.weight"],
                 hf.transformer.wte.weight.grad, np.float64, "d wte")


@pytest.mark.parametrize("name, table", [("gpt2", "transformer.wte.weight"),
                                         ("llama1", "model.embed_tokens.weight")])
def test_tied_checkpoint_with_lm_head(tmp_path, name, table):
    path, tensors, _ = _checkpoint(tmp_path, name, tie_embeddings=True)
    assert "lm_head.weight" not in tensors
    reference = load_hf(str(path)).parameters()
    # a tied checkpoint that stores the head anyway, equal to the table: loads
    _rewrite(path, {**tensors, "lm_head.weight": tensors[table].copy()})
    loaded = load_hf(str(path)).parameters()
    assert sorted(loaded) == sorted(reference)
    for key in reference:
        assert np.array_equal(loaded[key], reference[key]), key
    # ... a head that differs from the table: refused
    head = tensors[table].copy()
    head[3, 2] += 1e-12
    _rewrite(path, {**tensors, "lm_head.weight": head})
    with pytest.raises(ValueError, match=rf"the config ties the head to {table}, but the "
                                         r"checkpoint's lm_head.weight differs from it"):
        load_hf(str(path))


# ---- hf_state_dict layouts -------------------------------------------------------------------


def _backward(model, seed):
    ids = _ids(model.config, seed)
    logits = model.forward(ids)
    model.zero_grad()
    model.backward(np.random.default_rng(seed + 1).standard_normal(logits.shape))


def test_hf_state_dict_gpt2_tied_and_conv1d_layouts():
    model = _model(_tiny("gpt2"), seed=3)
    _backward(model, 8)
    C, F = model.config.d_model, model.config.ffn_width
    for grads in (True, False):
        ours = model.gradients() if grads else model.parameters()
        hf = hf_state_dict(model, grads=grads)
        assert "lm_head.weight" not in hf and "lm_head.weight" not in ours
        # one entry for the tied table: our single accumulator, both uses summed
        assert np.array_equal(hf["transformer.wte.weight"], ours["embed.tokens.weight"])
        assert np.array_equal(hf["transformer.wpe.weight"], ours["embed.position_table"])
        for l in range(model.config.n_layers):
            h, o = f"transformer.h.{l}", f"layers.{l}.attn"
            c_attn = hf[f"{h}.attn.c_attn.weight"]
            assert c_attn.shape == (C, 3 * C)  # Conv1D: (in, out), columns [q | k | v]
            for i, p in enumerate("qkv"):
                assert np.array_equal(c_attn[:, i * C:(i + 1) * C], ours[f"{o}.{p}_proj.weight"].T)
                assert np.array_equal(hf[f"{h}.attn.c_attn.bias"][i * C:(i + 1) * C], ours[f"{o}.{p}_proj.bias"])
            assert np.array_equal(hf[f"{h}.attn.c_proj.weight"], ours[f"{o}.out_proj.weight"].T)
            assert hf[f"{h}.mlp.c_fc.weight"].shape == (C, F)
            assert np.array_equal(hf[f"{h}.mlp.c_fc.weight"], ours[f"layers.{l}.ffn.up.weight"].T)
            assert hf[f"{h}.mlp.c_proj.weight"].shape == (F, C)
            assert np.array_equal(hf[f"{h}.mlp.c_proj.weight"], ours[f"layers.{l}.ffn.down.weight"].T)
    # gradients are nonzero where they should be (the check above is not vacuous)
    assert np.all(np.abs(hf_state_dict(model, grads=True)["transformer.h.0.attn.c_attn.weight"]).max(axis=0) > 0)


def test_hf_state_dict_gpt_neox_fused_qkv_rows_are_per_head():
    model = _model(_tiny("gpt-neox"), seed=4)
    _backward(model, 9)
    H, D, C = model.config.n_heads, model.config.head_size, model.config.d_model
    for grads in (True, False):
        ours = model.gradients() if grads else model.parameters()
        hf = hf_state_dict(model, grads=grads)
        for l in range(model.config.n_layers):
            prefix = f"gpt_neox.layers.{l}.attention.query_key_value"
            weight, bias = hf[f"{prefix}.weight"], hf[f"{prefix}.bias"]
            assert weight.shape == (3 * H * D, C) and bias.shape == (3 * H * D,)
            for h in range(H):
                rows = slice(h * D, (h + 1) * D)  # head h of q_proj / k_proj / v_proj
                for i, p in enumerate("qkv"):
                    fused = slice(h * 3 * D + i * D, h * 3 * D + (i + 1) * D)  # [q_h; k_h; v_h]
                    assert np.array_equal(weight[fused], ours[f"layers.{l}.attn.{p}_proj.weight"][rows])
                    assert np.array_equal(bias[fused], ours[f"layers.{l}.attn.{p}_proj.bias"][rows])
        assert "embed_out.weight" in hf and "gpt_neox.embed_in.weight" in hf  # untied


# ---- torch.nn.Transformer --------------------------------------------------------------------


def _torch_transformer(final_norm=True, encoder_layers=3, decoder_layers=2, seed=0):
    torch.manual_seed(seed)
    t = torch.nn.Transformer(d_model=12, nhead=2, num_encoder_layers=encoder_layers,
                             num_decoder_layers=decoder_layers, dim_feedforward=20, dropout=0.0,
                             batch_first=True, dtype=torch.float64)
    if not final_norm:
        t.encoder.norm = None
        t.decoder.norm = None
    with torch.no_grad():
        for name, p in t.named_parameters():
            is_norm_weight = ".norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.4 + (1.0 if is_norm_weight else 0.05))
    return t


def _enc_dec(final_norm=True, encoder_layers=3, decoder_layers=2, **overrides):
    # d_model 12, 2 heads of 6, d_ff 20, post-LN, ReLU, eps 1e-5: torch.nn.Transformer's defaults
    config = _tiny("transformer-2017", final_norm=final_norm, dropout=0.0,
                   n_encoder_layers=encoder_layers, n_layers=decoder_layers, **overrides)
    return EncoderDecoder(config, seed=1).eval()


def _numpy_state(t):
    return {k: v.detach().numpy().copy() for k, v in t.state_dict().items()}


@pytest.mark.parametrize("final_norm", [True, False])
def test_torch_transformer_state_dict_round_trip(final_norm):
    t = _torch_transformer(final_norm)
    state = _numpy_state(t)
    assert ("encoder.norm.weight" in state) == final_norm
    model = _enc_dec(final_norm)
    embedding_before = model.parameters()["embed.tokens.weight"].copy()
    load_torch_transformer_state_dict(model, state)
    back = torch_transformer_state_dict(model)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == np.float64 and np.array_equal(back[name], value), name
    # the documented correspondence, spot-checked by name
    params, C = model.parameters(), 12
    pairs = [("encoder.1.attn.k_proj.weight", state["encoder.layers.1.self_attn.in_proj_weight"][C:2 * C]),
             ("encoder.2.attn.q_proj.bias", state["encoder.layers.2.self_attn.in_proj_bias"][:C]),
             ("decoder.0.cross_attn.v_proj.weight", state["decoder.layers.0.multihead_attn.in_proj_weight"][2 * C:]),
             ("decoder.1.cross_attn.out_proj.bias", state["decoder.layers.1.multihead_attn.out_proj.bias"]),
             ("encoder.0.ffn_norm.weight", state["encoder.layers.0.norm2.weight"]),
             ("decoder.1.cross_norm.weight", state["decoder.layers.1.norm2.weight"]),
             ("decoder.1.ffn_norm.bias", state["decoder.layers.1.norm3.bias"]),
             ("decoder.0.ffn.up.weight", state["decoder.layers.0.linear1.weight"]),
             ("encoder.2.ffn.down.bias", state["encoder.layers.2.linear2.bias"])]
    if final_norm:
        pairs += [("encoder_norm.weight", state["encoder.norm.weight"]),
                  ("decoder_norm.bias", state["decoder.norm.bias"])]
    else:
        assert "encoder_norm.weight" not in params
    for ours, value in pairs:
        assert np.array_equal(params[ours], value), ours
    # torch's module has no embeddings: ours stay as they were
    assert np.array_equal(params["embed.tokens.weight"], embedding_before)


@pytest.mark.parametrize("final_norm", [True, False])
def test_stacks_match_torch_encoder_and_decoder(final_norm):
    """The encoder and decoder stacks on the same input vectors: outputs, input gradients and
    every parameter gradient (through torch_transformer_state_dict(grads=True))."""
    t = _torch_transformer(final_norm, seed=2)
    model = _enc_dec(final_norm)
    load_torch_transformer_state_dict(model, _numpy_state(t))
    rng = np.random.default_rng(10)
    B, S, T, C = 2, 5, 7, 12
    src, tgt = rng.standard_normal((B, S, C)) * 1.3 - 0.2, rng.standard_normal((B, T, C)) + 0.3
    dy = rng.standard_normal((B, T, C))
    dm_out = rng.standard_normal((B, S, C))  # a second loss term on the encoder output

    no_dropout = Dropout(0.0, np.random.default_rng(0), training=False)
    m, enc_caches = src, []
    for block in model.encoder:
        m, cache = block.forward(m, no_dropout)
        enc_caches.append(cache)
    if final_norm:
        m, enc_norm = model.encoder_norm.forward(m)
    y, dec_caches = tgt, []
    for block in model.decoder:
        y, cache = block.forward(y, no_dropout, memory=m)
        dec_caches.append(cache)
    if final_norm:
        y, dec_norm = model.decoder_norm.forward(y)
    model.zero_grad()
    dy_ = model.decoder_norm.backward(dy, dec_norm) if final_norm else dy
    dm = dm_out
    for block, cache in zip(reversed(model.decoder), reversed(dec_caches)):
        dy_, dm_layer = block.backward(dy_, cache)
        dm = dm + dm_layer
    d_tgt = dy_
    if final_norm:
        dm = model.encoder_norm.backward(dm, enc_norm)
    for block, cache in zip(reversed(model.encoder), reversed(enc_caches)):
        dm = block.backward(dm, cache)
    d_src = dm

    src_t, tgt_t = to_torch(src, True), to_torch(tgt, True)
    m_t = t.encoder(src_t)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    y_t = t.decoder(tgt_t, m_t, tgt_mask=mask, tgt_is_causal=True)
    ((y_t * to_torch(dy)).sum() + (m_t * to_torch(dm_out)).sum()).backward()

    assert_close(m, m_t, np.float64, "encoder output")
    assert_close(y, y_t, np.float64, "decoder output")
    assert_close(d_src, src_t.grad, np.float64, "d src vectors")
    assert_close(d_tgt, tgt_t.grad, np.float64, "d tgt vectors")
    grads = torch_transformer_state_dict(model, grads=True)
    torch_params = dict(t.named_parameters())
    assert sorted(grads) == sorted(torch_params)
    for name, p in torch_params.items():
        assert_close(grads[name], p.grad, np.float64, f"d {name}")


def test_torch_transformer_mismatches_raise():
    three_two = _numpy_state(_torch_transformer(True, encoder_layers=3, decoder_layers=2))
    with pytest.raises(ValueError, match=r"has tensors this model does not: \['encoder.layers.2.*"
                                         r"2 encoder and 2 decoder layers"):
        load_torch_transformer_state_dict(_enc_dec(True, encoder_layers=2), three_two)
    with pytest.raises(ValueError, match=r"lacks \['decoder.layers.2.linear1.bias'"):
        load_torch_transformer_state_dict(_enc_dec(True, decoder_layers=3), three_two)
    # torch's final norms: present exactly when final_norm=True
    no_norms = _numpy_state(_torch_transformer(False))
    with pytest.raises(ValueError, match=r"lacks \['decoder.norm.bias', 'decoder.norm.weight', "
                                         r"'encoder.norm.bias', 'encoder.norm.weight'\] \(final_norm=True"):
        load_torch_transformer_state_dict(_enc_dec(True), no_norms)
    with pytest.raises(ValueError, match=r"does not: \['decoder.norm.bias', .*\(final_norm=False"):
        load_torch_transformer_state_dict(_enc_dec(False), three_two)
    # a mis-shaped tensor
    bad = dict(three_two)
    bad["encoder.layers.1.self_attn.in_proj_weight"] = np.zeros((24, 12))
    with pytest.raises(ValueError, match=r"tensor 'encoder.layers.1.self_attn.in_proj_weight' has "
                                         r"shape \(24, 12\), but the config needs \(36, 12\)"):
        load_torch_transformer_state_dict(_enc_dec(True), bad)
    # a model torch.nn.Transformer cannot hold (no q/k/v biases)
    with pytest.raises(ValueError, match=r"torch.nn.Transformer has biases and LayerNorms everywhere; "
                                         r"this model lacks \['encoder.0.attn.q_proj.bias'"):
        torch_transformer_state_dict(_enc_dec(True, qkv_bias=False))
    with pytest.raises(ValueError, match="expected an EncoderDecoder, got DecoderLM"):
        torch_transformer_state_dict(_model(_tiny("gpt2")))
    with pytest.raises(ValueError, match="expected an EncoderDecoder, got DecoderLM"):
        load_torch_transformer_state_dict(_model(_tiny("gpt2")), three_two)
