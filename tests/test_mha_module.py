"""MultiHeadAttention module: finite differences, KV-cache decoding, torch.nn.MultiheadAttention
and Hugging Face GPT-Neo local-attention parity, gradient accumulation, bad input."""

import types

import numpy as np
import pytest
import torch

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.checks.modules import check_module, randomize_parameters
from npformer.gradcheck import run_checks
from npformer.nn.attention import KVCache, MultiHeadAttention


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["mha_module"]))


@pytest.mark.parametrize("options", [
    dict(n_kv_heads=4, causal=True),
    dict(n_kv_heads=1, causal=True, qkv_bias=False, out_bias=False),           # multi-query (PaLM)
    dict(n_kv_heads=2, causal=True, rope=True, rope_layout="interleaved"),     # GQA + GPT-J RoPE
    dict(n_kv_heads=2, causal=True, window=2, softcap=3.0, fused_qkv=True),
    dict(n_kv_heads=4, causal=False, softmax="softmax1", scale=1.0),
])
def test_finite_differences(options):
    rng = np.random.default_rng(len(options))
    mha = MultiHeadAttention(8, 4, head_dim=4, rng=rng, **options)
    randomize_parameters(mha, rng)
    x = rng.standard_normal((2, 5, 8)) * 0.9 - 0.1
    assert_gradcheck_passes(check_module("mha", mha, lambda x: mha.forward(x), {"x": x}))


def test_document_mask_finite_differences():
    rng = np.random.default_rng(3)
    mha = MultiHeadAttention(8, 2, rope=True, rng=rng)
    randomize_parameters(mha, rng)
    x = rng.standard_normal((2, 6, 8))
    doc_ids = np.array([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    position_ids = np.array([[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]])
    reports = check_module(
        "mha_doc", mha, lambda x: mha.forward(x, doc_ids=doc_ids, position_ids=position_ids), {"x": x})
    assert_gradcheck_passes(reports)


@pytest.mark.parametrize("options", [
    dict(n_kv_heads=3),                                                   # causal MHA
    dict(n_kv_heads=3, window=3),                                         # sliding window
    dict(n_kv_heads=1, rope=True, rope_theta=500000.0),                   # MQA + RoPE (Llama 3 theta)
    dict(n_kv_heads=3, rope=True, rotary_dim=2, rope_layout="interleaved", softcap=2.0),
    dict(n_kv_heads=3, fused_qkv=True, softmax="softmax1"),
])
def test_kv_cache_decoding_equals_full_forward(options):
    rng = np.random.default_rng(7)
    mha = MultiHeadAttention(12, 6, head_dim=4, rng=rng, **options)  # GQA ratio 2 where K = 3
    randomize_parameters(mha, rng)
    x = rng.standard_normal((2, 9, 12))
    full, _ = mha.forward(x)
    cache = KVCache()
    pieces = []
    # a prompt of 4 tokens at once, then one token at a time, then a 2-token chunk
    for start, stop in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 9)]:
        y, _ = mha.forward(x[:, start:stop], kv_cache=cache)
        pieces.append(y)
    assert cache.length == 9
    incremental = np.concatenate(pieces, axis=1)
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-12 * np.abs(full).max())


def test_kv_cache_decoding_with_documents():
    rng = np.random.default_rng(8)
    mha = MultiHeadAttention(8, 4, 2, rope=True, rng=rng)
    randomize_parameters(mha, rng)
    x = rng.standard_normal((1, 6, 8))
    doc_ids = np.array([[0, 0, 0, 1, 1, 1]])
    full, _ = mha.forward(x, doc_ids=doc_ids)
    cache = KVCache()
    pieces = [mha.forward(x[:, t:t + 1], doc_ids=doc_ids[:, t:t + 1], kv_cache=cache)[0] for t in range(6)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-12)


def test_backward_through_kv_cache_is_refused():
    mha = MultiHeadAttention(4, 2)
    y, cache = mha.forward(np.ones((1, 2, 4)), kv_cache=KVCache())
    with pytest.raises(ValueError, match="inference"):
        mha.backward(np.ones_like(y), cache)


def test_two_calls_accumulate_both_gradients():
    # DESIGN habit 1: two uses of one module must give two caches and summed gradients
    rng = np.random.default_rng(9)
    mha = MultiHeadAttention(6, 3, rng=rng)
    randomize_parameters(mha, rng)
    x1, x2 = rng.standard_normal((2, 4, 6)), rng.standard_normal((1, 3, 6))
    d1, d2 = rng.standard_normal((2, 4, 6)), rng.standard_normal((1, 3, 6))
    y1, c1 = mha.forward(x1)
    y2, c2 = mha.forward(x2)
    mha.zero_grad()
    mha.backward(d2, c2)
    mha.backward(d1, c1)
    both = {k: v.copy() for k, v in mha.gradients().items()}
    separate = {}
    for x, d in ((x1, d1), (x2, d2)):
        mha.zero_grad()
        mha.backward(d, mha.forward(x)[1])
        for k, v in mha.gradients().items():
            separate[k] = separate.get(k, 0) + v
    for k in both:
        np.testing.assert_allclose(both[k], separate[k], rtol=1e-13, atol=1e-15)


def _torch_mha_from(mha, dtype):
    """torch.nn.MultiheadAttention with our fused [W_q; W_k; W_v] weights."""
    C = mha.d_model
    ref = torch.nn.MultiheadAttention(C, mha.n_heads, bias=True, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.copy_(to_torch(mha.qkv_proj.params["weight"]))
        ref.in_proj_bias.copy_(to_torch(mha.qkv_proj.params["bias"]))
        ref.out_proj.weight.copy_(to_torch(mha.out_proj.params["weight"]))
        ref.out_proj.bias.copy_(to_torch(mha.out_proj.params["bias"]))
    return ref.to(torch.float32 if dtype == np.float32 else torch.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["self", "causal", "cross", "padding"])
def test_torch_multihead_attention_parity(dtype, mode):
    rng = np.random.default_rng(10)
    C, H, B, T, S = 12, 3, 2, 5, 7
    cross = mode == "cross"
    mha = MultiHeadAttention(C, H, fused_qkv=True, causal=mode == "causal", cross=cross,
                             rng=rng, dtype=dtype)
    randomize_parameters(mha, rng)
    ref = _torch_mha_from(mha, dtype)
    x = (rng.standard_normal((B, T, C)) * 1.3).astype(dtype)
    memory = (rng.standard_normal((B, S, C)) - 0.3).astype(dtype) if cross else None
    padding = None
    if mode == "padding":
        padding = np.zeros((B, T), dtype=bool)
        padding[1, -2:] = True  # the last two keys of the second sequence are padding
    y, cache = mha.forward(x, memory=memory, key_padding_mask=padding)
    dy = rng.standard_normal(y.shape).astype(dtype)
    mha.zero_grad()
    grads = mha.backward(dy, cache)
    dx, dmemory = grads if cross else (grads, None)

    xt = to_torch(x, True)
    mt = to_torch(memory, True) if cross else xt
    mask = None
    if mode == "causal":
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = not allowed
    yt, _ = ref(xt, mt, mt, attn_mask=mask, need_weights=False,
                key_padding_mask=None if padding is None else torch.from_numpy(padding))
    yt.backward(to_torch(dy))
    assert y.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    if cross:
        assert_close(dmemory, mt.grad, dtype, "dmemory")
    ours = mha.gradients()
    assert_close(ours["qkv_proj.weight"], ref.in_proj_weight.grad, dtype, "in_proj_weight")
    assert_close(ours["qkv_proj.bias"], ref.in_proj_bias.grad, dtype, "in_proj_bias")
    assert_close(ours["out_proj.weight"], ref.out_proj.weight.grad, dtype, "out_proj.weight")
    assert_close(ours["out_proj.bias"], ref.out_proj.bias.grad, dtype, "out_proj.bias")


class _TorchInModelDtype:
    """Stands in for the ``torch`` module inside GPT-Neo's ``_attn`` so that its
    ``query.to(torch.float32)`` keeps the model's float64: stock GPT-Neo computes attention
    scores in float32 even in a float64 model, which would cap parity at ~1e-7."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpt_neo_local_attention_parity(dtype):
    from transformers import GPTNeoConfig
    from transformers.models.gpt_neo import modeling_gpt_neo

    C, H, T, window = 12, 3, 9, 4
    config = GPTNeoConfig(hidden_size=C, num_heads=H, num_layers=2, window_size=window,
                          max_position_embeddings=32, attention_types=[[["global", "local"], 1]],
                          attention_dropout=0.0, resid_dropout=0.0)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    ref = modeling_gpt_neo.GPTNeoSelfAttention(config, "local", layer_id=1).to(torch_dtype)
    if dtype == np.float64:  # the documented patch: scores in the model's dtype
        original = modeling_gpt_neo.GPTNeoSelfAttention._attn
        patched = types.FunctionType(original.__code__, {**original.__globals__, "torch": _TorchInModelDtype()})
        ref._attn = types.MethodType(patched, ref)
    rng = np.random.default_rng(12)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.5))
    # GPT-Neo: no q/k/v biases, an output bias, no 1/sqrt(D) scaling, window i-w < j <= i
    mha = MultiHeadAttention(C, H, qkv_bias=False, out_bias=True, causal=True, window=window,
                             scale=1.0, dtype=dtype)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(mha, name).params["weight"][...] = getattr(ref, name).weight.detach().numpy()
    mha.out_proj.params["bias"][...] = ref.out_proj.bias.detach().numpy()

    x = rng.standard_normal((2, T, C)).astype(dtype)
    y, cache = mha.forward(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    mha.zero_grad()
    dx = mha.backward(dy, cache)
    xt = to_torch(x, True)
    yt, _ = ref(xt)
    yt.backward(to_torch(dy))
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert_close(mha.gradients()[f"{name}.weight"], getattr(ref, name).weight.grad, dtype, name)
    assert_close(mha.gradients()["out_proj.bias"], ref.out_proj.bias.grad, dtype, "out_proj.bias")


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        MultiHeadAttention(12, 6, 4)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="rotary_dim"):
        MultiHeadAttention(8, 2, rope=True, rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        MultiHeadAttention(8, 2, rope=True, rotary_dim=6)
    with pytest.raises(ValueError, match="cross-attention takes no causal"):
        MultiHeadAttention(8, 2, cross=True)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="d_model=8"):
        mha.forward(np.ones((1, 3, 7)))
    with pytest.raises(ValueError, match="only for cross-attention"):
        mha.forward(np.ones((1, 3, 8)), memory=np.ones((1, 3, 8)))
    with pytest.raises(ValueError, match="NaN"):
        mha.forward(np.full((1, 3, 8), np.nan))
    cross = MultiHeadAttention(8, 2, causal=False, cross=True)
    with pytest.raises(ValueError, match="needs memory"):
        cross.forward(np.ones((1, 3, 8)))
