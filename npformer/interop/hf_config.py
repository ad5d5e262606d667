"""Hugging Face ``config.json`` ↔ :class:`~npformer.config.ModelConfig`, per ``model_type``.

Each family's reader says which of our switches its architecture sets — the same switches
the presets use, so a loaded GPT-J is ``block="parallel", parallel_norms=1,
rope_layout="interleaved"`` just like the ``gpt-j`` preset. A field whose value we cannot
reproduce (a RoPE scaling scheme, GPT-2's per-layer attention scaling, biased GLU MLPs)
raises a ``ValueError`` naming the field instead of loading a model that computes something
else.

Writing goes the other way; :func:`hf_config_from_config` tries each family and keeps the
first whose reader gives back the same architecture (so a config is only written under a
``model_type`` that really reproduces it).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from ..config import ModelConfig

# Hugging Face activation names → our FFN kinds (ACT2FN in transformers; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation, "gelu" the exact erf form — except in
# openai-gpt, whose own table maps "gelu" to the tanh form).
_PLAIN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None}
_FFN_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}

# fields that do not change what a model computes in evaluation, so a round trip may differ
_TRAINING_ONLY = ("dropout", "init_std", "scaled_residual_init", "document_mask", "max_seq_len")


def _get(hf: dict, key: str, default=None, *, required: bool = False):
    if key not in hf or hf[key] is None:
        if required:
            raise ValueError(f"config.json of model_type {hf.get('model_type')!r} has no {key!r}")
        return default
    return hf[key]


def _require(hf: dict, key: str, expected, why: str) -> None:
    value = hf.get(key, expected)
    if value is not None and value != expected:
        raise ValueError(f"config.json field {key}={value!r} is not supported ({why}); "
                         f"npformer reproduces {key}={expected!r}")


def _activation(hf: dict, key: str) -> str:
    name = _get(hf, key, "gelu_new")
    ffn = _PLAIN_ACTIVATIONS.get(name)
    if ffn is None:
        raise ValueError(f"config.json field {key}={name!r} is not supported; valid: "
                         f"{[k for k, v in _PLAIN_ACTIVATIONS.items() if v]}")
    return ffn


def _rope(hf: dict) -> dict:
    """rope_theta and partial_rotary_factor from ``rope_parameters`` (transformers 5) or the
    older top-level fields; only the default (unscaled) rotary embedding is supported."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported (only the default "
                         "unscaled RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    return dict(theta=float(theta), factor=float(factor))


def _common(hf: dict, **fields) -> dict:
    fields.setdefault("init_std", float(_get(hf, "initializer_range", 0.02)))
    return fields


# ---- readers: config.json → ModelConfig fields --------------------------------------------


def _openai_gpt(hf: dict) -> dict:
    afn = _get(hf, "afn", "gelu")
    ffn = {"gelu": "gelu_tanh", "relu": "relu"}.get(afn)  # openai-gpt's own ACT_FNS table
    if ffn is None:
        raise ValueError(f"config.json field afn={afn!r} is not supported; valid: 'gelu', 'relu'")
    C = _get(hf, "n_embd", required=True)
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["n_layer"],
                   n_heads=hf["n_head"], max_seq_len=hf["n_positions"], d_ff=4 * C, ffn=ffn,
                   norm="layernorm", norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
                   norm_placement="post", final_norm=False, positions="learned",
                   tie_embeddings=True, dropout=float(_get(hf, "resid_pdrop", 0.0)))


def _gpt2(hf: dict) -> dict:
    _require(hf, "scale_attn_by_inverse_layer_idx", False, "a per-layer attention scale")
    _require(hf, "add_cross_attention", False, "decoder-only models")
    C = _get(hf, "n_embd", required=True)
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["n_layer"],
                   n_heads=hf["n_head"], max_seq_len=hf["n_positions"],
                   d_ff=_get(hf, "n_inner", 4 * C), ffn=_activation(hf, "activation_function"),
                   norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), positions="learned",
                   attention_scale=None if _get(hf, "scale_attn_weights", True) else 1.0,
                   tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
                   dropout=float(_get(hf, "resid_pdrop", 0.0)))


def _gpt_neo(hf: dict) -> dict:
    C = _get(hf, "hidden_size", required=True)
    layers = _get(hf, "attention_layers")
    if layers is None:
        layers = [kind for kinds, repeat in hf["attention_types"] for _ in range(repeat) for kind in kinds]
    pattern = tuple({"global": "dense", "local": "local"}[kind] for kind in layers)
    if len(pattern) != hf["num_layers"]:
        raise ValueError(f"config.json attention_layers has {len(pattern)} entries for "
                         f"num_layers={hf['num_layers']}")
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["num_layers"],
                   n_heads=hf["num_heads"], max_seq_len=hf["max_position_embeddings"],
                   d_ff=_get(hf, "intermediate_size", 4 * C),
                   ffn=_activation(hf, "activation_function"),
                   norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), positions="learned",
                   attention_pattern=pattern,
                   window=hf["window_size"] if "local" in pattern else None,
                   attention_scale=1.0, qkv_bias=False, out_bias=True,
                   tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
                   dropout=float(_get(hf, "resid_dropout", 0.0)))


def _gptj(hf: dict) -> dict:
    C, H = _get(hf, "n_embd", required=True), hf["n_head"]
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["n_layer"],
                   n_heads=H, max_seq_len=hf["n_positions"], d_ff=_get(hf, "n_inner", 4 * C),
                   ffn=_activation(hf, "activation_function"),
                   norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), block="parallel",
                   parallel_norms=1, positions="rope", rope_layout="interleaved",
                   rotary_dim=_get(hf, "rotary_dim"), qkv_bias=False, out_bias=False,
                   lm_head_bias=True, tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
                   dropout=float(_get(hf, "resid_pdrop", 0.0)))


def _gpt_neox(hf: dict) -> dict:
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    rope = _rope(hf)
    D = C // H
    rotary = int(D * rope["factor"])
    parallel = bool(_get(hf, "use_parallel_residual", True))
    bias = bool(_get(hf, "attention_bias", True))
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["num_hidden_layers"],
                   n_heads=H, max_seq_len=hf["max_position_embeddings"], d_ff=hf["intermediate_size"],
                   ffn=_activation(hf, "hidden_act"), norm_eps=float(_get(hf, "layer_norm_eps", 1e-5)),
                   block="parallel" if parallel else "sequential", parallel_norms=2,
                   positions="rope", rope_layout="half", rope_theta=rope["theta"],
                   rotary_dim=None if rotary == D else rotary, qkv_bias=bias, out_bias=bias,
                   tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
                   dropout=float(_get(hf, "hidden_dropout", 0.0)))


def _llama_like(hf: dict) -> dict:
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json field hidden_act={act!r} is not supported; valid: 'silu' "
                         "(the SwiGLU MLP)")
    _require(hf, "mlp_bias", False, "the GLU MLP here has no biases")
    _require(hf, "pretraining_tp", 1, "a tensor-parallel split of the MLP")
    rope = _rope(hf)
    if rope["factor"] != 1.0:
        # transformers' Llama and Cohere rotary embeddings ignore the field and rotate every
        # channel of the head (only gpt_neox reads it): refuse rather than load another model
        raise ValueError(f"config.json partial_rotary_factor={rope['factor']!r} is not supported "
                         f"for model_type {hf.get('model_type')!r}: transformers rotates the whole "
                         "head there and ignores it (partial rotary exists as gpt_neox or gptj)")
    head_dim = _get(hf, "head_dim", C // H)
    bias = bool(_get(hf, "attention_bias", False))
    pad = _get(hf, "pad_token_id")
    return _common(hf, vocab_size=hf["vocab_size"], d_model=C, n_layers=hf["num_hidden_layers"],
                   n_heads=H, n_kv_heads=_get(hf, "num_key_value_heads", H), head_dim=head_dim,
                   max_seq_len=hf["max_position_embeddings"], d_ff=hf["intermediate_size"],
                   ffn="swiglu", ffn_bias=False, positions="rope", rope_theta=rope["theta"],
                   qkv_bias=bias, out_bias=bias,
                   # the Llama trap: HF builds nn.Embedding(padding_idx=pad_token_id), and that
                   # row then gets no gradient; we reproduce it
                   padding_idx=pad if pad is not None and 0 <= pad < hf["vocab_size"] else None,
                   dropout=0.0)


def _llama(hf: dict) -> dict:
    fields = _llama_like(hf)
    fields.update(norm="rmsnorm", norm_bias=False, norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
                  rope_layout="half", tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)))
    return fields


def _cohere(hf: dict) -> dict:
    _require(hf, "use_qk_norm", False, "per-head q/k LayerNorms")
    fields = _llama_like(hf)
    fields.update(norm="layernorm", norm_bias=False, norm_eps=float(_get(hf, "layer_norm_eps", 1e-5)),
                  block="parallel", parallel_norms=1, rope_layout="interleaved",
                  logit_scale=float(_get(hf, "logit_scale", 1.0)),
                  tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)))
    return fields


READERS: Dict[str, Callable[[dict], dict]] = {
    "openai-gpt": _openai_gpt, "gpt2": _gpt2, "gpt_neo": _gpt_neo, "gptj": _gptj,
    "gpt_neox": _gpt_neox, "llama": _llama, "cohere": _cohere,
}


def config_from_hf(hf: dict, dtype: str = "float64") -> ModelConfig:
    """The :class:`ModelConfig` that reproduces a Hugging Face ``config.json`` (a dict)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in READERS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(READERS)}")
    try:
        fields = READERS[model_type](hf)
    except KeyError as missing:
        raise ValueError(f"config.json of model_type {model_type!r} lacks the field {missing}") from None
    return ModelConfig(**fields, dtype=dtype)


# ---- writers: ModelConfig → config.json -----------------------------------------------------


def _rotary_factor(config: ModelConfig) -> float:
    """partial_rotary_factor such that transformers' ``int(head_dim · factor)`` is our rotary
    dim (r / D itself can round down, e.g. int(44 · (30/44)) = 29)."""
    rotary, head = config.rotary_dim or config.head_size, config.head_size
    factor = rotary / head
    return factor if int(head * factor) == rotary else (rotary + 0.5) / head


def _rope_parameters(config: ModelConfig) -> dict:
    return {"rope_type": "default", "rope_theta": config.rope_theta}


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
                "max_position_embeddings": P, "intermediate_size": config.ffn_width,
                "hidden_act": act, "layer_norm_eps": config.norm_eps,
                "use_parallel_residual": config.block == "parallel",
                "rope_parameters": {**_rope_parameters(config),
                                    "partial_rotary_factor": _rotary_factor(config)},
                "attention_bias": config.qkv_bias, "hidden_dropout": config.dropout,
                "attention_dropout": 0.0}
    if config.rotary_dim not in (None, config.head_size):
        raise ValueError(f"rotary_dim={config.rotary_dim} < head_dim={config.head_size} cannot be "
                         f"saved as model_type {model_type!r}: transformers rotates the whole head "
                         "there (partial rotary exists as gpt_neox or gptj)")
    llama_like = {**base, "hidden_size": C, "num_hidden_layers": L, "num_attention_heads": H,
                  "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
                  "max_position_embeddings": P, "intermediate_size": config.ffn_width,
                  "hidden_act": "silu", "attention_bias": config.qkv_bias, "mlp_bias": False,
                  "rope_parameters": _rope_parameters(config), "pad_token_id": config.padding_idx,
                  "attention_dropout": 0.0}
    if model_type == "llama":
        return {**llama_like, "rms_norm_eps": config.norm_eps}
    if model_type == "cohere":
        return {**llama_like, "layer_norm_eps": config.norm_eps, "logit_scale": config.logit_scale,
                "use_qk_norm": False}
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(READERS)}")


def _architecture(config: ModelConfig) -> dict:
    """What the config computes, with every default resolved (d_ff=None → the width, the
    pattern → each layer's window, unused fields dropped), so two spellings of one model
    compare equal."""
    fields = config.to_dict()
    for name in _TRAINING_ONLY + ("dtype", "attention_impl", "d_ff", "ffn_multiplier", "ffn_multiple_of",
                                  "n_kv_heads", "head_dim", "rotary_dim", "attention_pattern",
                                  "window"):
        fields.pop(name)
    fields.update(d_ff=config.ffn_width, n_kv_heads=config.kv_heads, head_dim=config.head_size,
                  windows=[config.layer_window(layer) for layer in range(config.n_layers)])
    if config.positions == "rope":
        fields["rotary_dim"] = config.rotary_dim or config.head_size
    else:
        for name in ("rope_theta", "rope_layout"):
            fields.pop(name)
    if config.softmax != "clipped":
        fields.pop("clip_gamma"), fields.pop("clip_zeta")
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
