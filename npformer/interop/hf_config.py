"""Hugging Face ``config.json`` ↔ :class:`~npformer.config.ModelConfig`, per ``model_type``.

Reading is driven by one declarative table per family (:data:`FAMILIES`): every attribute of
that family's ``transformers`` configuration class (and every key its modeling code reads)
is listed with transformers' own default — what an absent key means — its other spellings
(the class's ``attribute_map`` and the legacy names transformers still converts), and one of
three verdicts:

- ``use``: implemented; the family's ``build`` maps the value onto our switches — the same
  switches the presets use, so a loaded GPT-J is ``block="parallel", parallel_norms=1,
  rope_layout="interleaved"`` just like the ``gpt-j`` preset;
- ``only``: npformer reproduces only the listed values; any other raises a ``ValueError``
  naming the field, the value and what is supported (a per-layer attention scale, q/k norms,
  biased GLU MLPs, quantization, …) instead of loading a model that computes something else;
- ``ignore``: does not change the function ``load_hf`` computes (logits and their gradients
  in evaluation mode), with the reason: a classification head's setting, a cache switch, a
  precision-only switch, a value transformers' modeling never reads.

Dropout rates are training-only: ``load_hf`` returns a model in evaluation mode, where no
dropout runs. The residual rate is still read into ``ModelConfig.dropout`` so that training a
loaded model drops out at the family's rate (npformer has one rate, on embeddings and branch
outputs, and no attention-probability dropout: ``attn_pdrop`` and the like are not reproduced
in training). ``initializer_range`` likewise only sets ``init_std``.

A key that is in no table is one the family's ``transformers`` classes never read, so it
cannot change what they compute (e.g. ``sliding_window`` in a Llama config). ``build``
reads its values through a mapping that fails on undeclared names, so every field the
reader uses is in the table. ``python -c "from npformer.interop.hf_config import
describe; print(describe())"`` prints the tables.

Writing goes the other way; :func:`hf_config_from_config` tries each family and keeps the
first whose reader gives back the same architecture (so a config is only written under a
``model_type`` that really reproduces it).
"""

from __future__ import annotations

import json
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from ..config import ROPE_SCALING_DEFAULTS, ModelConfig

USE, ONLY, IGNORE = "implemented", "refused unless supported", "irrelevant to the function"
_ABSENT = object()  # a Field default: transformers has no default, the key is required


class Field(NamedTuple):
    """One attribute of a family's config.json and what ``load_hf`` does with it."""
    name: str  # transformers' attribute name
    verdict: str  # USE, ONLY or IGNORE
    how: str  # USE: how it is reproduced; ONLY: what else would be needed; IGNORE: why not
    default: object = None  # transformers' class default: what an absent key means
    aliases: Tuple[str, ...] = ()  # other spellings transformers accepts in config.json
    supported: Tuple = ()  # ONLY: the values npformer reproduces
    nullable: bool = False  # null is a meaningful value (else null where a value is due is refused)


def use(name, default, how, aliases=(), nullable=False):
    return Field(name, USE, how, default, tuple(aliases), nullable=nullable)


def only(name, supported, how, default=None):
    """Refused unless the value (or transformers' default, when absent) is in ``supported``."""
    default = supported[0] if default is None else default
    return Field(name, ONLY, how, default, (), tuple(supported))


def ignore(name, why):
    return Field(name, IGNORE, why)


# ---- activations: transformers' ACT2FN names → our FFN kinds ---------------------------------

# Plain MLP act(x W₁) W₂. "gelu"/"gelu_python" are the exact erf GeLU; "gelu_new",
# "gelu_pytorch_tanh", "gelu_python_tanh" and "gelu_accurate" the tanh approximation
# 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))); "gelu_fast" is the same formula with √(2/π)
# rounded to 0.7978845608 (3.6e-12 relative, below float64 parity). Everything else in ACT2FN
# (quick_gelu = x σ(1.702 x), gelu_10 = a clipped GeLU, silu/swish, relu2, relu6, mish,
# tanh, sigmoid, linear, …) has no plain-FFN counterpart here and is refused by name.
PLAIN_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                     "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
                     "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
# Gated MLP down(act(gate x) ⊙ up x) of Llama and Cohere: SiLU ("silu" and "swish" are one
# function in ACT2FN) is SwiGLU; the exact erf GeLU is GeGLU (ours is the erf form); the tanh
# GeLU under any of its five ACT2FN names (gelu_fast's rounded √(2/π) as above) is
# geglu_tanh. Every other ACT2FN name (relu, quick_gelu, …) has no gated counterpart here.
_GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh", "gelu_accurate", "gelu_fast")
GLU_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_python": "geglu",
                   **{name: "geglu_tanh" for name in _GELU_TANH_NAMES}}
# openai-gpt's own ACT_FNS (not ACT2FN): its "gelu" is the tanh form; silu/swish are refused
OPENAI_GPT_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu"}
_FFN_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_GLU_TO_HF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}

# fields that do not change what a model computes in evaluation, so a round trip may differ
_TRAINING_ONLY = ("dropout", "init_std", "scaled_residual_init", "document_mask", "max_seq_len")


def _activation(values: "_Values", field: str, table: Dict[str, str]) -> str:
    name = values[field]
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"config.json field {field}={name!r} is not supported for model_type "
                         f"{values.model_type!r}; supported: {sorted(table)}")
    return table[name]


# ---- the fields every family shares ------------------------------------------------------------

_COMMON = (
    use("model_type", _ABSENT, "selects the family table"),
    use("initializer_range", 0.02, "init_std (initialisation only, training-only)"),
    only("quantization_config", (None,),
         "a quantized checkpoint (bitsandbytes, GPTQ, AWQ, fp8, …): its weights are not plain floats"),
    ignore("dtype", "load_hf casts every weight to the dtype asked for"),
    ignore("torch_dtype", "legacy spelling of dtype"),
    ignore("architectures", "names the head class; AutoModelForCausalLM goes by model_type"),
    ignore("transformers_version", "bookkeeping"),
    ignore("_name_or_path", "bookkeeping"),
    ignore("use_cache", "a key/value cache for generation; the function is the same"),
    ignore("bos_token_id", "generation and tokenizer only"),
    ignore("eos_token_id", "generation and tokenizer only"),
    ignore("output_hidden_states", "extra outputs, same logits"),
    ignore("output_attentions", "extra outputs, same logits"),
    ignore("return_dict", "output container"),
    ignore("id2label", "sequence-classification head"),
    ignore("label2id", "sequence-classification head"),
    ignore("num_labels", "sequence-classification head"),
    ignore("problem_type", "sequence-classification loss"),
    ignore("classifier_dropout", "sequence-classification head"),
    ignore("chunk_size_feed_forward", "not read by these families (chunking computes the same)"),
    ignore("is_encoder_decoder", "AutoModelForCausalLM of these families is decoder-only"),
    ignore("is_decoder", "these families are always causal"),
    only("is_causal", (True,), "masking_utils reads getattr(config, 'is_causal', True) for every "
         "family but openai-gpt: false gives every layer a bidirectional mask"),
    ignore("attn_implementation", "eager/sdpa: the same maths, different rounding"),
    ignore("_attn_implementation", "eager/sdpa: the same maths, different rounding"),
)
_TRAINING_DROPOUT = "training-only (load_hf gives an eval-mode model; see the module docstring)"
_GPT_ALIASES = dict(n_embd=("hidden_size",), n_layer=("num_hidden_layers",),
                    n_head=("num_attention_heads",), n_positions=("max_position_embeddings",))
_SEQUENCE_SUMMARY = tuple(ignore(f"summary_{what}", "the double-heads model's sequence summary")
                          for what in ("type", "use_proj", "activation", "proj_to_labels",
                                       "first_dropout", "last_dropout"))


def _gpt_shape(default_vocab, default_positions, default_width, default_layers, default_heads):
    """vocab_size, n_embd, n_layer, n_head, n_positions of the Conv1D/GPT-J families."""
    return (
        use("vocab_size", default_vocab, "vocab_size"),
        use("n_embd", default_width, "d_model", _GPT_ALIASES["n_embd"]),
        use("n_layer", default_layers, "n_layers", _GPT_ALIASES["n_layer"]),
        use("n_head", default_heads, "n_heads (D = C / H)", _GPT_ALIASES["n_head"]),
        use("n_positions", default_positions, "max_seq_len (the learned position table / "
            "the longest sequence)", _GPT_ALIASES["n_positions"]),
    )


# The RoPE fields of the families whose rotary tables cover the whole head (Llama, Cohere,
# Mistral, Qwen, Gemma), read by _rope
_WHOLE_HEAD_ROPE_FIELDS = (
    use("rope_parameters", None, "rope_theta; rope_type default, linear, dynamic, yarn or "
        "llama3 → the rope_* scaling fields (longrope, proportional refused; see _rope_scaling)"),
    use("rope_scaling", None, "legacy spelling of rope_parameters; wins over it (transformers)"),
    use("original_max_position_embeddings", None, "yarn / llama3: wins over the one in "
        "rope_parameters (transformers); refused if both differ", nullable=True),
    use("rope_theta", None, "legacy top-level theta, used when rope_parameters lacks one"),
    use("partial_rotary_factor", None, "legacy top-level factor; refused unless 1 (the rotary "
        "tables cover the whole head; see _rope)"),
)


def _llama_like_fields(defaults: dict, head_dim_how: str):
    """The fields Llama and Cohere share; ``defaults`` holds each class's own defaults."""
    return (
        use("vocab_size", defaults["vocab_size"], "vocab_size"),
        use("hidden_size", defaults["hidden_size"], "d_model"),
        use("intermediate_size", defaults["intermediate_size"], "d_ff"),
        use("num_hidden_layers", defaults["num_hidden_layers"], "n_layers"),
        use("num_attention_heads", defaults["num_attention_heads"], "n_heads"),
        use("num_key_value_heads", None, "n_kv_heads (null = n_heads)", nullable=True),
        use("head_dim", None, head_dim_how, nullable=True),
        use("hidden_act", "silu", f"the gated MLP's activation: {GLU_ACTIVATIONS}"),
        use("max_position_embeddings", defaults["max_position_embeddings"],
            "max_seq_len (longer sequences are refused); dynamic RoPE: the original length, "
            "max_seq_len = int(factor · it)"),
        use("attention_bias", False, "qkv_bias and out_bias (q, k, v and o projections)"),
        use("pad_token_id", defaults["pad_token_id"], "padding_idx: nn.Embedding(padding_idx=pad) gives "
            "that row no gradient (null or ids outside the vocabulary: none)", nullable=True),
        use("tie_word_embeddings", defaults["tie_word_embeddings"], "tie_embeddings"),
        *_WHOLE_HEAD_ROPE_FIELDS,
        ignore("attention_dropout", _TRAINING_DROPOUT + "; no npformer counterpart"),
    )


# ---- the tables --------------------------------------------------------------------------------


class Family(NamedTuple):
    fields: Tuple[Field, ...]
    build: Callable[["_Values"], dict]  # resolved values → ModelConfig fields


class _Values(dict):
    """Resolved field values of one config.json; reading an undeclared name is a bug."""

    def __init__(self, model_type: str, values: dict) -> None:
        super().__init__(values)
        self.model_type = model_type

    def number(self, name: str) -> float:
        value = self[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config.json field {name}={value!r} must be a number")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self[name]
        if not isinstance(value, bool):
            raise ValueError(f"config.json field {name}={value!r} must be true or false")
        return value

    def count(self, name: str) -> int:
        value = self[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.json field {name}={value!r} must be an integer ≥ 1")
        return value

    def __missing__(self, name):
        raise AssertionError(f"the {self.model_type} reader reads {name!r}, which its table does "
                             "not declare")


def _resolve(hf: dict, model_type: str, fields: Tuple[Field, ...]) -> _Values:
    """Each declared field's value — under its name or an alias, else transformers' default —
    with every ``only`` field checked."""
    values = {}
    for field in fields:
        spellings = [key for key in (field.name,) + field.aliases if key in hf]
        if len({json.dumps(hf[key], sort_keys=True) for key in spellings}) > 1:
            given = ", ".join(f"{key}={hf[key]!r}" for key in spellings)
            raise ValueError(f"config.json gives {field.name} twice with different values ({given}); "
                             "transformers lets one spelling silently win — write one")
        if field.verdict == IGNORE:
            continue
        if not spellings:
            if field.default is _ABSENT:
                raise ValueError(f"config.json of model_type {model_type!r} lacks the field "
                                 f"{field.name!r}")
            value = field.default
        else:
            value = hf[spellings[0]]
            if value is None and field.default is not None and not field.nullable:
                raise ValueError(f"config.json field {spellings[0]} is null; transformers needs a "
                                 f"value there (its default is {field.default!r})")
        if field.verdict == ONLY and value not in field.supported:
            raise ValueError(f"config.json field {spellings[0] if spellings else field.name}="
                             f"{value!r} is not supported ({field.how}); npformer reproduces "
                             f"{field.name}={' or '.join(repr(v) for v in field.supported)}")
        values[field.name] = value
    return _Values(model_type, values)


def _common(v: _Values, **fields) -> dict:
    fields.setdefault("init_std", v.number("initializer_range"))
    return fields


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json {key}={value!r} must be a number")
    return float(value)


# RoPE scaling: the keys transformers 5.24 reads from rope_parameters for each rope_type
# (modeling_rope_utils.ROPE_INIT_FUNCTIONS), besides rope_type / type / rope_theta /
# partial_rotary_factor. Any other key (mscale, mscale_all_dim, short_factor, a typo) is
# refused by name even where transformers only warns: npformer reads every key it accepts.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _rope_scaling(v: _Values, params: dict, where: str) -> dict:
    """The ModelConfig rope_* fields (and max_seq_len) of ``params``, the rope_parameters /
    rope_scaling dict, with transformers' defaults and precedence:

    - the type is ``rope_type``, else the legacy ``type``, else "default" (both given and
      different: refused, transformers silently takes rope_type);
    - yarn / llama3: ``original_max_position_embeddings`` defaults to max_position_embeddings,
      and a top-level ``original_max_position_embeddings`` wins over the one in the dict
      (transformers' Phi-3 exception; given both ways and different: refused as ambiguous);
      yarn's null ``factor`` means max_position_embeddings / original, beta_fast / beta_slow
      null or 0 mean 32 / 1 (transformers' ``or``), ``truncate`` defaults to true;
    - dynamic: transformers scales once a call is longer than max_position_embeddings, which
      it does not refuse. npformer's model refuses sequences longer than max_seq_len, so
      max_seq_len = int(factor · max_position_embeddings) (the length the factor is meant
      for) and rope_original_max_seq_len = max_position_embeddings; the writer inverts it;
    - longrope, proportional and any other type are refused by name, as is any key the type
      does not read.
    """
    given_types = {key: params[key] for key in ("rope_type", "type") if key in params}
    if len(set(map(repr, given_types.values()))) > 1:
        raise ValueError(f"config.json {where} gives rope_type={params['rope_type']!r} and the "
                         f"legacy type={params['type']!r}; transformers silently uses rope_type — "
                         "write one")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"config.json {where} rope_type={rope_type!r} is not supported; "
                         f"supported: {sorted(_ROPE_KEYS)} (longrope, proportional and the "
                         "multimodal / per-layer types are not implemented)")
    unread = sorted(set(params) - set(_ROPE_KEYS[rope_type]) - set(_ROPE_COMMON_KEYS))
    if unread:
        raise ValueError(f"config.json {where} key(s) {unread} are not read by npformer for "
                         f"rope_type={rope_type!r} (it reads {list(_ROPE_KEYS[rope_type])}"
                         + ("; mscale / mscale_all_dim (DeepSeek's yarn attention factor) are "
                            "not implemented" if {"mscale", "mscale_all_dim"} & set(unread) else "")
                         + ")")
    length = v.count("max_position_embeddings")
    fields = dict(rope_type=rope_type, max_seq_len=length)
    if rope_type == "default":
        return fields

    def number(key, default=_ABSENT):
        if key not in params:
            if default is _ABSENT:
                raise ValueError(f"config.json {where} lacks {key!r}, which rope_type="
                                 f"{rope_type!r} requires (transformers raises KeyError)")
            return default
        return _number(f"{where}.{key}", params[key])

    original = None
    if rope_type in ("yarn", "llama3"):
        original = params.get("original_max_position_embeddings", length)
        top = v["original_max_position_embeddings"]
        if top is not None:
            if "original_max_position_embeddings" in params and top != original:
                raise ValueError(
                    f"config.json gives original_max_position_embeddings={top!r} at the top level "
                    f"and {original!r} in {where}; transformers silently uses the top-level one — "
                    "write one")
            original = top
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ValueError(f"config.json {where}.original_max_position_embeddings="
                             f"{original!r} must be an integer ≥ 1")
        fields["rope_original_max_seq_len"] = original
    if rope_type == "yarn" and params.get("factor", _ABSENT) is None:
        factor = length / original  # transformers: max_position_embeddings / original
    else:
        factor = number("factor")
    fields["rope_factor"] = factor
    if rope_type == "dynamic":
        fields.update(rope_original_max_seq_len=length, max_seq_len=int(factor * length))
    elif rope_type == "yarn":
        attention = params.get("attention_factor")
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"config.json {where}.truncate={truncate!r} must be true or false")
        fields.update(
            # transformers: get("beta_fast") or 32, so null and 0 mean the default too
            rope_beta_fast=(None if params.get("beta_fast") is None else number("beta_fast")) or 32.0,
            rope_beta_slow=(None if params.get("beta_slow") is None else number("beta_slow")) or 1.0,
            rope_truncate=truncate,
            rope_attention_factor=None if attention is None
            else _number(f"{where}.attention_factor", attention))
    elif rope_type == "llama3":
        fields.update(rope_low_freq_factor=number("low_freq_factor"),
                      rope_high_freq_factor=number("high_freq_factor"))
    return fields


def _rope(v: _Values, default_theta: float, neox: bool, partial_rotary: bool = False) -> dict:
    """rope_theta, the rotated fraction and the scaling, with transformers 5's precedence:
    ``rope_scaling`` (legacy) over ``rope_parameters``; inside them ``rope_theta`` /
    ``partial_rotary_factor``, else (GPT-NeoX) ``rotary_emb_base`` / ``rotary_pct``, else
    (Llama, Cohere) the top-level ``rope_theta``, else the family default. The scaling types
    as :func:`_rope_scaling`. Returns dict(theta, factor, fields): ``fields`` are the
    ModelConfig rope fields plus max_seq_len (a builder passes ``**rope["fields"]``)."""
    params = v["rope_scaling"] or v["rope_parameters"] or {}
    where = "rope_scaling" if v["rope_scaling"] else "rope_parameters"
    if not isinstance(params, dict):
        raise ValueError(f"config.json field {where}={params!r} must be a JSON object")
    scaling = _rope_scaling(v, params, where)
    if neox:
        theta = _number("rope_theta", params.get(
            "rope_theta", v["rotary_emb_base"] if v["rotary_emb_base"] is not None else default_theta))
        factor = _number("partial_rotary_factor", params.get(
            "partial_rotary_factor", v["rotary_pct"] if v["rotary_pct"] is not None else 0.25))
        # transformers 5's GPTNeoXConfig never reads the top-level spellings (it fills
        # rope_parameters from rotary_emb_base / rotary_pct first): a differing one is ambiguous
        for key, used in (("rope_theta", theta), ("partial_rotary_factor", factor)):
            if v[key] is not None and _number(key, v[key]) != used:
                raise ValueError(f"config.json field {key}={v[key]!r} at the top level is ignored "
                                 f"by transformers' gpt_neox, which uses {key}={used!r} from "
                                 "rope_parameters / rotary_emb_base / rotary_pct (or the default); "
                                 "put the value in rope_parameters")
    else:
        theta = _number("rope_theta", params.get(
            "rope_theta", v["rope_theta"] if v["rope_theta"] is not None else default_theta))
        factor = _number("partial_rotary_factor", params.get(
            "partial_rotary_factor", v["partial_rotary_factor"]
            if v["partial_rotary_factor"] is not None else 1.0))
        if factor != 1.0 and not partial_rotary:  # (Phi-3 reads it: partial_rotary=True)
            # transformers' Llama and Cohere rotary embeddings ignore the field and rotate every
            # channel of the head (only gpt_neox reads it): refuse rather than guess
            raise ValueError(f"config.json partial_rotary_factor={factor!r} is not supported "
                             f"for model_type {v.model_type!r}: transformers rotates the whole "
                             "head there and ignores it (partial rotary exists as gpt_neox or gptj)")
    return dict(theta=theta, factor=factor, fields=dict(scaling, rope_theta=theta))


def _build_openai_gpt(v: _Values) -> dict:
    C = v.count("n_embd")
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=v["n_layer"],
                   n_heads=v["n_head"], max_seq_len=v["n_positions"], d_ff=4 * C,
                   ffn=_activation(v, "afn", OPENAI_GPT_ACTIVATIONS), norm="layernorm",
                   norm_eps=v.number("layer_norm_epsilon"), norm_placement="post",
                   final_norm=False, positions="learned",
                   tie_embeddings=v.flag("tie_word_embeddings"),
                   dropout=v.number("resid_pdrop"))


def _build_gpt2(v: _Values) -> dict:
    C = v.count("n_embd")
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=v["n_layer"],
                   n_heads=v["n_head"], max_seq_len=v["n_positions"],
                   d_ff=v["n_inner"] if v["n_inner"] is not None else 4 * C,
                   ffn=_activation(v, "activation_function", PLAIN_ACTIVATIONS),
                   norm_eps=v.number("layer_norm_epsilon"), positions="learned",
                   attention_scale=None if v.flag("scale_attn_weights") else 1.0,
                   tie_embeddings=v.flag("tie_word_embeddings"),
                   dropout=v.number("resid_pdrop"))


def _build_gpt_neo(v: _Values) -> dict:
    C, L = v.count("hidden_size"), v.count("num_layers")
    layers = v["attention_layers"]
    if layers is None:  # transformers expands attention_types, and a stored list wins over it
        types = v["attention_types"]
        try:
            layers = [kind for kinds, repeat in types for _ in range(repeat) for kind in kinds]
        except (TypeError, ValueError):
            raise ValueError(f"config.json field attention_types={types!r} is not a list of "
                             "[[kinds...], repeat] pairs") from None
    unknown = sorted({repr(kind) for kind in layers} - {"'global'", "'local'"})
    if unknown:
        raise ValueError(f"config.json attention_layers holds {', '.join(unknown)}; supported: "
                         "'global', 'local'")
    pattern = tuple({"global": "dense", "local": "local"}[kind] for kind in layers)
    if len(pattern) != L:
        raise ValueError(f"config.json attention_layers has {len(pattern)} entries for "
                         f"num_layers={L}")
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=L,
                   n_heads=v["num_heads"], max_seq_len=v["max_position_embeddings"],
                   d_ff=v["intermediate_size"] if v["intermediate_size"] is not None else 4 * C,
                   ffn=_activation(v, "activation_function", PLAIN_ACTIVATIONS),
                   norm_eps=v.number("layer_norm_epsilon"), positions="learned",
                   attention_pattern=pattern,
                   window=v["window_size"] if "local" in pattern else None,
                   attention_scale=1.0, qkv_bias=False, out_bias=True,
                   tie_embeddings=v.flag("tie_word_embeddings"),
                   dropout=v.number("resid_dropout"))


def _build_gptj(v: _Values) -> dict:
    C = v.count("n_embd")
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=v["n_layer"],
                   n_heads=v["n_head"], max_seq_len=v["n_positions"],
                   d_ff=v["n_inner"] if v["n_inner"] is not None else 4 * C,
                   ffn=_activation(v, "activation_function", PLAIN_ACTIVATIONS),
                   norm_eps=v.number("layer_norm_epsilon"), block="parallel",
                   parallel_norms=1, positions="rope", rope_layout="interleaved",
                   rotary_dim=v["rotary_dim"], qkv_bias=False, out_bias=False,
                   lm_head_bias=True, tie_embeddings=v.flag("tie_word_embeddings"),
                   dropout=v.number("resid_pdrop"))


def _build_gpt_neox(v: _Values) -> dict:
    C, H = v.count("hidden_size"), v.count("num_attention_heads")
    D = C // H
    if v["head_dim"] is not None and v["head_dim"] != D:
        # GPT-NeoX's attention uses C // H, but its rotary tables getattr(config, "head_dim")
        raise ValueError(f"config.json field head_dim={v['head_dim']!r} is not supported for "
                         f"gpt_neox: its attention heads have hidden_size // num_attention_heads "
                         f"= {D} channels while its rotary tables would use {v['head_dim']}")
    rope = _rope(v, 10000.0, neox=True)
    rotary = int(D * rope["factor"])
    bias = v.flag("attention_bias")
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=v["num_hidden_layers"],
                   n_heads=H, **rope["fields"],
                   d_ff=v["intermediate_size"], ffn=_activation(v, "hidden_act", PLAIN_ACTIVATIONS),
                   norm_eps=v.number("layer_norm_eps"),
                   block="parallel" if v.flag("use_parallel_residual") else "sequential",
                   parallel_norms=2, positions="rope", rope_layout="half",
                   rotary_dim=None if rotary == D else rotary,
                   qkv_bias=bias, out_bias=bias, tie_embeddings=v.flag("tie_word_embeddings"),
                   dropout=v.number("hidden_dropout"))


def _padding_idx(v: _Values) -> Optional[int]:
    """The Llama trap: transformers builds nn.Embedding(padding_idx=pad_token_id), and that row
    then gets no gradient; we reproduce it (null or an id outside the vocabulary: none)."""
    pad = v["pad_token_id"]
    return pad if type(pad) is int and 0 <= pad < v["vocab_size"] else None


def _build_llama_like(v: _Values, default_theta: float, biases: Optional[Tuple[bool, bool]] = None,
                      partial_rotary: bool = False, activation: str = "hidden_act",
                      activations: Dict[str, str] = GLU_ACTIVATIONS) -> dict:
    """``biases``: (q/k/v, o) for the families whose attention hard-codes them (Mistral,
    Qwen2, Phi-3), else both from ``attention_bias``; ``partial_rotary``: the family rotates
    int(D · partial_rotary_factor) channels (Phi-3), else the whole head; ``activation``: the
    field naming the gated MLP's activation, read through the ``activations`` table."""
    C, H = v.count("hidden_size"), v.count("num_attention_heads")
    rope = _rope(v, default_theta, neox=False, partial_rotary=partial_rotary)
    qkv_bias, out_bias = biases if biases is not None else (v.flag("attention_bias"),) * 2
    kv_heads = v["num_key_value_heads"]
    return _common(v, vocab_size=v["vocab_size"], d_model=C, n_layers=v["num_hidden_layers"],
                   n_heads=H, n_kv_heads=H if kv_heads is None else kv_heads,
                   head_dim=C // H if v["head_dim"] is None else v["head_dim"],
                   d_ff=v["intermediate_size"],
                   ffn=_activation(v, activation, activations), ffn_bias=False,
                   positions="rope", **rope["fields"], qkv_bias=qkv_bias, out_bias=out_bias,
                   padding_idx=_padding_idx(v),
                   tie_embeddings=v.flag("tie_word_embeddings"), dropout=0.0)


def _build_llama(v: _Values) -> dict:
    return {**_build_llama_like(v, 10000.0), "norm": "rmsnorm", "norm_bias": False,
            "norm_eps": v.number("rms_norm_eps"), "rope_layout": "half"}


def _build_cohere(v: _Values) -> dict:
    return {**_build_llama_like(v, 500000.0), "norm": "layernorm", "norm_bias": False,
            "norm_eps": v.number("layer_norm_eps"), "block": "parallel", "parallel_norms": 1,
            "rope_layout": "interleaved", "logit_scale": v.number("logit_scale")}


# ---- Mistral, Qwen2, Qwen3, Phi-3 (issue 16) ------------------------------------------------
# Llama's layout (pre-norm RMSNorm, SwiGLU, half-split RoPE, no MLP biases) with: Mistral a
# sliding window on every layer; Qwen2 q/k/v biases without an o bias and per-layer
# windows; Qwen3 per-head q/k RMSNorms; Phi-3 fused q/k/v and gate/up matrices (a weight
# layout only, hf_weights.py) and a partial rotary factor. transformers' sliding window keeps
# keys i − w < j ≤ i (masking_utils.sliding_window_overlay: kv_idx > q_idx − w), our window.


def _check_kv_heads(v: _Values) -> None:
    """transformers repeats each key/value head H // K times: K must divide H."""
    H, K = v.count("num_attention_heads"), v["num_key_value_heads"]
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < 1 or H % K):
        raise ValueError(f"config.json field num_key_value_heads={K!r} must be an integer ≥ 1 "
                         f"dividing num_attention_heads={H} (each key/value head serves H / K "
                         "query heads)")


def _window(v: _Values, field: str = "sliding_window") -> int:
    window = v[field]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"config.json field {field}={window!r} must be an integer ≥ 1 (the keys "
                         "each query sees) or null (dense attention)")
    return window


def _rmsnorm_llama(v: _Values, built: dict) -> dict:
    """The Llama-shaped model of ``built`` with the RMSNorms of these families."""
    return {**built, "norm": "rmsnorm", "norm_bias": False, "norm_eps": v.number("rms_norm_eps"),
            "rope_layout": "half"}


def _every_layer_local(v: _Values) -> dict:
    """Mistral, Phi-3: ``sliding_window`` null = dense, else every layer keeps its last w keys
    (the model builds one sliding-window mask for all layers)."""
    if v["sliding_window"] is None:
        return dict(attention_pattern=("dense",), window=None)
    return dict(attention_pattern=("local",), window=_window(v))


_QWEN_LAYER_TYPES = {"full_attention": "dense", "attention": "dense",  # legacy spelling, remapped
                     "sliding_attention": "local"}


def _qwen_layers(v: _Values) -> dict:
    """Qwen2 / Qwen3: transformers keeps ``sliding_window`` only if ``use_sliding_window``; an
    absent ``layer_types`` becomes sliding for layers ≥ ``max_window_layers`` (when a window is
    kept), else full; a given list wins. Each layer's mask follows its type."""
    L = v.count("num_hidden_layers")
    window = v["sliding_window"] if v.flag("use_sliding_window") else None
    types = v["layer_types"]
    if types is None:
        first = v["max_window_layers"]
        if isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(f"config.json field max_window_layers={first!r} must be an integer")
        types = ["sliding_attention" if window is not None and layer >= first else "full_attention"
                 for layer in range(L)]
    if not isinstance(types, list) or len(types) != L:
        raise ValueError(f"config.json field layer_types={types!r} must list one type per layer "
                         f"(num_hidden_layers={L})")
    unknown = sorted({repr(kind) for kind in types if kind not in _QWEN_LAYER_TYPES})
    if unknown:
        raise ValueError(f"config.json field layer_types holds {', '.join(unknown)}; supported: "
                         f"{sorted(_QWEN_LAYER_TYPES)}")
    pattern = tuple(_QWEN_LAYER_TYPES[kind] for kind in types)
    if "local" not in pattern:
        return dict(attention_pattern=pattern, window=None)
    if window is None:  # transformers would build a sliding mask without a window and fail
        raise ValueError(f"config.json field layer_types has 'sliding_attention' layers but "
                         f"sliding_window={v['sliding_window']!r} with use_sliding_window="
                         f"{v['use_sliding_window']!r} gives them no window; set "
                         "use_sliding_window true and sliding_window to an integer")
    return dict(attention_pattern=pattern, window=_window(v))


def _build_mistral(v: _Values) -> dict:
    _check_kv_heads(v)
    return {**_rmsnorm_llama(v, _build_llama_like(v, 10000.0, biases=(False, False))),
            **_every_layer_local(v)}


def _build_qwen2(v: _Values) -> dict:
    _check_kv_heads(v)
    return {**_rmsnorm_llama(v, _build_llama_like(v, 10000.0, biases=(True, False))),
            **_qwen_layers(v)}


def _build_qwen3(v: _Values) -> dict:
    """Qwen2's layers and windows; biases on all four projections from attention_bias; an
    RMSNorm over each head's D channels of q and of k (eps rms_norm_eps) before RoPE."""
    _check_kv_heads(v)
    return {**_rmsnorm_llama(v, _build_llama_like(v, 10000.0)), **_qwen_layers(v),
            "qk_norm": True}


_PHI3_LONGROPE = ("longrope", "su", "yarn")  # Phi3Config renames "su" and "yarn" to longrope


def _build_phi3(v: _Values) -> dict:
    _check_kv_heads(v)
    params = v["rope_scaling"] or v["rope_parameters"] or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else None
    if rope_type in _PHI3_LONGROPE:
        raise ValueError(f"config.json rope_type={rope_type!r} is Phi-3's LongRoPE (Phi3Config "
                         "reads 'su' and 'yarn' as 'longrope': per-channel short/long factors), "
                         "which npformer does not implement; only the default RoPE for phi3")
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json rope_type={rope_type!r} is not accepted for phi3 "
                         "(transformers' Phi3Config allows 'default' and 'longrope' only)")
    built = _rmsnorm_llama(v, _build_llama_like(v, 10000.0, biases=(False, False),
                                                 partial_rotary=True))
    D, factor = built["head_dim"], _rope(v, 10000.0, neox=False, partial_rotary=True)["factor"]
    rotary = int(D * factor)  # Phi3RotaryEmbedding: dim = int(head_dim · partial_rotary_factor)
    if not 2 <= rotary <= D or rotary % 2:
        raise ValueError(f"config.json partial_rotary_factor={factor!r} gives int({D} · {factor}) "
                         f"= {rotary} rotary channels; RoPE needs an even number in [2, head_dim={D}]")
    return {**built, **_every_layer_local(v), "rotary_dim": None if rotary == D else rotary,
            "dropout": v.number("resid_pdrop")}


def _mistral_like_fields(defaults: dict, bias_how: str, head_dim_how: str, kv_default,
                         *overrides: Field):
    """Llama's fields with these families' defaults; ``attention_bias`` is not read (their
    biases are fixed in the modeling code); ``overrides`` replace fields of the same name."""
    own = (
        use("num_key_value_heads", kv_default, "n_kv_heads (null = n_heads); must divide "
            "num_attention_heads", nullable=True),
        use("head_dim", None, head_dim_how, nullable=True),
        ignore("attention_bias", bias_how),
        use("rms_norm_eps", defaults["rms_norm_eps"], "norm_eps of the RMSNorms"),
    )
    overridden = {f.name for f in overrides}
    own = tuple(f for f in own if f.name not in overridden) + overrides
    replaced = {f.name for f in own}
    return tuple(f for f in _llama_like_fields(defaults, head_dim_how) if f.name not in replaced) + own


_QWEN_WINDOW_FIELDS = (
    use("use_sliding_window", False, "false: sliding_window is dropped (Qwen2Config.__post_init__)"),
    use("sliding_window", 4096, "window of the sliding_attention layers (keys i − w < j ≤ i)",
        nullable=True),
    use("max_window_layers", 28, "absent layer_types: layers ≥ this are sliding (if a window is kept)"),
    use("layer_types", None, "attention_pattern per layer: full_attention (or legacy 'attention') "
        "→ dense, sliding_attention → local; other types are refused", nullable=True),
)


# ---- Gemma and Gemma 2 (issue 16) ----------------------------------------------------------------
#
# Both are Llama with: a GLU MLP (gate/up/down, no biases) whose activation is the tanh GeLU by
# default; RMSNorms that scale by (1 + w) (norm_unit_offset; the stored w starts at 0); the
# token embeddings multiplied by √C in the model's dtype (scale_embeddings; transformers'
# embed_scale buffer, sqrt(hidden_size) rounded to the dtype); a tied head; head_dim free of
# C / H (256 in the released models); nn.Embedding(padding_idx=pad_token_id) as in Llama.
# Gemma 2 adds sandwich norms (each branch's output normalised before the residual add),
# soft-capped attention scores and logits, alternating sliding-window and global layers
# (layer_types; transformers' default puts the window on layers 0, 2, 4, …; its mask is
# i − w < j ≤ i, masking_utils.sliding_window_overlay) and the attention scale
# query_pre_attn_scalar^(−1/2) instead of 1/√D.

# GemmaConfig.__post_init__ rewrites hidden_act "gelu" to "gelu_pytorch_tanh" (the released
# Gemma configs say "gelu" and mean the tanh form), so for Gemma "gelu" is the tanh GeGLU;
# the exact erf GeLU is spelled "gelu_python" there.
GEMMA_ACTIVATIONS = {**GLU_ACTIVATIONS, "gelu": "geglu_tanh"}
# Gemma2Config rewrites nothing: its hidden_activation "gelu" is ACT2FN's exact erf GeLU.
GEMMA2_ACTIVATIONS = GLU_ACTIVATIONS
_GEMMA_GLU_TO_HF = {"geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu_python", "swiglu": "silu"}
# Gemma2Model picks each layer's mask by name ({"full_attention", "sliding_attention"}: any
# other type is a KeyError there); "attention" is the legacy spelling transformers remaps to
# "full_attention" when it reads the config.
_GEMMA2_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "dense", "attention": "dense"}


def _gemma_fields(defaults: dict, activation: str, activations: Dict[str, str]):
    """The fields GemmaConfig and Gemma2Config share; ``defaults`` holds each class's own."""
    return (
        use("vocab_size", defaults["vocab_size"], "vocab_size"),
        use("hidden_size", defaults["hidden_size"], "d_model (embeddings scaled by √hidden_size)"),
        use("intermediate_size", defaults["intermediate_size"], "d_ff"),
        use("num_hidden_layers", defaults["num_hidden_layers"], "n_layers"),
        use("num_attention_heads", defaults["num_attention_heads"], "n_heads"),
        use("num_key_value_heads", defaults["num_key_value_heads"], "n_kv_heads (must divide "
            "num_attention_heads; null is refused: transformers divides by it)"),
        use("head_dim", defaults["head_dim"], "head_dim (any size, H·D ≠ C allowed; null is "
            "refused: the attention reshapes to it)"),
        use(activation, "gelu_pytorch_tanh", f"the gated MLP's activation: {activations}"),
        use("max_position_embeddings", defaults["max_position_embeddings"],
            "max_seq_len (longer sequences are refused)"),
        use("rms_norm_eps", 1e-6, "norm_eps of the (1 + w) RMSNorms"),
        use("attention_bias", False, "qkv_bias and out_bias (q, k, v and o projections)"),
        use("pad_token_id", 0, "padding_idx: nn.Embedding(padding_idx=pad) gives that row no "
            "gradient (null or ids outside the vocabulary: none)", nullable=True),
        use("tie_word_embeddings", True, "tie_embeddings"),
        *_WHOLE_HEAD_ROPE_FIELDS,
        only("use_bidirectional_attention", (None, False), "non-causal attention (the "
             "embedding-model variant)"),
        ignore("attention_dropout", _TRAINING_DROPOUT + "; no npformer counterpart"),
    )


def _build_gemma_like(v: _Values, activation: str, activations: Dict[str, str]) -> dict:
    """Llama's model with Gemma's (1 + w) RMSNorms and √C embedding scale."""
    v.count("num_key_value_heads"), v.count("head_dim")  # numbers ≥ 1: null is refused above
    _check_kv_heads(v)
    return {**_rmsnorm_llama(v, _build_llama_like(v, 10000.0, activation=activation,
                                                  activations=activations)),
            "norm_unit_offset": True, "scale_embeddings": True}


def _build_gemma(v: _Values) -> dict:
    return _build_gemma_like(v, "hidden_act", GEMMA_ACTIVATIONS)


def _softcap(v: _Values, name: str) -> Optional[float]:
    """A soft-cap field: null = off, else a number > 0 (transformers divides by it)."""
    if v[name] is None:
        return None
    cap = v.number(name)
    if not cap > 0:
        raise ValueError(f"config.json field {name}={v[name]!r} must be > 0 (or null for no cap)")
    return cap


def _build_gemma2(v: _Values) -> dict:
    fields = _build_gemma_like(v, "hidden_activation", GEMMA2_ACTIVATIONS)
    C, H, L = fields["d_model"], fields["n_heads"], fields["n_layers"]
    if C % H:  # Gemma2Config.validate_architecture refuses it, whatever head_dim says
        raise ValueError(f"config.json field hidden_size={C} must be a multiple of "
                         f"num_attention_heads={H} (transformers' Gemma2Config refuses it)")
    types = v["layer_types"]
    if types is None:  # Gemma2Config.__post_init__: sliding on even layers, full on odd
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if not isinstance(types, list) or any(not isinstance(t, str) or t not in _GEMMA2_LAYER_TYPES
                                          for t in types):
        raise ValueError(f"config.json field layer_types={types!r} must list "
                         f"{sorted(_GEMMA2_LAYER_TYPES)} per layer")
    if len(types) != L:
        raise ValueError(f"config.json field layer_types has {len(types)} entries for "
                         f"num_hidden_layers={L}")
    scalar = v["query_pre_attn_scalar"]
    if isinstance(scalar, bool) or not isinstance(scalar, int) or scalar < 1:
        raise ValueError(f"config.json field query_pre_attn_scalar={scalar!r} must be an integer "
                         "≥ 1 (transformers' Gemma2Config types it int)")
    pattern = tuple(_GEMMA2_LAYER_TYPES[t] for t in types)
    # create_sliding_window_causal_mask runs (and needs the value) even without a sliding layer
    window = v.count("sliding_window")
    return {**fields, "sandwich_norm": True, "attention_pattern": pattern,
            "window": window if "local" in pattern else None,
            "attention_scale": scalar ** -0.5,  # Gemma2Attention.scaling, a Python float
            "attention_softcap": _softcap(v, "attn_logit_softcapping"),
            "final_logit_softcap": _softcap(v, "final_logit_softcapping")}


_GEMMA_FIELDS = _COMMON + _gemma_fields(dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192),
    "hidden_act", GEMMA_ACTIVATIONS) + (
    ignore("hidden_activation", "transformers 5's GemmaMLP reads hidden_act only (4.x preferred "
           "hidden_activation when set)"),
)
_GEMMA2_FIELDS = _COMMON + _gemma_fields(dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192),
    "hidden_activation", GEMMA2_ACTIVATIONS) + (
    ignore("hidden_act", "Gemma2MLP reads hidden_activation only"),
    use("query_pre_attn_scalar", 256, "attention_scale = query_pre_attn_scalar^(−1/2) (an int)"),
    use("layer_types", None, "attention_pattern: sliding_attention → local, full_attention (or "
        "legacy attention) → dense; null = sliding on even layers, full on odd",
        nullable=True),
    use("sliding_window", 4096, "window of the local layers: keys i − w < j ≤ i (null is "
        "refused: transformers builds the sliding mask even without sliding layers)"),
    use("attn_logit_softcapping", 50.0, "attention_softcap: cap · tanh(scores / cap) after the "
        "scale, before the mask (null = off)", nullable=True),
    use("final_logit_softcapping", 30.0, "final_logit_softcap: cap · tanh(logits / cap) "
        "(null = off)", nullable=True),
)


FAMILIES: Dict[str, Family] = {
    # OpenAIGPTConfig / modeling_openai.py
    "openai-gpt": Family(_COMMON + _SEQUENCE_SUMMARY + _gpt_shape(40478, 512, 768, 12, 12) + (
        use("afn", "gelu", f"ffn via openai-gpt's own ACT_FNS: {OPENAI_GPT_ACTIVATIONS}"),
        use("layer_norm_epsilon", 1e-5, "norm_eps"),
        use("tie_word_embeddings", True, "tie_embeddings (False: a separate lm_head.weight)"),
        use("resid_pdrop", 0.1, "dropout; " + _TRAINING_DROPOUT),
        ignore("embd_pdrop", _TRAINING_DROPOUT),
        ignore("attn_pdrop", _TRAINING_DROPOUT + "; no npformer counterpart"),
        ignore("pad_token_id", "sequence-classification head only (no padding_idx)"),
    ), _build_openai_gpt),
    # GPT2Config / modeling_gpt2.py
    "gpt2": Family(_COMMON + _SEQUENCE_SUMMARY + _gpt_shape(50257, 1024, 768, 12, 12) + (
        use("n_inner", None, "d_ff (null = 4 · n_embd)"),
        use("activation_function", "gelu_new", f"ffn: {PLAIN_ACTIVATIONS}"),
        use("layer_norm_epsilon", 1e-5, "norm_eps"),
        use("scale_attn_weights", True, "attention_scale: 1/√D, or 1.0 when false"),
        only("scale_attn_by_inverse_layer_idx", (False,), "a per-layer attention scale"),
        ignore("reorder_and_upcast_attn", "the same maths with the scores in float32 (precision only)"),
        only("add_cross_attention", (False,), "decoder-only models: cross-attention weights"),
        use("tie_word_embeddings", True, "tie_embeddings"),
        use("resid_pdrop", 0.1, "dropout; " + _TRAINING_DROPOUT),
        ignore("embd_pdrop", _TRAINING_DROPOUT),
        ignore("attn_pdrop", _TRAINING_DROPOUT + "; no npformer counterpart"),
        ignore("hidden_dropout", "token-classification head only"),
        ignore("pad_token_id", "sequence-classification head only (no padding_idx)"),
    ), _build_gpt2),
    # GPTNeoConfig / modeling_gpt_neo.py
    "gpt_neo": Family(_COMMON + (
        use("vocab_size", 50257, "vocab_size"),
        use("hidden_size", 2048, "d_model"),
        use("num_layers", 24, "n_layers", ("num_hidden_layers",)),
        use("num_heads", 16, "n_heads", ("num_attention_heads",)),
        use("max_position_embeddings", 2048, "max_seq_len (the learned position table)"),
        use("intermediate_size", None, "d_ff (null = 4 · hidden_size)"),
        use("attention_types", [[["global", "local"], 12]], "attention_pattern, expanded"),
        use("attention_layers", None, "attention_pattern: global → dense, local → local "
            "(transformers' stored list wins over attention_types)"),
        use("window_size", 256, "window of the local layers: keys i − w < j ≤ i"),
        use("activation_function", "gelu_new", f"ffn: {PLAIN_ACTIVATIONS}"),
        use("layer_norm_epsilon", 1e-5, "norm_eps"),
        use("tie_word_embeddings", True, "tie_embeddings"),
        use("resid_dropout", 0.0, "dropout; " + _TRAINING_DROPOUT),
        ignore("embed_dropout", _TRAINING_DROPOUT),
        ignore("attention_dropout", _TRAINING_DROPOUT + "; no npformer counterpart"),
        ignore("pad_token_id", "sequence-classification head only (no padding_idx)"),
    ), _build_gpt_neo),
    # GPTJConfig / modeling_gptj.py (the rotary base is fixed at 10000: no rope_theta is read)
    "gptj": Family(_COMMON + _gpt_shape(50400, 2048, 4096, 28, 16) + (
        use("rotary_dim", 64, "rotary_dim: interleaved RoPE on the first rotary_dim channels "
            "of each head (null is refused: transformers 5 rejects it)"),
        use("n_inner", None, "d_ff (null = 4 · n_embd)"),
        use("activation_function", "gelu_new", f"ffn: {PLAIN_ACTIVATIONS}"),
        use("layer_norm_epsilon", 1e-5, "norm_eps"),
        use("tie_word_embeddings", False, "tie_embeddings (the head keeps its bias)"),
        use("resid_pdrop", 0.0, "dropout; " + _TRAINING_DROPOUT),
        ignore("embd_pdrop", _TRAINING_DROPOUT),
        ignore("attn_pdrop", _TRAINING_DROPOUT + "; no npformer counterpart"),
        ignore("pad_token_id", "no padding_idx in GPT-J's embedding"),
        ignore("rope_theta", "GPT-J's modeling never reads it (base fixed at 10000)"),
        ignore("rope_scaling", "GPT-J's modeling never reads it"),
    ), _build_gptj),
    # GPTNeoXConfig / modeling_gpt_neox.py
    "gpt_neox": Family(_COMMON + (
        use("vocab_size", 50432, "vocab_size"),
        use("hidden_size", 6144, "d_model"),
        use("num_hidden_layers", 44, "n_layers"),
        use("num_attention_heads", 64, "n_heads"),
        use("intermediate_size", 24576, "d_ff"),
        use("hidden_act", "gelu", f"ffn: {PLAIN_ACTIVATIONS}"),
        use("max_position_embeddings", 2048, "max_seq_len (longer sequences are refused); "
            "dynamic RoPE: the original length, max_seq_len = int(factor · it)"),
        use("layer_norm_eps", 1e-5, "norm_eps"),
        use("use_parallel_residual", True, "block: parallel (two norms) or sequential"),
        use("attention_bias", True, "qkv_bias and out_bias (query_key_value and dense)"),
        use("head_dim", None, "refused unless hidden_size // num_attention_heads"),
        use("rope_parameters", None, "rope_theta, partial_rotary_factor → rotary_dim = "
            "int(D · factor); rope_type default, linear, dynamic, yarn or llama3 → the rope_* "
            "scaling fields (longrope, proportional refused; see _rope_scaling)"),
        use("original_max_position_embeddings", None, "yarn / llama3: wins over the one in "
            "rope_parameters (transformers); refused if both differ", nullable=True),
        use("rope_scaling", None, "legacy spelling of rope_parameters; wins over it"),
        use("rotary_emb_base", None, "legacy theta (default 10000)"),
        use("rotary_pct", None, "legacy factor (default 0.25)"),
        use("rope_theta", None, "ignored by transformers' gpt_neox: refused if it differs"),
        use("partial_rotary_factor", None, "ignored by transformers' gpt_neox: refused if it differs"),
        use("tie_word_embeddings", False, "tie_embeddings"),
        use("hidden_dropout", 0.0, "dropout; " + _TRAINING_DROPOUT),
        ignore("attention_dropout", _TRAINING_DROPOUT + "; no npformer counterpart"),
        ignore("pad_token_id", "sequence-classification head only (no padding_idx)"),
    ), _build_gpt_neox),
    # LlamaConfig / modeling_llama.py
    "llama": Family(_COMMON + _llama_like_fields(dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, pad_token_id=None,
        tie_word_embeddings=False), "head_dim (null = C // H)") + (
        use("rms_norm_eps", 1e-6, "norm_eps of the RMSNorms"),
        only("mlp_bias", (False,), "the GLU MLP here has no biases"),
        ignore("pretraining_tp", "transformers 5 never reads it (4.x split the matmuls into "
               "slices and summed them: the same function)"),
    ), _build_llama),
    # CohereConfig / modeling_cohere.py (head_dim is not a CohereConfig field, but its
    # attention reads getattr(config, "head_dim", C // H))
    "cohere": Family(_COMMON + _llama_like_fields(dict(
        vocab_size=256000, hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
        num_attention_heads=64, max_position_embeddings=8192, pad_token_id=0,
        tie_word_embeddings=True), "head_dim (absent = C // H)") + (
        use("logit_scale", 0.0625, "logit_scale (logits multiplied by it)"),
        use("layer_norm_eps", 1e-5, "norm_eps of the bias-free LayerNorms"),
        only("use_qk_norm", (False,), "per-head q/k LayerNorms"),
    ), _build_cohere),
    # ---- Mistral, Qwen2, Phi-3 (issue 16) ----
    # MistralConfig / modeling_mistral.py: Llama with one sliding window on every layer
    "mistral": Family(_COMMON + _mistral_like_fields(dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096 * 32, pad_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-6),
        "MistralAttention has no biases whatever it says (never read)",
        "head_dim (null = C // H)", 8) + (
        use("sliding_window", 4096, "null: dense; else attention_pattern ('local',) on every "
            "layer with this window (keys i − w < j ≤ i)", nullable=True),
        ignore("layer_types", "MistralModel never reads it (it warns; Ministral does)"),
    ), _build_mistral),
    # Qwen2Config / modeling_qwen2.py: q/k/v biased, o not; head_dim is no Qwen2Config field,
    # but its attention reads getattr(config, "head_dim", C // H)
    "qwen2": Family(_COMMON + _mistral_like_fields(dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=32768, pad_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-6),
        "Qwen2Attention has q/k/v biases and no o bias whatever it says (never read)",
        "head_dim (absent = C // H)", 32) + _QWEN_WINDOW_FIELDS, _build_qwen2),
    # Qwen3Config / modeling_qwen3.py: Qwen2's windows, attention_bias on all four
    # projections, per-head q/k RMSNorms (qk_norm), head_dim 128 unless given
    "qwen3": Family(_COMMON + _mistral_like_fields(dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=32768, pad_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-6),
        "(replaced below)", "(replaced below)", 32,
        use("head_dim", 128, "head_dim (default 128, not C // H; null is refused: "
            "Qwen3Attention needs a number)"),
        use("attention_bias", False, "qkv_bias and out_bias (q, k, v and o projections)")) +
        _QWEN_WINDOW_FIELDS, _build_qwen3),
    # Phi3Config / modeling_phi3.py: fused qkv_proj and gate_up_proj (hf_weights.py), partial
    # rotary (half-split on the first int(D · factor) channels), one window on every layer
    "phi3": Family(_COMMON + _mistral_like_fields(dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096, pad_token_id=32000,
        tie_word_embeddings=False, rms_norm_eps=1e-5),
        "Phi3Attention has no biases whatever it says (never read)",
        "head_dim (absent = C // H)", None,
        use("partial_rotary_factor", None, "legacy top-level factor, used when rope_parameters "
            "lacks one (Phi3Config: kwargs.get)"),
        use("rope_parameters", None, "rope_type 'default' only (LongRoPE — 'longrope', 'su', "
            "'yarn' — is refused); rope_theta; partial_rotary_factor → rotary_dim = int(D · factor)"),
        ignore("original_max_position_embeddings", "read only by LongRoPE (refused) and by "
               "generation, which drops the key/value cache once at that length and recomputes "
               "the same values (the default RoPE does not depend on it)")) + (
        use("sliding_window", None, "null: dense; else attention_pattern ('local',) on every "
            "layer with this window (keys i − w < j ≤ i)", nullable=True),
        use("resid_pdrop", 0.0, "dropout; " + _TRAINING_DROPOUT),
        ignore("embd_pdrop", "Phi3Model never reads it"),
    ), _build_phi3),
    # GemmaConfig / modeling_gemma.py and Gemma2Config / modeling_gemma2.py (issue 16)
    "gemma": Family(_GEMMA_FIELDS, _build_gemma),
    "gemma2": Family(_GEMMA2_FIELDS, _build_gemma2),
}
READERS = {model_type: family.build for model_type, family in FAMILIES.items()}


def config_from_hf(hf: dict, dtype: str = "float64") -> ModelConfig:
    """The :class:`ModelConfig` that reproduces a Hugging Face ``config.json`` (a dict)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    return ModelConfig(**family.build(_resolve(hf, model_type, family.fields)), dtype=dtype)


def describe() -> str:
    """The tables as text: one line per field, its verdict, default and how/why."""
    lines = []
    for model_type, family in FAMILIES.items():
        counts = {verdict: sum(f.verdict == verdict for f in family.fields)
                  for verdict in (USE, ONLY, IGNORE)}
        lines.append(f"{model_type}: {len(family.fields)} fields, "
                     + ", ".join(f"{n} {verdict}" for verdict, n in counts.items()))
        for f in family.fields:
            spelled = f.name + (f" (alias {', '.join(f.aliases)})" if f.aliases else "")
            default = "" if f.verdict == IGNORE or f.default is _ABSENT else f" [default {f.default!r}]"
            lines.append(f"  {spelled}: {f.verdict}{default} — {f.how}")
    return "\n".join(lines)


# ---- writers: ModelConfig → config.json -----------------------------------------------------


def _rotary_factor(config: ModelConfig) -> float:
    """partial_rotary_factor such that transformers' ``int(head_dim · factor)`` is our rotary
    dim (r / D itself can round down, e.g. int(44 · (30/44)) = 29)."""
    rotary, head = config.rotary_dim or config.head_size, config.head_size
    factor = rotary / head
    return factor if int(head * factor) == rotary else (rotary + 0.5) / head


def _rope_parameters(config: ModelConfig) -> dict:
    """transformers' rope_parameters of the config's RoPE (the inverse of _rope_scaling)."""
    params = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type != "default":
        params["factor"] = config.rope_factor
    if config.rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = config.rope_original_max_seq_len
    if config.rope_type == "yarn":
        params.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow,
                      truncate=config.rope_truncate)
        if config.rope_attention_factor is not None:
            params["attention_factor"] = config.rope_attention_factor
    if config.rope_type == "llama3":
        params.update(low_freq_factor=config.rope_low_freq_factor,
                      high_freq_factor=config.rope_high_freq_factor)
    return params


def _max_position_embeddings(config: ModelConfig) -> int:
    """max_position_embeddings: max_seq_len, except for dynamic RoPE, where transformers
    reads it as the length below which nothing is scaled (rope_original_max_seq_len)."""
    if config.positions == "rope" and config.rope_type == "dynamic":
        return config.rope_original_max_seq_len
    return config.max_seq_len


def _write(config: ModelConfig, model_type: str) -> dict:
    C, L, H, V, P = config.d_model, config.n_layers, config.n_heads, config.vocab_size, config.max_seq_len
    act = _FFN_TO_HF.get(config.ffn)
    base = dict(model_type=model_type, vocab_size=V, initializer_range=config.init_std,
                tie_word_embeddings=config.tie_embeddings)
    if model_type == "openai-gpt":
        return {**base, "n_embd": C, "n_layer": L, "n_head": H, "n_positions": P,
                "afn": {"gelu_tanh": "gelu", "relu": "relu"}.get(config.ffn, config.ffn),
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout,
                "embd_pdrop": config.dropout, "attn_pdrop": 0.0}
    if model_type == "gpt2":
        return {**base, "n_embd": C, "n_layer": L, "n_head": H, "n_positions": P,
                "n_inner": config.ffn_width, "activation_function": act,
                "layer_norm_epsilon": config.norm_eps,
                "scale_attn_weights": config.attention_scale is None, "resid_pdrop": config.dropout,
                "embd_pdrop": config.dropout, "attn_pdrop": 0.0}
    if model_type == "gpt_neo":
        layers = ["global" if config.layer_window(l) is None else "local" for l in range(L)]
        return {**base, "hidden_size": C, "num_layers": L, "num_heads": H,
                "max_position_embeddings": P, "intermediate_size": config.ffn_width,
                "activation_function": act, "layer_norm_epsilon": config.norm_eps,
                "attention_types": [[[kind], 1] for kind in layers],
                "window_size": config.window or 256, "resid_dropout": config.dropout,
                "embed_dropout": config.dropout, "attention_dropout": 0.0}
    if model_type == "gptj":
        return {**base, "n_embd": C, "n_layer": L, "n_head": H, "n_positions": P,
                "n_inner": config.ffn_width, "activation_function": act,
                # GPT-J's rotary_dim: null would mean "all of n_embd", not the head
                "rotary_dim": config.rotary_dim or config.head_size,
                "layer_norm_epsilon": config.norm_eps,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0}
    if model_type == "gpt_neox":
        return {**base, "hidden_size": C, "num_hidden_layers": L, "num_attention_heads": H,
                "max_position_embeddings": _max_position_embeddings(config), "intermediate_size": config.ffn_width,
                "hidden_act": act, "layer_norm_eps": config.norm_eps,
                "use_parallel_residual": config.block == "parallel",
                "rope_parameters": {**_rope_parameters(config),
                                    "partial_rotary_factor": _rotary_factor(config)},
                "attention_bias": config.qkv_bias, "hidden_dropout": config.dropout,
                "attention_dropout": 0.0}
    if config.rotary_dim not in (None, config.head_size) and model_type != "phi3":
        raise ValueError(f"rotary_dim={config.rotary_dim} < head_dim={config.head_size} cannot be "
                         f"saved as model_type {model_type!r}: transformers rotates the whole head "
                         "there (partial rotary exists as gpt_neox or gptj)")
    llama_like = {**base, "hidden_size": C, "num_hidden_layers": L, "num_attention_heads": H,
                  "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
                  "max_position_embeddings": _max_position_embeddings(config),
                  "intermediate_size": config.ffn_width, "hidden_act": _GLU_TO_HF.get(config.ffn, "silu"),  # else: "cannot express ffn"
                  "attention_bias": config.qkv_bias, "mlp_bias": False,
                  "rope_parameters": _rope_parameters(config), "pad_token_id": config.padding_idx,
                  "attention_dropout": 0.0}
    if model_type == "llama":
        return {**llama_like, "rms_norm_eps": config.norm_eps}
    if model_type == "cohere":
        return {**llama_like, "layer_norm_eps": config.norm_eps, "logit_scale": config.logit_scale,
                "use_qk_norm": False}
    if model_type in ("mistral", "qwen2", "qwen3", "phi3"):
        return _write_mistral_qwen_phi(config, model_type, llama_like)
    if model_type in ("gemma", "gemma2"):
        return _write_gemma(config, model_type, base)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(READERS)}")


def _write_mistral_qwen_phi(config: ModelConfig, model_type: str, llama_like: dict) -> dict:
    """Mistral, Qwen2, Phi-3 (and Qwen3): what these families add to Llama's keys. Their
    biases are fixed by the modeling code (hf_config_from_config refuses a config that does
    not have them, by reading the written dict back)."""
    hf = {key: value for key, value in llama_like.items() if key not in ("attention_bias", "mlp_bias")}
    if model_type == "qwen3":  # biases on q, k, v and o alike
        hf["attention_bias"] = config.qkv_bias
    hf["rms_norm_eps"] = config.norm_eps
    windows = [config.layer_window(layer) for layer in range(config.n_layers)]
    if model_type in ("mistral", "phi3"):  # one window for every layer, or none
        hf["sliding_window"] = windows[0]
    if model_type == "phi3":
        hf["rope_parameters"] = {**_rope_parameters(config),
                                 "partial_rotary_factor": _rotary_factor(config)}
        hf.update(resid_pdrop=config.dropout, embd_pdrop=0.0,
                  original_max_position_embeddings=config.max_seq_len)
    if model_type in ("qwen2", "qwen3"):
        local = [window is not None for window in windows]
        hf.update(use_sliding_window=any(local), sliding_window=config.window if any(local) else None,
                  max_window_layers=local.index(True) if any(local) else config.n_layers,
                  layer_types=["sliding_attention" if is_local else "full_attention"
                               for is_local in local])
    return hf


def _write_gemma(config: ModelConfig, model_type: str, base: dict) -> dict:
    """Gemma / Gemma 2 config.json (issue 16); whatever it cannot express comes back different
    from the reader, and hf_config_from_config then refuses the family."""
    hf = {**base, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
          "head_dim": config.head_size, "max_position_embeddings": _max_position_embeddings(config),
          "intermediate_size": config.ffn_width, "rms_norm_eps": config.norm_eps,
          "attention_bias": config.qkv_bias, "rope_parameters": _rope_parameters(config),
          "pad_token_id": config.padding_idx, "use_bidirectional_attention": False,
          "attention_dropout": 0.0}
    # an FFN Gemma has no name for: written as the default, so the comparison names ffn
    activation = _GEMMA_GLU_TO_HF.get(config.ffn, "gelu_pytorch_tanh")
    if model_type == "gemma":
        return {**hf, "hidden_act": activation}
    # query_pre_attn_scalar is an int: the scale must be n^(−1/2) for a whole n
    scale = config.attention_scale if config.attention_scale is not None else config.head_size ** -0.5
    scalar = round(scale ** -2)
    if scalar < 1 or scalar ** -0.5 != scale:
        raise ValueError(f"attention_scale={config.attention_scale!r} cannot be saved as model_type "
                         "'gemma2': transformers' scale is query_pre_attn_scalar^(-1/2) for an "
                         "integer query_pre_attn_scalar")
    layer_types = ["full_attention" if config.layer_window(l) is None else "sliding_attention"
                   for l in range(config.n_layers)]
    return {**hf, "hidden_activation": activation, "query_pre_attn_scalar": scalar,
            "layer_types": layer_types, "sliding_window": config.window or 4096,
            "attn_logit_softcapping": config.attention_softcap,
            "final_logit_softcapping": config.final_logit_softcap}


def _architecture(config: ModelConfig) -> dict:
    """What the config computes, with every default resolved (d_ff=None → the width, the
    pattern → each layer's window, unused fields dropped), so two spellings of one model
    compare equal."""
    fields = config.to_dict()
    for name in _TRAINING_ONLY + ("dtype", "attention_impl", "layer_impl", "d_ff", "ffn_multiplier", "ffn_multiple_of",
                                  "n_kv_heads", "head_dim", "rotary_dim", "attention_pattern",
                                  "window"):
        fields.pop(name)
    fields.update(d_ff=config.ffn_width, n_kv_heads=config.kv_heads, head_dim=config.head_size,
                  windows=[config.layer_window(layer) for layer in range(config.n_layers)])
    if config.positions == "rope":
        fields["rotary_dim"] = config.rotary_dim or config.head_size
    else:  # (the scaling fields are at their defaults: the config refuses anything else)
        for name in ("rope_theta", "rope_layout", "rope_type") + tuple(ROPE_SCALING_DEFAULTS):
            fields.pop(name)
    if config.softmax != "clipped":
        fields.pop("clip_gamma"), fields.pop("clip_zeta"), fields.pop("clip_alpha")
    if config.norm == "rmsnorm":
        fields.pop("norm_bias")
    if config.block != "parallel":
        fields.pop("parallel_norms")
    return fields


def hf_config_from_config(config: ModelConfig, model_type: Optional[str] = None) -> dict:
    """A ``config.json`` dict that reproduces ``config``: under ``model_type`` if given, else
    under the first family that can express it. Raises ``ValueError`` when none can (e.g. the
    2017 encoder-decoder, softmax₁, a post-norm RMSNorm model)."""
    candidates = [model_type] if model_type is not None else list(READERS)
    reasons = []
    for candidate in candidates:
        try:
            hf = _write(config, candidate)
            back = config_from_hf(hf, config.dtype)
        except ValueError as error:
            reasons.append(f"{candidate}: {error}")
            continue
        mine, theirs = _architecture(config), _architecture(back)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if not differing:
            return hf
        reasons.append(f"{candidate}: cannot express {', '.join(f'{k}={mine.get(k)!r}' for k in differing)}")
    raise ValueError("no Hugging Face model_type reproduces this config:\n  " + "\n  ".join(reasons))
