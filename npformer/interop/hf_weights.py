"""Hugging Face tensor names and layouts ↔ npformer parameter names, per ``model_type``.

Each family is a list of :class:`Rule`: one Hugging Face tensor made from one or more of our
parameters (``join``) and split back into them (``split``). The layouts that differ from ours:

- GPT-1 / GPT-2 use ``Conv1D``, whose weight is (in, out) — the transpose of a Linear's
  (out, in) — and fuse q, k, v into ``c_attn`` with columns [q | k | v].
- GPT-NeoX fuses q, k, v into ``query_key_value`` with rows grouped by head:
  rows h·3D … h·3D+D−1 are q of head h, the next D its k, the next D its v.
- Phi-3 fuses q, k, v into ``qkv_proj`` with rows [q (H·D); k (K·D); v (K·D)] and the GLU's
  gate and up into ``gate_up_proj`` with rows [gate (F); up (F)] (its MLP chunks the output in
  two, gate first): a concatenation of our matrices along the rows, split back at the same
  offsets.
- Tied models store the token table once (the head reads the same tensor).

Because every rule is linear in the tensors (a transpose, a concatenation, a reordering of
rows), the same rules map gradients: ``hf_state_dict(model, grads=True)``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from ..config import ModelConfig


class Rule(NamedTuple):
    hf_name: str
    ours: Tuple[str, ...]
    join: Callable[[Sequence[np.ndarray]], np.ndarray]  # our tensors → the HF tensor
    split: Callable[[np.ndarray], Tuple[np.ndarray, ...]]  # the HF tensor → our tensors


def _same(hf_name: str, ours: str) -> Rule:
    return Rule(hf_name, (ours,), lambda t: t[0], lambda a: (a,))


def _transposed(hf_name: str, ours: str) -> Rule:
    """Conv1D weight (in, out) ↔ Linear weight (out, in)."""
    return Rule(hf_name, (ours,), lambda t: t[0].T, lambda a: (a.T,))


def _conv1d_qkv(hf_name: str, ours: Tuple[str, str, str], bias: bool) -> Rule:
    """GPT-2's c_attn: weight (C, 3C) = [W_qᵀ | W_kᵀ | W_vᵀ]; bias (3C,) = [b_q | b_k | b_v]."""
    if bias:
        return Rule(hf_name, ours, lambda t: np.concatenate(t), lambda a: tuple(np.split(a, 3)))
    return Rule(hf_name, ours, lambda t: np.concatenate(t, axis=0).T,
                lambda a: tuple(w.T for w in np.split(a, 3, axis=1)))


def _neox_qkv(hf_name: str, ours: Tuple[str, str, str], n_heads: int) -> Rule:
    """GPT-NeoX's query_key_value: rows (H, 3, D) per head [q_h; k_h; v_h] ↔ ours (3, H, D)."""

    def join(t):
        stacked = np.stack(t)  # (3, H·D, ...)
        rest = stacked.shape[2:]
        return stacked.reshape(3, n_heads, -1, *rest).swapaxes(0, 1).reshape(-1, *rest)

    def split(a):
        rest = a.shape[1:]
        grouped = a.reshape(n_heads, 3, -1, *rest).swapaxes(0, 1)  # (3, H, D, ...)
        return tuple(part.reshape(-1, *rest) for part in grouped)

    return Rule(hf_name, ours, join, split)


def _stacked_rows(hf_name: str, ours: Tuple[str, ...], rows: Sequence[int]) -> Rule:
    """Phi-3's fused Linear weights: ours (rows[i], C) stacked along the rows ↔ (sum(rows), C)."""
    offsets = np.cumsum(rows)[:-1]  # where each of ours starts, after the first
    return Rule(hf_name, ours, lambda t: np.concatenate(t, axis=0),
                lambda a: tuple(np.split(a, offsets, axis=0)))


def _norm(rules: List[Rule], hf_prefix: str, ours: str, params: Dict[str, np.ndarray]) -> None:
    rules.append(_same(f"{hf_prefix}.weight", f"{ours}.weight"))
    if f"{ours}.bias" in params:
        rules.append(_same(f"{hf_prefix}.bias", f"{ours}.bias"))


def _linear(rules: List[Rule], hf_prefix: str, ours: str, params: Dict[str, np.ndarray],
            conv1d: bool = False) -> None:
    rules.append((_transposed if conv1d else _same)(f"{hf_prefix}.weight", f"{ours}.weight"))
    if f"{ours}.bias" in params:
        rules.append(_same(f"{hf_prefix}.bias", f"{ours}.bias"))


def _qkv_names(layer: int, what: str) -> Tuple[str, str, str]:
    return tuple(f"layers.{layer}.attn.{p}_proj.{what}" for p in "qkv")


def _gpt_rules(config: ModelConfig, params, model_type: str) -> List[Rule]:
    """openai-gpt, gpt2, gpt_neo, gptj: the ``transformer.`` families."""
    rules: List[Rule] = []
    tokens = "tokens_embed" if model_type == "openai-gpt" else "wte"
    rules.append(_same(f"transformer.{tokens}.weight", "embed.tokens.weight"))
    if config.positions == "learned":
        positions = "positions_embed" if model_type == "openai-gpt" else "wpe"
        rules.append(_same(f"transformer.{positions}.weight", "embed.position_table"))
    conv1d = model_type in ("openai-gpt", "gpt2")
    for l in range(config.n_layers):
        h, ours = f"transformer.h.{l}", f"layers.{l}"
        _norm(rules, f"{h}.ln_1", f"{ours}.attn_norm", params)
        if conv1d:
            rules.append(_conv1d_qkv(f"{h}.attn.c_attn.weight", _qkv_names(l, "weight"), bias=False))
            rules.append(_conv1d_qkv(f"{h}.attn.c_attn.bias", _qkv_names(l, "bias"), bias=True))
            _linear(rules, f"{h}.attn.c_proj", f"{ours}.attn.out_proj", params, conv1d=True)
        else:
            attn = f"{h}.attn.attention" if model_type == "gpt_neo" else f"{h}.attn"
            for p in "qkv":
                _linear(rules, f"{attn}.{p}_proj", f"{ours}.attn.{p}_proj", params)
            _linear(rules, f"{attn}.out_proj", f"{ours}.attn.out_proj", params)
        if model_type != "gptj":  # GPT-J's parallel block has one norm
            _norm(rules, f"{h}.ln_2", f"{ours}.ffn_norm", params)
        up, down = ("fc_in", "fc_out") if model_type == "gptj" else ("c_fc", "c_proj")
        _linear(rules, f"{h}.mlp.{up}", f"{ours}.ffn.up", params, conv1d=conv1d)
        _linear(rules, f"{h}.mlp.{down}", f"{ours}.ffn.down", params, conv1d=conv1d)
    if config.final_norm:
        _norm(rules, "transformer.ln_f", "final_norm", params)
    if not config.tie_embeddings:
        _linear(rules, "lm_head", "lm_head", params)
    return rules


def _neox_rules(config: ModelConfig, params) -> List[Rule]:
    rules = [_same("gpt_neox.embed_in.weight", "embed.tokens.weight")]
    for l in range(config.n_layers):
        h, ours = f"gpt_neox.layers.{l}", f"layers.{l}"
        _norm(rules, f"{h}.input_layernorm", f"{ours}.attn_norm", params)
        _norm(rules, f"{h}.post_attention_layernorm", f"{ours}.ffn_norm", params)
        rules.append(_neox_qkv(f"{h}.attention.query_key_value.weight", _qkv_names(l, "weight"),
                               config.n_heads))
        if config.qkv_bias:
            rules.append(_neox_qkv(f"{h}.attention.query_key_value.bias", _qkv_names(l, "bias"),
                                   config.n_heads))
        _linear(rules, f"{h}.attention.dense", f"{ours}.attn.out_proj", params)
        _linear(rules, f"{h}.mlp.dense_h_to_4h", f"{ours}.ffn.up", params)
        _linear(rules, f"{h}.mlp.dense_4h_to_h", f"{ours}.ffn.down", params)
    _norm(rules, "gpt_neox.final_layer_norm", "final_norm", params)
    if not config.tie_embeddings:
        rules.append(_same("embed_out.weight", "lm_head.weight"))
    return rules


def _llama_rules(config: ModelConfig, params, model_type: str) -> List[Rule]:
    rules = [_same("model.embed_tokens.weight", "embed.tokens.weight")]
    for l in range(config.n_layers):
        h, ours = f"model.layers.{l}", f"layers.{l}"
        _norm(rules, f"{h}.input_layernorm", f"{ours}.attn_norm", params)
        if model_type != "cohere":  # Cohere's parallel block has one norm
            _norm(rules, f"{h}.post_attention_layernorm", f"{ours}.ffn_norm", params)
        if model_type == "phi3":  # rows [q; k; v] and [gate; up]
            D, F = config.head_size, config.ffn_width
            rules.append(_stacked_rows(f"{h}.self_attn.qkv_proj.weight", _qkv_names(l, "weight"),
                                       (config.n_heads * D, config.kv_heads * D, config.kv_heads * D)))
            rules.append(_stacked_rows(f"{h}.mlp.gate_up_proj.weight",
                                       (f"{ours}.ffn.gate.weight", f"{ours}.ffn.up.weight"), (F, F)))
            _linear(rules, f"{h}.mlp.down_proj", f"{ours}.ffn.down", params)
        else:
            for p in "qkv":
                _linear(rules, f"{h}.self_attn.{p}_proj", f"{ours}.attn.{p}_proj", params)
            for p in ("gate", "up", "down"):
                _linear(rules, f"{h}.mlp.{p}_proj", f"{ours}.ffn.{p}", params)
        _linear(rules, f"{h}.self_attn.o_proj", f"{ours}.attn.out_proj", params)
        if f"{ours}.attn.q_norm.weight" in params:  # Qwen3's per-head q/k RMSNorms (D,)
            _norm(rules, f"{h}.self_attn.q_norm", f"{ours}.attn.q_norm", params)
            _norm(rules, f"{h}.self_attn.k_norm", f"{ours}.attn.k_norm", params)
    _norm(rules, "model.norm", "final_norm", params)
    if not config.tie_embeddings:
        _linear(rules, "lm_head", "lm_head", params)
    return rules


def _gemma_rules(config: ModelConfig, params, model_type: str) -> List[Rule]:
    """Gemma: Llama's names. Gemma 2's four norms per layer: input_layernorm before attention,
    post_attention_layernorm on the attention's *output* (not before the MLP, as in Gemma and
    Llama), pre_feedforward_layernorm before the MLP, post_feedforward_layernorm on its output.
    The stored weights are w of the (1 + w) scale on both sides."""
    rules = [_same("model.embed_tokens.weight", "embed.tokens.weight")]
    norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))
    if model_type == "gemma2":
        norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
                 ("pre_feedforward_layernorm", "ffn_norm"),
                 ("post_feedforward_layernorm", "ffn_post_norm"))
    for l in range(config.n_layers):
        h, ours = f"model.layers.{l}", f"layers.{l}"
        for hf_norm, our_norm in norms:
            _norm(rules, f"{h}.{hf_norm}", f"{ours}.{our_norm}", params)
        for p in "qkv":
            _linear(rules, f"{h}.self_attn.{p}_proj", f"{ours}.attn.{p}_proj", params)
        _linear(rules, f"{h}.self_attn.o_proj", f"{ours}.attn.out_proj", params)
        for p in ("gate", "up", "down"):
            _linear(rules, f"{h}.mlp.{p}_proj", f"{ours}.ffn.{p}", params)
    _norm(rules, "model.norm", "final_norm", params)
    if not config.tie_embeddings:
        _linear(rules, "lm_head", "lm_head", params)
    return rules


def rules_for(config: ModelConfig, params: Dict[str, np.ndarray], model_type: str) -> List[Rule]:
    """The rules mapping a model's parameters ``params`` to ``model_type``'s tensors."""
    if model_type in ("openai-gpt", "gpt2", "gpt_neo", "gptj"):
        rules = _gpt_rules(config, params, model_type)
    elif model_type == "gpt_neox":
        rules = _neox_rules(config, params)
    elif model_type in ("llama", "cohere", "mistral", "qwen2", "qwen3", "phi3"):
        rules = _llama_rules(config, params, model_type)
    elif model_type in ("gemma", "gemma2"):
        rules = _gemma_rules(config, params, model_type)
    else:
        raise ValueError(f"unsupported model_type {model_type!r}")
    if config.tie_embeddings and config.lm_head_bias:
        rules.append(_same("lm_head.bias", "lm_head_bias"))
    covered = {name for rule in rules for name in rule.ours}
    missing = sorted(set(params) - covered)
    if missing:  # a config feature the family's layout has no tensor for
        raise ValueError(f"model_type {model_type!r} has no tensor for the parameter(s) {missing}")
    return rules


def to_hf(tensors: Dict[str, np.ndarray], config: ModelConfig, model_type: str) -> Dict[str, np.ndarray]:
    """Our tensors (parameters or gradients, by our names) → Hugging Face names and layouts."""
    return {rule.hf_name: np.ascontiguousarray(rule.join([tensors[name] for name in rule.ours]))
            for rule in rules_for(config, tensors, model_type)}


def from_hf(hf_tensors: Dict[str, np.ndarray], params: Dict[str, np.ndarray], config: ModelConfig,
            model_type: str) -> Dict[str, np.ndarray]:
    """Hugging Face tensors → our names, checked against the shapes of ``params`` (a built
    model's parameters). Missing, extra or mis-shaped tensors raise a ``ValueError`` naming
    the tensor and both shapes."""
    rules = rules_for(config, params, model_type)
    expected = {rule.hf_name: rule for rule in rules}
    hf_tensors = dict(hf_tensors)
    if config.tie_embeddings and "lm_head.weight" in hf_tensors and "lm_head.weight" not in expected:
        # a tied checkpoint that stored the head anyway: it must be the token table
        head = hf_tensors.pop("lm_head.weight")
        table_name = next(r.hf_name for r in rules if r.ours == ("embed.tokens.weight",))
        if table_name in hf_tensors and not np.array_equal(head, hf_tensors[table_name]):
            raise ValueError(f"the config ties the head to {table_name}, but the checkpoint's "
                             "lm_head.weight differs from it")
    missing = sorted(set(expected) - set(hf_tensors))
    extra = sorted(set(hf_tensors) - set(expected))
    if missing:
        raise ValueError(f"checkpoint lacks tensor(s) {missing[:8]}{' …' if len(missing) > 8 else ''} "
                         f"that a {model_type} model of this config needs")
    if extra:
        raise ValueError(f"checkpoint has tensor(s) {extra[:8]}{' …' if len(extra) > 8 else ''} "
                         f"that a {model_type} model of this config does not have")
    ours: Dict[str, np.ndarray] = {}
    for rule in rules:
        want = rule.join([params[name] for name in rule.ours]).shape
        have = hf_tensors[rule.hf_name]
        if have.shape != want:
            raise ValueError(f"tensor {rule.hf_name!r} has shape {tuple(have.shape)}, but the "
                             f"config needs {tuple(want)}")
        for name, part in zip(rule.ours, rule.split(have)):
            ours[name] = part
    return ours
