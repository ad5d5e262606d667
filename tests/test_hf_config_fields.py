"""Every config.json field of a supported Hugging Face family is implemented or refused by name
— never silently ignored — and ``npformer compare --hf`` cannot pass a model it did not
reproduce.

The field tables live in :data:`npformer.interop.hf_config.FAMILIES`. The tests here:

- parity (``compare_hf_dir``: logits, loss and every gradient by checkpoint name, float64
  within 1e-10 relative, transformers' float32 islands removed by ``exact_float64``) for each
  accepted spelling: the ``attribute_map`` aliases (gpt2's ``hidden_size`` for ``n_embd``, …),
  the legacy RoPE keys, every accepted activation name, fields absent from config.json (which
  mean transformers' class default: Cohere's logit_scale 0.0625 and theta 500000, NeoX's
  rotary fraction 0.25, GPT-J's rotary_dim 64), and fields that do not change the function
  (``pretraining_tp``, ``reorder_and_upcast_attn``);
- refusal by name for each field value npformer cannot reproduce, each of which the old
  reader loaded silently into another model (or refused with a misleading message);
- clear one-line errors naming the file for a malformed or non-UTF-8 config.json or shard
  index, a missing shard, and a NaN weight;
- compare's own honesty: a gradient missing on either side, or a checkpoint tensor
  transformers did not load, fails the comparison.

The checkpoints are tiny random transformers models written with ``save_pretrained``, their
config.json then edited the way a hand-written or older config would differ.
"""

import json

import numpy as np
import pytest
import torch
import transformers

from helpers import edit_config_json
from npformer.interop import compare as compare_module
from npformer.interop import load_hf, save_hf
from npformer.interop.compare import compare_hf_dir
from npformer.interop.hf_config import FAMILIES, IGNORE, ONLY, USE, config_from_hf
from npformer.interop.safetensors_file import load_file, save_file

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 23  # vocabulary of every tiny model
_SPECIAL = dict(bos_token_id=0, eos_token_id=0)

# model_type → the tiny transformers config fields of a baseline model (T = 7 fits all)
BASE = {
    "openai-gpt": dict(n_embd=12, n_head=2, n_layer=2, n_positions=16),
    "gpt2": dict(n_embd=12, n_head=2, n_layer=2, n_positions=16, n_inner=20),
    "gpt_neo": dict(hidden_size=12, num_heads=2, num_layers=2, max_position_embeddings=16,
                    window_size=3, attention_types=[[["local", "global"], 1]],
                    intermediate_size=20),
    "gptj": dict(n_embd=12, n_head=2, n_layer=2, n_positions=16, rotary_dim=4, n_inner=20),
    "gpt_neox": dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=2,
                     intermediate_size=20, max_position_embeddings=16,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                          partial_rotary_factor=0.5)),
    "llama": dict(hidden_size=12, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=2, intermediate_size=20, max_position_embeddings=16,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "cohere": dict(hidden_size=12, num_attention_heads=2, num_key_value_heads=1,
                   num_hidden_layers=2, intermediate_size=20, max_position_embeddings=16,
                   logit_scale=0.5, pad_token_id=0,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


def _saved(path, model_type, **changes):
    """A tiny random float64 transformers model of ``model_type`` saved with save_pretrained;
    returns the directory. Norm gains N(1, 0.3²), everything else off-centre and non-zero."""
    config = transformers.AutoConfig.for_model(model_type, vocab_size=V, **_SPECIAL,
                                               **{**BASE[model_type], **changes})
    hf = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    rng = np.random.default_rng(0)
    gains = {f"{name}.weight" for name, module in hf.named_modules()
             if type(module).__name__.endswith(("LayerNorm", "RMSNorm"))}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            z = rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(1.0 + 0.3 * z if name in gains else 0.35 * z + 0.05))
    hf.save_pretrained(str(path))
    return str(path)




def _assert_reproduced(path):
    reports = compare_hf_dir(path, "float64")
    failing = [(r.tensor, r.max_rel_err) for r in reports if not r.passed]
    assert not failing, failing
    assert len(reports) > 10  # logits, loss and every gradient


# ---- the tables themselves ---------------------------------------------------------------------


def test_every_attribute_of_each_transformers_config_class_is_in_its_table():
    """Each family's table covers every attribute its transformers config class declares
    (and the attribute_map aliases), so no field can be silently skipped by omission."""
    from transformers import CONFIG_MAPPING

    for model_type, family in FAMILIES.items():
        cls = CONFIG_MAPPING[model_type]
        declared = {f.name for f in family.fields} | {a for f in family.fields for a in f.aliases}
        attributes = set(cls().to_dict()) - {"transformers_version", "model_type", "output_attentions"}
        attributes |= set(cls.attribute_map)
        assert attributes - declared == set(), model_type
        for field in family.fields:
            assert field.verdict in (USE, ONLY, IGNORE) and field.how, (model_type, field)


_MODELING = {"openai-gpt": "openai", "gpt2": "gpt2", "gpt_neo": "gpt_neo", "gptj": "gptj",
             "gpt_neox": "gpt_neox", "llama": "llama", "cohere": "cohere",
             "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma": "gemma", "gemma2": "gemma2"}  # issue 16


def test_every_config_attribute_the_modeling_code_reads_is_in_its_table():
    """Every ``config.X`` and ``getattr(config, "X")`` in the family's modeling_*.py — the
    attributes that can change what it computes, including ones its config class does not
    declare (Cohere's head_dim) — has a verdict in the table."""
    import importlib
    import inspect
    import re

    assert set(_MODELING) == set(FAMILIES)
    for model_type, module in _MODELING.items():
        source = inspect.getsource(importlib.import_module(
            f"transformers.models.{module}.modeling_{module}"))
        read = set(re.findall(r"config\.([A-Za-z_]\w*)", source))
        read |= set(re.findall(r"getattr\((?:self\.)?config, \"(\w+)\"", source))
        declared = {f.name for f in FAMILIES[model_type].fields}
        declared |= {alias for f in FAMILIES[model_type].fields for alias in f.aliases}
        assert read - declared == set(), model_type


# ---- accepted spellings reproduce the model -----------------------------------------------------


@pytest.mark.parametrize("model_type, rename", [
    # attribute_map aliases: transformers reads hidden_size as n_embd, and so on
    ("gpt2", dict(n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                  n_positions="max_position_embeddings")),
    ("openai-gpt", dict(n_embd="hidden_size", n_layer="num_hidden_layers",
                        n_head="num_attention_heads", n_positions="max_position_embeddings")),
    ("gptj", dict(n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                  n_positions="max_position_embeddings")),
    ("gpt_neo", dict(num_heads="num_attention_heads", num_layers="num_hidden_layers")),
])
def test_attribute_map_aliases_are_read_like_the_names(tmp_path, model_type, rename):
    path = _saved(tmp_path, model_type)
    hf = edit_config_json(path, rename=rename)
    assert not set(rename) & set(hf)
    _assert_reproduced(path)


def test_the_same_field_spelled_twice_with_different_values_is_refused(tmp_path):
    path = _saved(tmp_path, "gpt2")
    edit_config_json(path, hidden_size=24)  # n_embd stays 12; transformers would silently take 24
    with pytest.raises(ValueError, match=r"config.json gives n_embd twice with different values "
                                         r"\(n_embd=12, hidden_size=24\)"):
        load_hf(path)
    edit_config_json(path, hidden_size=12)  # the same value twice is fine
    assert load_hf(path).config.d_model == 12


@pytest.mark.parametrize("model_type, field, name", [
    *[("gpt2", "activation_function", n) for n in ("gelu", "gelu_python", "gelu_new",
                                                  "gelu_pytorch_tanh", "gelu_python_tanh",
                                                  "gelu_accurate", "gelu_fast", "relu")],
    ("gpt_neo", "activation_function", "gelu_pytorch_tanh"),
    ("gptj", "activation_function", "gelu"),
    ("gpt_neox", "hidden_act", "gelu_fast"),
    ("openai-gpt", "afn", "relu"),
    ("llama", "hidden_act", "swish"),
    ("llama", "hidden_act", "gelu"),  # GeGLU, exact erf
    ("llama", "hidden_act", "gelu_pytorch_tanh"),  # GeGLU with the tanh GeLU (geglu_tanh)
    ("cohere", "hidden_act", "gelu_python"),
])
def test_accepted_activation_names_reproduce_the_model(tmp_path, model_type, field, name):
    path = _saved(tmp_path, model_type, **{field: name})
    assert json.load(open(f"{path}/config.json"))[field] == name
    _assert_reproduced(path)


@pytest.mark.parametrize("model_type, field, name", [
    ("gpt2", "activation_function", "quick_gelu"),
    ("gpt2", "activation_function", "gelu_10"),
    ("gpt2", "activation_function", "silu"),
    ("gpt_neox", "hidden_act", "relu2"),
    ("openai-gpt", "afn", "swish"),
    ("llama", "hidden_act", "quick_gelu"),  # (gelu_pytorch_tanh is geglu_tanh since issue 16)
    ("cohere", "hidden_act", "relu"),
])
def test_other_activation_names_are_refused_by_name(tmp_path, model_type, field, name):
    path = _saved(tmp_path, model_type)
    edit_config_json(path, **{field: name})
    with pytest.raises(ValueError, match=rf"config.json: config.json field {field}={name!r} is not "
                                         rf"supported for model_type {model_type!r}; supported: \["):
        load_hf(path)


@pytest.mark.parametrize("model_type, drop", [
    # CohereConfig defaults: logit_scale 0.0625, rope theta 500000, pad_token_id 0
    ("cohere", ("logit_scale",)),
    ("cohere", ("rope_parameters",)),
    ("cohere", ("pad_token_id",)),
    # GPTNeoXConfig: rotary_pct 0.25 of the head (int(8 · 0.25) = 2 channels), theta 10000
    ("gpt_neox", ("rope_parameters",)),
])
def test_absent_fields_mean_transformers_defaults(tmp_path, model_type, drop):
    """A config.json without the key (hand-written, or from an older transformers) means the
    class default of transformers — the old reader used 1.0, 10000, no pad row, and a full
    rotation instead."""
    path = _saved(tmp_path, model_type)  # compare_hf_dir's batch holds id 0 (the pad row)
    edit_config_json(path, drop=drop)
    _assert_reproduced(path)


def test_gptj_absent_rotary_dim_is_64(tmp_path):
    """GPTJConfig's rotary_dim default is 64: with 72-channel heads, 64 are rotated (the old
    reader rotated all 72)."""
    path = _saved(tmp_path, "gptj", n_embd=144, n_head=2, rotary_dim=64)
    edit_config_json(path, drop=("rotary_dim",))
    assert load_hf(path).config.rotary_dim == 64
    _assert_reproduced(path)


@pytest.mark.parametrize("model_type, changes", [
    # legacy GPT-NeoX keys: rotary_pct / rotary_emb_base instead of rope_parameters
    ("gpt_neox", dict(rotary_pct=0.5, rotary_emb_base=500.0)),
    # legacy Llama: top-level rope_theta, rope_scaling with "type"
    ("llama", dict(rope_theta=700.0)),
    ("llama", dict(rope_scaling={"type": "default", "rope_theta": 800.0})),
])
def test_legacy_rope_spellings_reproduce_the_model(tmp_path, model_type, changes):
    path = _saved(tmp_path, model_type)
    edit_config_json(path, drop=("rope_parameters",), **changes)
    _assert_reproduced(path)


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers(tmp_path):
    """transformers 5 takes the legacy rope_scaling over rope_parameters; the old reader took
    rope_parameters and silently loaded a different theta (or an unscaled RoPE)."""
    path = _saved(tmp_path, "llama")
    edit_config_json(path, rope_scaling={"rope_type": "default", "rope_theta": 900.0})
    assert load_hf(path).config.rope_theta == 900.0
    _assert_reproduced(path)
    edit_config_json(path, rope_scaling={"rope_type": "linear", "factor": 2.0})  # now implemented
    assert (load_hf(path).config.rope_type, load_hf(path).config.rope_factor) == ("linear", 2.0)
    _assert_reproduced(path)
    edit_config_json(path, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling rope_type='longrope' is not supported"):
        load_hf(path)


@pytest.mark.parametrize("model_type, changes", [
    ("llama", dict(pretraining_tp=2)),  # transformers 5 never reads it
    ("gpt_neo", dict(attention_layers=["global", "global"])),  # the stored list wins
    ("openai-gpt", dict(tie_word_embeddings=False)),  # a separate lm_head.weight
    ("cohere", dict(tie_word_embeddings=False, head_dim=4)),  # read by getattr in attention
])
def test_other_implemented_fields_reproduce_the_model(tmp_path, model_type, changes):
    path = _saved(tmp_path, model_type, **changes)
    edit_config_json(path, **changes)  # as written, whatever save_pretrained dropped
    _assert_reproduced(path)


def test_reorder_and_upcast_attn_changes_precision_only(tmp_path):
    """GPT-2's reorder_and_upcast_attn computes the same scores in float32: float32 parity."""
    path = _saved(tmp_path, "gpt2", reorder_and_upcast_attn=True)
    reports = compare_hf_dir(path, "float32")
    assert all(r.passed for r in reports), [r for r in reports if not r.passed]


# ---- refused by name ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, changes, message", [
    ("gpt2", dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
     r"field quantization_config=\{.*\} is not supported \(a quantized checkpoint"),
    ("llama", dict(quantization_config={"quant_method": "fp8"}), r"quantization_config="),
    ("gptj", dict(rotary_dim=None), r"field rotary_dim is null; transformers needs a value"),
    ("cohere", dict(logit_scale=None), r"field logit_scale is null"),
    ("gpt_neox", dict(head_dim=4), r"field head_dim=4 is not supported for gpt_neox"),
    ("gpt_neox", dict(rope_theta=500000.0),
     r"field rope_theta=500000.0 at the top level is ignored by transformers' gpt_neox"),
    ("gpt_neox", dict(partial_rotary_factor=1.0),
     r"field partial_rotary_factor=1.0 at the top level is ignored"),
    ("gpt_neo", dict(attention_layers=["global", "sparse"]),
     r"attention_layers holds 'sparse'; supported: 'global', 'local'"),
    ("gpt2", dict(add_cross_attention=True), r"field add_cross_attention=True is not supported"),
    ("cohere", dict(use_qk_norm=True), r"field use_qk_norm=True is not supported"),
    ("llama", dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported"),
    # transformers' masking_utils then builds a bidirectional mask (llama: first-position logits
    # 0.037 apart from the causal model we used to load silently)
    ("llama", dict(is_causal=False), r"field is_causal=False is not supported"),
    ("gpt2", dict(is_causal=False), r"field is_causal=False is not supported"),
])
def test_unreproducible_fields_are_refused_by_name(tmp_path, model_type, changes, message):
    path = _saved(tmp_path, model_type)
    edit_config_json(path, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf(path)


_GPT2 = dict(model_type="gpt2", n_embd=12, n_head=2, n_layer=1, n_positions=8, vocab_size=V)
_LLAMA = dict(model_type="llama", hidden_size=12, num_attention_heads=2, num_hidden_layers=1,
              intermediate_size=8, vocab_size=V)


@pytest.mark.parametrize("hf, message", [
    ({**_GPT2, "scale_attn_by_inverse_layer_idx": True},
     r"scale_attn_by_inverse_layer_idx=True is not supported"),
    # wrongly typed values: the old reader took "no" as true, and raised raw errors for others
    ({**_GPT2, "scale_attn_weights": "no"}, r"field scale_attn_weights='no' must be true or false"),
    ({**_GPT2, "tie_word_embeddings": "no"}, r"field tie_word_embeddings='no' must be true or false"),
    ({**_GPT2, "layer_norm_epsilon": "x"}, r"field layer_norm_epsilon='x' must be a number"),
    ({**_LLAMA, "num_attention_heads": 0}, r"field num_attention_heads=0 must be an integer ≥ 1"),
    ({**_LLAMA, "rope_theta": "x"}, r"rope_theta='x' must be a number"),
    ({**_LLAMA, "rope_parameters": [1]}, r"field rope_parameters=\[1\] must be a JSON object"),
    ({**_GPT2, "n_embd": None}, r"field n_embd is null; transformers needs a value"),
])
def test_refusals_need_no_weights(hf, message):
    """config_from_hf alone refuses (the reader, not a shape check, catches them)."""
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf)


# ---- bad files ----------------------------------------------------------------------------------


def _npformer_dir(tmp_path):
    from npformer.models import DecoderLM
    from npformer.presets import tiny_config

    path = tmp_path / "ckpt"
    save_hf(DecoderLM(tiny_config("gpt2")), str(path))
    return path


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "gpt2",', r"config.json is not valid JSON"),
    (b'{"model_type": "gpt\xff2"}', r"config.json is not valid JSON \('utf-8' codec"),
])
def test_malformed_or_non_utf8_config_json_names_the_file(tmp_path, content, message):
    path = _npformer_dir(tmp_path)
    (path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_hf(str(path))
    assert str(path / "config.json") in str(error.value) and "\n" not in str(error.value)


def _sharded(tmp_path):
    """The gpt2 directory split into two shards with an index."""
    path = _npformer_dir(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(path / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: s for s, ms in shards.items() for n in ms}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_sharded_errors_name_the_file(tmp_path):
    path = _sharded(tmp_path)
    assert load_hf(str(path)).config.d_model > 0
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors.index.json lists the shard "
                                         r"model-00002-of-00002.safetensors .* does not exist"):
        load_hf(str(path))
    (path / "model.safetensors.index.json").write_bytes(b'{"weight_map": \xfe}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON"):
        load_hf(str(path))


@pytest.mark.parametrize("value, what", [(np.nan, "1 NaN or infinite value"),
                                         (np.inf, "1 NaN or infinite value"),
                                         (1e300, "1 value\\(s\\) that overflow float32")])
def test_a_non_finite_weight_names_the_tensor_and_the_file(tmp_path, value, what):
    path = _sharded(tmp_path)
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = sorted(tensors)[1]
    tensors[name] = tensors[name].astype(np.float64)
    tensors[name].flat[3] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' in {shard} contains {what}"):
        load_hf(str(path), dtype=np.float32)
    if np.isfinite(value):  # 1e300 is a fine float64 weight
        load_hf(str(path), dtype=np.float64)


# ---- compare cannot pass what it did not reproduce -----------------------------------------------


def test_compare_fails_when_a_gradient_is_missing_on_either_side(tmp_path, monkeypatch):
    path = _saved(tmp_path, "llama")
    _assert_reproduced(path)
    original = compare_module.hf_state_dict

    def dropping(model, grads=False, model_type=None):  # npformer "forgets" one gradient
        tensors = original(model, grads, model_type)
        tensors.pop("model.layers.1.mlp.up_proj.weight")
        return tensors

    monkeypatch.setattr(compare_module, "hf_state_dict", dropping)
    failing = [r.tensor for r in compare_hf_dir(path) if not r.passed]
    assert failing == ["model.layers.1.mlp.up_proj.weight (missing in npformer)"]

    def adding(model, grads=False, model_type=None):  # a gradient transformers has no parameter for
        return {**original(model, grads, model_type), "model.extra.weight": np.zeros(3)}

    monkeypatch.setattr(compare_module, "hf_state_dict", adding)
    failing = [r.tensor for r in compare_hf_dir(path) if not r.passed]
    assert failing == ["model.extra.weight (missing in torch)"]


def test_compare_fails_when_transformers_did_not_load_a_tensor(tmp_path, monkeypatch):
    """A checkpoint tensor transformers ignored (an unexpected key) or a parameter it filled
    at random (a missing key) means the two sides ran different weights."""
    path = _saved(tmp_path, "llama")
    real = transformers.AutoModelForCausalLM.from_pretrained

    def lossy(*args, **kwargs):
        model, info = real(*args, **kwargs)
        info["missing_keys"] = {"model.norm.weight"}
        return model, info

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lossy)
    failing = [r.tensor for r in compare_hf_dir(path) if not r.passed]
    assert failing == ["model.norm.weight (missing_keys when transformers loaded the checkpoint)"]
