"""Whole-model parity: npformer's DecoderLM against an independent PyTorch model.

The reference below is written here from the maths with plain torch operations; it does not
use ``transformers`` and never calls npformer's functional code. It reads every architectural
switch from the ``ModelConfig`` itself (norm type, placement, eps and bias; sequential or
parallel block with one or two norms; FFN kind; learned / sinusoidal / RoPE positions with
layout, theta and rotary dim; dense or local layers and the window; attention scale, soft-cap
and softmax variant; GQA / MQA by ``repeat_interleave``; biases; tied or untied head, head
bias, logit scale; final norm; document and padding masks) and loads npformer's parameter
arrays by name as torch leaves, so ``loss.backward()`` gives a gradient for each of them.

Each case compares the logits, the loss, every parameter gradient (npformer: ``backward`` of
the dlogits of its own fused cross-entropy; torch: autograd through a float64 mean
cross-entropy) and the gradient with respect to the token vectors. The reference must use
*every* npformer parameter and nothing else: a parameter that the config does not explain
fails the test.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, max_errors
from npformer.functional import cross_entropy_backward, cross_entropy_forward
from npformer.models import DecoderLM
from npformer.presets import preset_names, tiny_config

F64 = np.float64
F32 = np.float32

DECODER_PRESETS = [name for name in preset_names() if name != "transformer-2017"]

# Awkward sizes on top of every preset's tiny instance (head size 6, not a power of two;
# GQA presets get H·D = 24 ≠ C = 12): three layers (so a two-layer attention pattern does
# not divide the depth), no dropout.
AWKWARD = dict(n_layers=3, dropout=0.0)
B, T = 2, 7


# --------------------------------------------------------------------------------------
# The PyTorch reference
# --------------------------------------------------------------------------------------


class TorchParams:
    """npformer's parameter arrays as torch leaves (copies, requires_grad), by dotted name.

    Records which names the reference reads, so a test can demand that it read all of them.
    A name the config says must exist but npformer lacks raises KeyError.
    """

    def __init__(self, arrays: dict, dtype) -> None:
        self.tensors = {
            name: torch.from_numpy(np.array(a, dtype=dtype)).requires_grad_(True)
            for name, a in arrays.items()
        }
        self.used = set()

    def __call__(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.tensors[name]


def t_linear(p, prefix, x, bias: bool):
    y = x @ p(prefix + ".weight").T
    return y + p(prefix + ".bias") if bias else y


def t_norm(p, prefix, x, cfg):
    w = p(prefix + ".weight")
    if cfg.norm == "rmsnorm":
        # y = x / sqrt(mean(x²) + eps) · w
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdim=True)  # biased variance, eps inside the square root
    y = xc / torch.sqrt(var + cfg.norm_eps) * w
    return y + p(prefix + ".bias") if cfg.norm_bias else y


def t_rope(x, cfg):
    """x (B, n, T, D): rotate the first rotary_dim channels of each head by position · θ_i."""
    Tx, D = x.shape[-2], x.shape[-1]
    r = D if cfg.rotary_dim is None else cfg.rotary_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)  # (r/2,)
    angles = torch.arange(Tx, dtype=torch.float64)[:, None] * inv_freq  # (T, r/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    if cfg.rope_layout == "half":  # pairs (i, i + r/2): GPT-NeoX / Llama rotate_half
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:  # pairs (2i, 2i + 1): GPT-J rotate_every_two
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rot, rest], dim=-1)


def t_allowed(cfg, layer, batch, length, doc_ids=None, key_padding_mask=None, window="config"):
    """(B, 1, T, T) bool, True where query i may read key j."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i  # causal
    kind = cfg.attention_pattern[layer % len(cfg.attention_pattern)]
    w = cfg.window if window == "config" else window
    if kind == "local" and w is not None:
        allowed = allowed & (j > i - w)  # the w most recent keys, itself included
    allowed = allowed[None].expand(batch, length, length)
    if doc_ids is not None:
        d = torch.from_numpy(np.asarray(doc_ids))
        allowed = allowed & (d[:, :, None] == d[:, None, :])
    if key_padding_mask is not None:
        allowed = allowed & ~torch.from_numpy(np.asarray(key_padding_mask))[:, None, :]
    return allowed[:, None]


def t_attention(p, prefix, x, cfg, allowed):
    Bx, Tx, _ = x.shape
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_size
    q = t_linear(p, prefix + ".q_proj", x, cfg.qkv_bias).view(Bx, Tx, H, D).transpose(1, 2)
    k = t_linear(p, prefix + ".k_proj", x, cfg.qkv_bias).view(Bx, Tx, K, D).transpose(1, 2)
    v = t_linear(p, prefix + ".v_proj", x, cfg.qkv_bias).view(Bx, Tx, K, D).transpose(1, 2)
    if cfg.positions == "rope":
        q, k = t_rope(q, cfg), t_rope(k, cfg)
    # GQA / MQA: query head h reads kv head h // (H / K)
    k = k.repeat_interleave(H // K, dim=1)
    v = v.repeat_interleave(H // K, dim=1)
    scale = 1.0 / math.sqrt(D) if cfg.attention_scale is None else cfg.attention_scale
    s = scale * (q @ k.transpose(-1, -2))  # (B, H, T, T)
    if cfg.attention_softcap is not None:
        s = cfg.attention_softcap * torch.tanh(s / cfg.attention_softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    if cfg.softmax == "softmax":
        a = torch.softmax(s, dim=-1)
    elif cfg.softmax == "softmax1":  # an extra logit fixed at 0 whose probability is dropped
        zero = torch.zeros(s.shape[:-1] + (1,), dtype=s.dtype)
        a = torch.softmax(torch.cat([s, zero], dim=-1), dim=-1)[..., :-1]
    else:  # clipped: stretch to [γ, ζ], clip to [0, 1]
        a = torch.clamp((cfg.clip_zeta - cfg.clip_gamma) * torch.softmax(s, dim=-1)
                        + cfg.clip_gamma, 0.0, 1.0)
    o = (a @ v).transpose(1, 2).reshape(Bx, Tx, H * D)
    return t_linear(p, prefix + ".out_proj", o, cfg.out_bias)


def t_ffn(p, prefix, x, cfg):
    if cfg.ffn in ("swiglu", "geglu"):
        g = x @ p(prefix + ".gate.weight").T
        u = x @ p(prefix + ".up.weight").T
        act = F.silu(g) if cfg.ffn == "swiglu" else F.gelu(g)
        return (act * u) @ p(prefix + ".down.weight").T
    h = t_linear(p, prefix + ".up", x, cfg.ffn_bias)
    h = {"relu": F.relu, "gelu": F.gelu,
         "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[cfg.ffn](h)
    return t_linear(p, prefix + ".down", h, cfg.ffn_bias)


def t_sinusoidal(length, dim, dtype):
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    omega = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.empty(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe.to(dtype)


def torch_decoder(cfg, p: TorchParams, ids, doc_ids=None, key_padding_mask=None,
                  window="config"):
    """ids (B, T) → (logits (B, T, V), e (B, T, C) the token vectors, with retain_grad)."""
    ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    Bx, Tx = ids_t.shape
    C = cfg.d_model
    e = F.embedding(ids_t, p("embed.tokens.weight"), padding_idx=cfg.padding_idx)
    e.retain_grad()
    x = e * math.sqrt(C) if cfg.scale_embeddings else e
    if cfg.positions == "learned":
        x = x + p("embed.position_table")[:Tx]
    elif cfg.positions == "sinusoidal":
        x = x + t_sinusoidal(Tx, C, x.dtype)
    for layer in range(cfg.n_layers):
        pre = f"layers.{layer}"
        allowed = t_allowed(cfg, layer, Bx, Tx, doc_ids, key_padding_mask, window)

        def attn(h):
            return t_attention(p, pre + ".attn", h, cfg, allowed)

        def ffn(h):
            return t_ffn(p, pre + ".ffn", h, cfg)

        if cfg.block == "parallel":
            h1 = t_norm(p, pre + ".attn_norm", x, cfg)
            h2 = h1 if cfg.parallel_norms == 1 else t_norm(p, pre + ".ffn_norm", x, cfg)
            x = x + attn(h1) + ffn(h2)
        elif cfg.norm_placement == "pre":
            x = x + attn(t_norm(p, pre + ".attn_norm", x, cfg))
            x = x + ffn(t_norm(p, pre + ".ffn_norm", x, cfg))
        else:
            x = t_norm(p, pre + ".attn_norm", x + attn(x), cfg)
            x = t_norm(p, pre + ".ffn_norm", x + ffn(x), cfg)
    if cfg.final_norm:
        x = t_norm(p, "final_norm", x, cfg)
    if cfg.tie_embeddings:
        logits = x @ p("embed.tokens.weight").T
        if cfg.lm_head_bias:
            logits = logits + p("lm_head_bias")
    else:
        logits = t_linear(p, "lm_head", x, cfg.lm_head_bias)
    return logits * cfg.logit_scale, e


def torch_loss(logits, targets):
    """Mean cross-entropy, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    t = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    return -logp.gather(-1, t[..., None]).mean()


# --------------------------------------------------------------------------------------
# Running both sides
# --------------------------------------------------------------------------------------


def scramble(model, seed=0):
    """Unusual non-zero parameters: norm weights around 1 (not 1), biases non-zero, matrices
    with O(1) outputs, so every path carries a real signal."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif name.endswith("bias"):
            value = 0.1 + 0.3 * rng.standard_normal(p.shape)
        elif name in ("embed.tokens.weight", "embed.position_table"):
            value = 0.6 * rng.standard_normal(p.shape)
        else:  # (out, in) matrices
            value = 0.1 + rng.standard_normal(p.shape) / math.sqrt(p.shape[-1])
        p[...] = value.astype(p.dtype)


def run_both(cfg, ids, targets, *, doc_ids=None, key_padding_mask=None, seed=0, eval_mode=False):
    """Forward and backward through npformer and the torch reference (float64).

    Returns (npformer results, torch results): dicts with logits, loss, d_tok, grads."""
    model = DecoderLM(cfg, seed=seed)
    if eval_mode:
        model.eval()
    scramble(model, seed + 1)
    logits = model.forward(ids, doc_ids, key_padding_mask=key_padding_mask)
    loss, ce = cross_entropy_forward(logits, targets)
    model.zero_grad()
    d_tok = model.backward(cross_entropy_backward(1.0, ce))
    ours = dict(logits=logits, loss=loss, d_tok=d_tok,
                grads={n: g.copy() for n, g in model.gradients().items()})

    params = TorchParams(model.parameters(), F64)
    t_logits, e = torch_decoder(cfg, params, ids, doc_ids, key_padding_mask)
    t_loss = torch_loss(t_logits, targets)
    t_loss.backward()
    assert params.used == set(params.tensors), (
        f"npformer parameters the config does not explain: {sorted(set(params.tensors) - params.used)}")
    theirs = dict(logits=t_logits.detach().numpy(), loss=t_loss.detach().numpy(),
                  d_tok=e.grad.numpy(),
                  grads={n: t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
                         for n, t in params.tensors.items()})
    return ours, theirs


def assert_parity(ours, theirs, dtype):
    """Logits, loss, token-vector gradient and every parameter gradient within the parity
    tolerance of ``dtype``. Returns {what: max rel err}.

    Structural zeros: without RoPE (or soft-capping) the key biases' gradients are exactly 0
    in exact arithmetic (softmax ignores a shift shared by a whole row of scores, and q·b_k is
    such a shift), and both sides give rounding noise ~1e-17 there, whose relative difference
    means nothing. In float64 a tensor whose reference is below 1e-12 × the model's largest
    gradient is therefore held to an absolute 1e-14 × that gradient instead; every other
    tensor gets the plain relative tolerance. (float32 has its own atol of 1e-5.)"""
    dtype = np.dtype(dtype)
    assert ours["logits"].dtype == dtype and ours["d_tok"].dtype == dtype
    assert set(ours["grads"]) == set(theirs["grads"])
    errors = {}
    for what in ("logits", "loss", "d_tok"):
        assert_close(ours[what], theirs[what], dtype, what)
        errors[what] = max_errors(ours[what], theirs[what])[1]
    scale = max(float(np.max(np.abs(g))) for g in theirs["grads"].values())
    for name, g in ours["grads"].items():
        assert g.dtype == dtype, f"{name}: gradient dtype {g.dtype}, model is {dtype}"
        structural_zero = float(np.max(np.abs(theirs["grads"][name]))) <= 1e-12 * scale
        atol = 1e-14 * scale if dtype == F64 and structural_zero else None
        assert_close(g, theirs["grads"][name], dtype, name, atol=atol)
        errors[name] = max_errors(g, theirs["grads"][name])[1]
    return errors


def tokens(seed, batch=B, length=T, vocab=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, length)), rng.integers(0, vocab, (batch, length))


# --------------------------------------------------------------------------------------
# 1. Every decoder preset, float64
# --------------------------------------------------------------------------------------


def test_every_decoder_preset_is_covered():
    assert {"gpt2", "llama2"} <= set(DECODER_PRESETS)
    assert len(DECODER_PRESETS) == len(preset_names()) - 1


@pytest.mark.parametrize("name", DECODER_PRESETS)
def test_preset_float64_parity(name):
    cfg = tiny_config(name, **AWKWARD)
    ids, targets = tokens(DECODER_PRESETS.index(name))
    ours, theirs = run_both(cfg, ids, targets)
    assert_parity(ours, theirs, F64)


# --------------------------------------------------------------------------------------
# 2. float32 models against the float64 reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_preset_float32_parity_against_float64_torch(name):
    cfg = tiny_config(name, dtype="float32", **AWKWARD)
    ids, targets = tokens(7)
    ours, theirs = run_both(cfg, ids, targets)
    assert ours["loss"].dtype == F32
    assert all(g.dtype == F32 for g in ours["grads"].values())
    assert_parity(ours, theirs, F32)


# --------------------------------------------------------------------------------------
# 3. Llama 3's document mask
# --------------------------------------------------------------------------------------

# packed rows: a one-token document first, in the middle and last; ids need not be sorted
DOC_IDS = np.array([
    [4, 0, 0, 0, 0, 2, 2, 2, 2],
    [1, 1, 1, 3, 5, 5, 5, 5, 5],
    [0, 0, 0, 0, 7, 7, 7, 7, 6],
])


def test_llama3_document_mask_parity():
    cfg = tiny_config("llama3", **AWKWARD)
    ids, targets = tokens(3, batch=3, length=9)
    ours, theirs = run_both(cfg, ids, targets, doc_ids=DOC_IDS)
    assert_parity(ours, theirs, F64)
    # the mask matters: without it the reference gives other logits
    model = DecoderLM(cfg)
    scramble(model, 1)
    params = TorchParams(model.parameters(), F64)
    unmasked, _ = torch_decoder(cfg, params, ids)
    assert max_errors(ours["logits"], unmasked.detach().numpy())[1] > 1e-3


def test_llama3_each_document_equals_the_document_alone():
    """RoPE scores depend on relative positions only, so with the document mask each packed
    document's logits are those of the document run on its own."""
    cfg = tiny_config("llama3", **AWKWARD)
    model = DecoderLM(cfg)
    scramble(model, 5)
    ids, _ = tokens(4, batch=3, length=9)
    packed = model.forward(ids, DOC_IDS)
    for b in range(DOC_IDS.shape[0]):
        for doc in np.unique(DOC_IDS[b]):
            cols = np.flatnonzero(DOC_IDS[b] == doc)
            alone = model.forward(ids[b:b + 1, cols])
            assert_close(packed[b, cols], alone[0], F64, f"row {b} doc {doc}")


# --------------------------------------------------------------------------------------
# 4. Local (banded) layers with T longer than the window
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt3", "gpt-neo"])
def test_local_layers_with_sequences_longer_than_the_window(name):
    cfg = tiny_config(name, **AWKWARD)
    length = 13
    assert "local" in cfg.attention_pattern and cfg.window < length - 2
    ids, targets = tokens(11, length=length)
    ours, theirs = run_both(cfg, ids, targets)
    assert_parity(ours, theirs, F64)
    # the band matters: the same weights with every layer dense give other logits
    model = DecoderLM(cfg)
    scramble(model, 1)
    dense, _ = torch_decoder(cfg, TorchParams(model.parameters(), F64), ids, window=None)
    assert max_errors(ours["logits"], dense.detach().numpy())[1] > 1e-3


# --------------------------------------------------------------------------------------
# 5. Switches no preset sets (or sets differently), float64
# --------------------------------------------------------------------------------------

SWITCHES = {
    "gpt2-scaled-embeddings-logit-scale-head-bias-padding": (
        "gpt2", dict(scale_embeddings=True, logit_scale=1.7, lm_head_bias=True, padding_idx=3)),
    "gpt2-sinusoidal-relu": ("gpt2", dict(positions="sinusoidal", ffn="relu")),
    "gpt2-no-positions-geglu": ("gpt2", dict(positions="none", ffn="geglu", ffn_bias=False)),
    "gpt2-exact-gelu-no-final-norm": ("gpt2", dict(ffn="gelu", final_norm=False)),
    "gpt2-softcap-scale": ("gpt2", dict(attention_softcap=1.5, attention_scale=0.9)),
    "llama1-post-rmsnorm": ("llama1", dict(norm_placement="post")),
    "llama1-softmax1": ("llama1", dict(softmax="softmax1")),
    "llama1-clipped": ("llama1", dict(softmax="clipped", clip_gamma=-0.05, clip_zeta=1.02)),
    "llama2-mqa-theta": ("llama2", dict(n_kv_heads=1, rope_theta=123.0)),
    "gpt-neox-one-norm-interleaved-rotary2": (
        "gpt-neox", dict(parallel_norms=1, rope_layout="interleaved", rotary_dim=2)),
    "gpt-j-two-norms-no-final-norm": ("gpt-j", dict(parallel_norms=2, final_norm=False)),
    "gpt-neo-window1-local-first": (
        "gpt-neo", dict(attention_pattern=("local", "dense", "local"), window=1)),
}


@pytest.mark.parametrize("case", sorted(SWITCHES))
def test_switch_float64_parity(case):
    name, overrides = SWITCHES[case]
    cfg = tiny_config(name, **{**AWKWARD, **overrides})
    ids, targets = tokens(17)
    ours, theirs = run_both(cfg, ids, targets)
    assert_parity(ours, theirs, F64)


def test_eval_mode_turns_dropout_off():
    cfg = tiny_config("gpt2", n_layers=3, dropout=0.3)
    ids, targets = tokens(19)
    ours, theirs = run_both(cfg, ids, targets, eval_mode=True)
    assert_parity(ours, theirs, F64)


def test_key_padding_mask_parity():
    cfg = tiny_config("llama2", **AWKWARD)
    ids, targets = tokens(23)
    pad = np.zeros((B, T), dtype=bool)
    pad[0, -2:] = True  # right padding: every query still sees a key
    pad[1, 3] = True
    ours, theirs = run_both(cfg, ids, targets, key_padding_mask=pad)
    assert_parity(ours, theirs, F64)
