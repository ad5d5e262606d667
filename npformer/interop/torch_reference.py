"""The lineage written directly in PyTorch (autograd), for presets no Hugging Face class
reproduces: gpt3 (banded layers), palm (parallel, multi-query, half-split RoPE) and the 2017
encoder-decoder (``torch.nn.Transformer`` plus embeddings and head).

This is a second, independent implementation of what a :class:`~npformer.config.ModelConfig`
means: plain torch ops, no npformer code on the torch side, parameters read by npformer's
names. ``npformer compare`` uses it; its gradients come from torch's autograd.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from ..config import ModelConfig
from ..functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..gradcheck import TensorReport


def _torch():
    import torch

    return torch


def _norm(config: ModelConfig, p: Dict, prefix: str, x):
    torch = _torch()
    if config.norm == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * p[f"{prefix}.weight"]
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), p[f"{prefix}.weight"],
                                          p.get(f"{prefix}.bias"), config.norm_eps)


def _linear(p: Dict, prefix: str, x):
    return _torch().nn.functional.linear(x, p[f"{prefix}.weight"], p.get(f"{prefix}.bias"))


def _rope(config: ModelConfig, x):
    """x (B, n, T, D): rotate the first rotary_dim dims by position · θ^(−2i/r). The
    unscaled RoPE only: a scaled one (rope_type) is refused rather than silently unscaled —
    its reference is transformers (llama, gpt_neox, cohere; tests/test_rope_scaling.py)."""
    torch = _torch()
    if config.rope_type != "default":
        raise ValueError(f"the torch reference implements rope_type='default' only, got "
                         f"rope_type={config.rope_type!r}; compare a scaled RoPE against "
                         "Hugging Face (save_hf as llama, cohere or gpt_neox)")
    T, D = x.shape[2], x.shape[3]
    r = config.rotary_dim or D
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = (torch.arange(T, dtype=torch.float64)[:, None] * inv_freq).to(x.dtype)  # (T, r/2)
    cos, sin = angles.cos(), angles.sin()
    rotated, rest = x[..., :r], x[..., r:]
    if config.rope_layout == "half":
        a, b = rotated[..., : r // 2], rotated[..., r // 2:]
    else:
        a, b = rotated[..., 0::2], rotated[..., 1::2]
    a2, b2 = a * cos - b * sin, b * cos + a * sin
    if config.rope_layout == "half":
        rotated = torch.cat([a2, b2], dim=-1)
    else:
        rotated = torch.stack([a2, b2], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def _attention(config: ModelConfig, p: Dict, prefix: str, layer: int, h, doc_ids):
    torch = _torch()
    B, T, _ = h.shape
    H, K, D = config.n_heads, config.kv_heads, config.head_size
    q = _linear(p, f"{prefix}.q_proj", h).view(B, T, H, D).transpose(1, 2)
    k = _linear(p, f"{prefix}.k_proj", h).view(B, T, K, D).transpose(1, 2)
    v = _linear(p, f"{prefix}.v_proj", h).view(B, T, K, D).transpose(1, 2)
    if config.positions == "rope":
        q, k = _rope(config, q), _rope(config, k)
    k = k.repeat_interleave(H // K, dim=1)
    v = v.repeat_interleave(H // K, dim=1)
    scale = config.attention_scale if config.attention_scale is not None else 1 / math.sqrt(D)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    if config.attention_softcap is not None:
        scores = config.attention_softcap * torch.tanh(scores / config.attention_softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i)[None, None]
    window = config.layer_window(layer)
    if window is not None:
        allowed = allowed & (j > i - window)[None, None]
    if doc_ids is not None:
        d = torch.as_tensor(doc_ids)
        allowed = allowed & (d[:, None, :, None] == d[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    if config.softmax == "softmax1":
        m = scores.amax(-1, keepdim=True).clamp(min=0)
        e = torch.exp(scores - m)
        probs = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    elif config.softmax == "sink":  # gpt-oss: a column of s_h, softmax, the column dropped
        sink = p[f"{prefix}.sinks"].view(1, H, 1, 1).expand(B, H, T, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
        if config.softmax == "clipped":
            gamma = config.clip_gamma
            if config.clip_alpha is not None:  # length-aware: −α / (keys each query may see)
                gamma = -config.clip_alpha / allowed.sum(-1, keepdim=True).to(probs.dtype)
            probs = ((config.clip_zeta - gamma) * probs + gamma).clamp(0, 1)
    o = probs @ v  # (B, H, T, D)
    if config.attention_gate:  # Bondarenko et al.: σ(x_h · w_h + b_h) per head and token
        C = h.shape[-1]
        logits = (h.view(B, T, H, C // H) * p[f"{prefix}.gate_weight"]).sum(-1) \
            + p[f"{prefix}.gate_bias"]  # (B, T, H)
        o = o * torch.sigmoid(logits).transpose(1, 2)[..., None]
    o = o.transpose(1, 2).reshape(B, T, H * D)
    return _linear(p, f"{prefix}.out_proj", o)


def _ffn(config: ModelConfig, p: Dict, prefix: str, h):
    F = _torch().nn.functional
    if config.ffn in ("swiglu", "geglu"):
        gate = _linear(p, f"{prefix}.gate", h)
        act = F.silu(gate) if config.ffn == "swiglu" else F.gelu(gate)
        return _linear(p, f"{prefix}.down", act * _linear(p, f"{prefix}.up", h))
    up = _linear(p, f"{prefix}.up", h)
    act = {"relu": F.relu, "gelu": F.gelu,
           "gelu_tanh": lambda u: F.gelu(u, approximate="tanh")}[config.ffn](up)
    return _linear(p, f"{prefix}.down", act)


def decoder_logits(config: ModelConfig, p: Dict, ids, doc_ids=None):
    """logits (B, T, V) of a decoder-only config with torch parameters ``p`` (npformer names)."""
    torch = _torch()
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    x = p["embed.tokens.weight"][ids]
    if config.scale_embeddings:
        x = x * math.sqrt(config.d_model)
    if config.positions == "learned":
        x = x + p["embed.position_table"][:T]
    for l in range(config.n_layers):
        pre = f"layers.{l}"
        if config.block == "parallel":
            h1 = _norm(config, p, f"{pre}.attn_norm", x)
            h2 = h1 if config.parallel_norms == 1 else _norm(config, p, f"{pre}.ffn_norm", x)
            x = x + _attention(config, p, f"{pre}.attn", l, h1, doc_ids) + _ffn(config, p, f"{pre}.ffn", h2)
        elif config.norm_placement == "pre":
            x = x + _attention(config, p, f"{pre}.attn", l, _norm(config, p, f"{pre}.attn_norm", x), doc_ids)
            x = x + _ffn(config, p, f"{pre}.ffn", _norm(config, p, f"{pre}.ffn_norm", x))
        else:
            x = _norm(config, p, f"{pre}.attn_norm", x + _attention(config, p, f"{pre}.attn", l, x, doc_ids))
            x = _norm(config, p, f"{pre}.ffn_norm", x + _ffn(config, p, f"{pre}.ffn", x))
    if config.final_norm:
        x = _norm(config, p, "final_norm", x)
    if config.tie_embeddings:
        logits = x @ p["embed.tokens.weight"].T
        if "lm_head_bias" in p:
            logits = logits + p["lm_head_bias"]
    else:
        logits = _linear(p, "lm_head", x)
    return logits * config.logit_scale


def encoder_decoder_logits(model, p: Dict, src_ids, tgt_ids):
    """The 2017 model through ``torch.nn.Transformer`` with npformer's stack weights, plus the
    shared embedding (× √C), sinusoidal positions and the tied head written in torch."""
    torch = _torch()
    from ..functional.positions import sinusoidal_table
    from .torch_transformer import torch_transformer_state_dict

    config = model.config
    C = config.d_model
    transformer = torch.nn.Transformer(
        d_model=C, nhead=config.n_heads, num_encoder_layers=config.encoder_layers,
        num_decoder_layers=config.n_layers, dim_feedforward=config.ffn_width, dropout=0.0,
        activation="relu", layer_norm_eps=config.norm_eps, batch_first=True, norm_first=False,
        dtype=p["embed.tokens.weight"].dtype)
    if not config.final_norm:
        transformer.encoder.norm = None
        transformer.decoder.norm = None
    transformer.load_state_dict({k: torch.from_numpy(v) for k, v in torch_transformer_state_dict(model).items()})
    table = p["embed.tokens.weight"]
    S, T = src_ids.shape[1], tgt_ids.shape[1]
    positions = torch.from_numpy(sinusoidal_table(max(S, T), C)).to(table.dtype)
    src = table[torch.as_tensor(src_ids)] * math.sqrt(C) + positions[:S]
    tgt = table[torch.as_tensor(tgt_ids)] * math.sqrt(C) + positions[:T]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=table.dtype)
    out = transformer(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    return out @ table.T, transformer


def compare_with_torch_reference(name: str, model, dtype: str) -> List[TensorReport]:
    """Logits, loss and every gradient of ``model`` against the torch reference."""
    torch = _torch()
    from .compare import _report, _torch_loss, gradient_floor
    from .torch_transformer import torch_transformer_state_dict

    model = model if dtype == "float64" else _cast(model, dtype)
    config = model.config
    rng = np.random.default_rng(0)
    targets = rng.integers(0, config.vocab_size, (2, 7))
    p = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.parameters().items()}
    if config.architecture == "encoder-decoder":
        src = rng.integers(0, config.vocab_size, (2, 5))
        tgt = rng.integers(0, config.vocab_size, (2, 7))
        logits = model.forward(src, tgt)
        ref_logits, transformer = encoder_decoder_logits(model, p, src, tgt)
    else:
        ids = rng.integers(0, config.vocab_size, (2, 7))
        logits = model.forward(ids)
        ref_logits, transformer = decoder_logits(config, p, ids), None
    loss, cache = cross_entropy_forward(logits, targets)
    model.zero_grad()
    model.backward(cross_entropy_backward(1.0, cache))
    ref_loss = _torch_loss(ref_logits, targets)
    ref_loss.backward()
    reports = [_report(name, "logits", logits, ref_logits.detach().numpy(), dtype),
               _report(name, "loss", float(loss), ref_loss.item(), dtype)]
    grads = model.gradients()
    floor = gradient_floor(grads.values())
    if transformer is not None:  # the stacks' gradients live in torch's module
        ours = torch_transformer_state_dict(model, grads=True)
        for tensor, param in transformer.named_parameters():
            reports.append(_report(name, tensor, ours[tensor], param.grad.numpy(), dtype, floor))
        grads = {"embed.tokens.weight": grads["embed.tokens.weight"]}
    for tensor, grad in grads.items():
        reports.append(_report(name, tensor, grad, p[tensor].grad.numpy(), dtype, floor))
    return reports


def _cast(model, dtype: str):
    """A copy of ``model`` in another dtype, same weights (rounded once)."""
    from ..models import build_model

    copy = build_model(model.config.replace(dtype=dtype)).eval()
    for name, value in copy.parameters().items():
        value[...] = model.parameters()[name]
    return copy
