"""attention (the NumPy reference): finite differences over every mask and variant and their
combination, PyTorch parity (scaled_dot_product_attention with hand-built masks, and the
softmax₁ / clipped / soft-capped formulas written in torch), fully masked rows, head
sharing, stability, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.attention import attention_backward, attention_forward
from npformer.gradcheck import check_pair, run_checks

CHECKS = ["attention_mha", "attention_mqa", "attention_gqa", "attention_causal",
          "attention_window", "attention_document", "attention_cross", "attention_padding",
          "attention_softmax1", "attention_clipped", "attention_softcap"]


def _qkv(rng, B, H, K, T, S, D, Dv, dtype=np.float64, spread=1.0):
    q = ((rng.standard_normal((B, H, T, D)) * 1.2 + 0.3) * spread).astype(dtype)
    k = (rng.standard_normal((B, K, S, D)) * 0.8 - 0.4).astype(dtype)
    v = (rng.standard_normal((B, K, S, Dv)) * 1.5 + 0.6).astype(dtype)
    return q, k, v


# ---- masks built by hand, independently of npformer.functional.attention_mask -----------


def hand_mask(B, T, S, causal=False, window=None, doc_ids=None, key_padding_mask=None):
    """(B, 1, T, S) bool, True = attend, one entry at a time."""
    allowed = np.ones((B, 1, T, S), dtype=bool)
    for b in range(B):
        for i in range(T):
            position = S - T + i  # bottom-right: the queries are the last T positions
            for j in range(S):
                if causal and j > position:
                    allowed[b, 0, i, j] = False
                if window is not None and j <= position - window:  # band: pos − w < j
                    allowed[b, 0, i, j] = False
                if doc_ids is not None and doc_ids[b, j] != doc_ids[b, position]:
                    allowed[b, 0, i, j] = False
                if key_padding_mask is not None and key_padding_mask[b, j]:
                    allowed[b, 0, i, j] = False
    return allowed


def _clip_preactivations(q, k, v, gamma, zeta, **kwargs):
    """u = (ζ − γ)·softmax(s) + γ at the allowed entries (to keep FD inputs off the kinks)."""
    _, cache = attention_forward(q, k, v, softmax="softmax", **kwargs)
    u = (zeta - gamma) * cache.P + gamma
    if cache.allowed is not None:
        u = u[np.broadcast_to(cache.allowed, u.shape)]
    return u


# ---- finite differences ----------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKS)
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


DOCS = np.array([[2, 2, 9, 9, 9, 4, 4], [1, 1, 1, 1, 3, 5, 5]])  # (B=2, S=7), a 1-token doc
PADDING = np.array([[0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0]], dtype=bool)  # (B=2, S=7)

FD_CASES = [
    # (H, K, T, S, kwargs)
    (4, 4, 5, 7, dict()),
    (6, 3, 5, 7, dict(causal=True, scale=0.45)),
    (6, 2, 7, 7, dict(causal=True, window=2)),
    (6, 1, 3, 7, dict(causal=True, window=3, softcap=1.1)),
    (4, 2, 7, 7, dict(doc_ids=DOCS)),  # bidirectional within documents (packed encoder)
    (6, 2, 5, 7, dict(causal=True, window=3, doc_ids=DOCS, key_padding_mask=PADDING,
                      softcap=2.2)),  # everything at once
    (6, 3, 5, 7, dict(causal=True, window=4, doc_ids=DOCS, key_padding_mask=PADDING,
                      softcap=1.7, softmax="softmax1")),
    (6, 2, 5, 7, dict(causal=True, window=3, doc_ids=DOCS, key_padding_mask=PADDING,
                      softcap=2.2, softmax="clipped", clip_gamma=-0.06, clip_zeta=1.05)),
]


@pytest.mark.parametrize("case", range(len(FD_CASES)))
def test_finite_differences(case):
    H, K, T, S, kwargs = FD_CASES[case]
    rng = np.random.default_rng(100 + case)
    q, k, v = _qkv(rng, 2, H, K, T, S, 3, 2, spread=1.4)
    if kwargs.get("softmax") == "clipped":
        others = {a: b for a, b in kwargs.items()
                  if a not in ("softmax", "clip_gamma", "clip_zeta")}
        u = _clip_preactivations(q, k, v, kwargs["clip_gamma"], kwargs["clip_zeta"], **others)
        assert (u < 0).any() and ((u > 0) & (u < 1)).any()
        assert min(np.abs(u).min(), np.abs(u - 1).min()) > 1e-4  # off the kinks
    inputs = dict(q=q, k=k, v=v, **kwargs)
    assert_gradcheck_passes(
        check_pair("attention", attention_forward, attention_backward, inputs, ("q", "k", "v"))
    )


# ---- PyTorch parity ----------------------------------------------------------------------


def torch_attention(q, k, v, allowed, scale, softmax="softmax", gamma=-0.03, zeta=1.0, cap=None):
    """The forward written out in torch; autograd supplies the gradients. q (B, H, T, D)."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)  # (B, H, S, D): head h reads kv head h // G
    v = v.repeat_interleave(G, dim=1)  # (the backward of repeat_interleave sums the copies)
    s = scale * q @ k.transpose(-1, -2)  # (B, H, T, S)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if softmax == "softmax":
        p = torch.softmax(s, dim=-1)
    elif softmax == "softmax1":
        m = s.amax(dim=-1, keepdim=True).clamp(min=0).detach()
        e = torch.exp(s - m)
        p = e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))
    else:
        p = torch.clamp((zeta - gamma) * torch.softmax(s, dim=-1) + gamma, 0, 1)
    return p @ v


def _compare(dtype, B, H, K, T, S, D, Dv, kwargs, allowed, seed, reference="sdpa"):
    """Ours against torch, outputs and all three gradients.

    allowed: the hand-built (B, 1, T, S) mask, or None. Rows with no allowed key: torch's
    softmax gives NaN there (0/0), ours exactly 0. Torch gets those rows un-masked and a zero
    upstream gradient (so they contribute nothing to dk, dv); ours keeps its nonzero do and
    must still give o = 0, dq = 0 there and the same dk, dv.
    """
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D, Dv, dtype, spread=1.5)
    o, cache = attention_forward(q, k, v, **kwargs)
    do = (rng.standard_normal(o.shape) * 1.1 - 0.2).astype(dtype)
    dq, dk, dv = attention_backward(do, cache)
    assert o.shape == (B, H, T, Dv) and dq.shape == q.shape and dk.shape == k.shape
    assert dv.shape == v.shape
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype

    live = np.ones((B, 1, T), dtype=bool) if allowed is None else allowed.any(axis=-1)
    live_h = np.broadcast_to(live, (B, H, T))  # (B, H, T) rows with at least one key
    torch_mask = None if allowed is None else torch.from_numpy(allowed | ~live[..., None])
    qt, kt, vt = to_torch(q, True), to_torch(k, True), to_torch(v, True)
    scale = kwargs.get("scale") or 1 / np.sqrt(D)
    if reference == "sdpa":
        ot = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch_mask,
                                            scale=kwargs.get("scale"), enable_gqa=K < H)
    else:
        ot = torch_attention(qt, kt, vt, torch_mask, scale, kwargs.get("softmax", "softmax"),
                             kwargs.get("clip_gamma", -0.03), kwargs.get("clip_zeta", 1.0),
                             kwargs.get("softcap"))
    ot.backward(to_torch(do * live_h[..., None]))
    assert_close(o[live_h], ot.detach().numpy()[live_h], dtype, "o")
    assert_close(dq[live_h], qt.grad.numpy()[live_h], dtype, "dq")
    assert_close(dk, kt.grad, dtype, "dk")
    assert_close(dv, vt.grad, dtype, "dv")
    # fully masked rows: exact zeros, not NaN
    np.testing.assert_array_equal(o[~live_h], 0.0)
    np.testing.assert_array_equal(dq[~live_h], 0.0)
    return live


SDPA_CASES = [
    # (B, H, K, T, S, D, Dv, kwargs)
    (2, 3, 3, 5, 5, 3, 4, dict()),  # multi-head
    (2, 4, 1, 5, 5, 3, 3, dict(scale=1.0)),  # multi-query, GPT-Neo's unscaled scores
    (2, 6, 2, 5, 5, 3, 3, dict(causal=True)),  # grouped-query, G = 3
    (1, 6, 3, 3, 7, 5, 3, dict(causal=True, scale=0.37)),  # bottom-right, T < S, G = 2
    (2, 6, 3, 1, 6, 3, 3, dict(causal=True)),  # one decoding step
    (2, 3, 3, 7, 7, 3, 3, dict(causal=True, window=3)),  # sliding window
    (2, 6, 2, 4, 9, 3, 3, dict(causal=True, window=2)),  # window with T < S
    (2, 4, 2, 7, 7, 3, 3, dict(causal=True, doc_ids=DOCS)),  # Llama 3 document mask
    (2, 4, 2, 5, 7, 3, 3, dict(doc_ids=DOCS)),  # documents, bidirectional, T < S
    (2, 3, 3, 5, 7, 3, 4, dict(key_padding_mask=PADDING)),  # cross-attention with padding
    (2, 6, 2, 5, 7, 3, 2, dict(causal=True, window=3, doc_ids=DOCS, key_padding_mask=PADDING)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(SDPA_CASES)))
def test_sdpa_parity(dtype, case):
    B, H, K, T, S, D, Dv, kwargs = SDPA_CASES[case]
    masks = {name: kwargs.get(name) for name in ("causal", "window", "doc_ids", "key_padding_mask")}
    allowed = hand_mask(B, T, S, **masks) if any(x is not None for x in masks.values()) else None
    _compare(dtype, B, H, K, T, S, D, Dv, kwargs, allowed, seed=200 + case)


VARIANT_CASES = [
    (6, 3, 5, 7, dict(causal=True, softmax="softmax1")),
    (4, 1, 5, 5, dict(softmax="softmax1", key_padding_mask=PADDING[:, 1:6])),
    (6, 2, 7, 7, dict(causal=True, window=4, softmax="clipped")),
    (3, 3, 5, 7, dict(softmax="clipped", clip_gamma=-0.1, clip_zeta=1.08, scale=1.3)),
    (6, 2, 5, 7, dict(causal=True, doc_ids=DOCS, softcap=2.0)),
    (4, 4, 5, 7, dict(softcap=0.9, key_padding_mask=PADDING)),
    (6, 3, 5, 7, dict(causal=True, window=3, doc_ids=DOCS, key_padding_mask=PADDING,
                      softcap=1.6, softmax="softmax1")),
    (6, 2, 5, 7, dict(causal=True, doc_ids=DOCS, key_padding_mask=PADDING, softcap=3.0,
                      softmax="clipped", clip_gamma=-0.05, clip_zeta=1.1)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(VARIANT_CASES)))
def test_variant_parity(dtype, case):
    H, K, T, S, kwargs = VARIANT_CASES[case]
    masks = {name: kwargs.get(name) for name in ("causal", "window", "doc_ids", "key_padding_mask")}
    allowed = hand_mask(2, T, S, **{n: (False if n == "causal" and x is None else x)
                                     for n, x in masks.items()})
    _compare(dtype, 2, H, K, T, S, 3, 3, kwargs, allowed, seed=300 + case, reference="formula")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("softmax", ["softmax", "softmax1", "clipped"])
def test_fully_masked_rows_give_zeros(dtype, softmax):
    # batch row 1 is all padding; in row 0, documents + a padded key leave query 0 with nothing
    padding = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    docs = np.array([[0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0]])
    allowed = hand_mask(2, 6, 6, causal=True, doc_ids=docs, key_padding_mask=padding)
    assert not allowed[0, 0, 0].any() and not allowed[1].any() and allowed[0, 0, 1:].any(-1).all()
    kwargs = dict(causal=True, doc_ids=docs, key_padding_mask=padding, softmax=softmax, softcap=2.5)
    with np.errstate(invalid="raise", divide="raise"):
        live = _compare(dtype, 2, 6, 2, 6, 6, 3, 3, kwargs, allowed, seed=7, reference="formula")
    assert not live[1].any()
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, 2, 6, 2, 6, 6, 3, 3, dtype)
    o, cache = attention_forward(q, k, v, **kwargs)
    dq, dk, dv = attention_backward(np.ones_like(o), cache)
    for a in (o, dq, dk, dv):
        np.testing.assert_array_equal(a[1], 0.0)  # the fully padded batch row
        assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(o[0, :, 0], 0.0)
    np.testing.assert_array_equal(dk[0, :, 0], 0.0)  # the padded key receives no gradient


# ---- head sharing, caches, stability -------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 3])
def test_shared_heads_equal_repeated_heads(K):
    # grouped-query attention = multi-head attention on k, v repeated G times, with the
    # copies' gradients summed; query head h reads kv head h // G (not h % K)
    H, G = 6, 6 // K
    rng = np.random.default_rng(K)
    q, k, v = _qkv(rng, 2, H, K, 5, 7, 3, 4)
    kwargs = dict(causal=True, window=4, softcap=2.0)
    o, cache = attention_forward(q, k, v, **kwargs)
    do = rng.standard_normal(o.shape)
    dq, dk, dv = attention_backward(do, cache)
    k_rep, v_rep = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # (B, H, S, ·)
    o_rep, cache_rep = attention_forward(q, k_rep, v_rep, **kwargs)
    dq_rep, dk_rep, dv_rep = attention_backward(do, cache_rep)
    np.testing.assert_allclose(o, o_rep, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dq, dq_rep, rtol=1e-13, atol=1e-15)
    dk_sum = dk_rep.reshape(2, K, G, 7, 3).sum(axis=2)  # the G copies of each kv head
    dv_sum = dv_rep.reshape(2, K, G, 7, 4).sum(axis=2)
    np.testing.assert_allclose(dk, dk_sum, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dv, dv_sum, rtol=1e-12, atol=1e-14)


def test_two_forwards_keep_independent_caches():
    rng = np.random.default_rng(9)
    q1, k1, v1 = _qkv(rng, 2, 4, 2, 5, 5, 3, 3)
    q2, k2, v2 = _qkv(rng, 2, 4, 2, 5, 5, 3, 3)
    do = rng.standard_normal((2, 4, 5, 3))
    _, cache1 = attention_forward(q1, k1, v1, causal=True)
    expected = attention_backward(do, cache1)
    _, cache1 = attention_forward(q1, k1, v1, causal=True)
    _, cache2 = attention_forward(q2, k2, v2, causal=True)
    for a, b in zip(attention_backward(do, cache1), expected):
        np.testing.assert_array_equal(a, b)


def test_default_scale_and_window_gpt_neo_convention():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, 1, 2, 2, 4, 4, 5, 3)
    o_default, _ = attention_forward(q, k, v)
    o_explicit, _ = attention_forward(q, k, v, scale=1 / np.sqrt(5))
    np.testing.assert_allclose(o_default, o_explicit, rtol=1e-15)
    # window = 1: every query sees only itself, so o = v of its own position
    o, _ = attention_forward(q, k, v, causal=True, window=1)
    np.testing.assert_allclose(o, v, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(softmax="softmax1"),
                                    dict(softmax="clipped"), dict(causal=True, softcap=50.0)])
def test_large_inputs_are_stable(dtype, kwargs):
    # queries of magnitude 1e4: scores around ±1e4, one-hot attention, no overflow
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 2, 4, 2, 5, 5, 3, 3, dtype)
    q = (q * 1e4).astype(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        o, cache = attention_forward(q, k, v, **kwargs)
        grads = attention_backward(np.ones_like(o), cache)
    for a in (o,) + grads:
        assert a.dtype == dtype and np.all(np.isfinite(a))
    # every output is a weighted average of values (weights in [0, 1], sum ≤ 1): no blow-up
    bound = np.abs(v).sum(axis=2).max()
    assert np.abs(o).max() <= bound


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 2, 6, 2, 5, 7, 3, 4)
    docs = np.zeros((2, 7), dtype=np.int64)
    padding = np.zeros((2, 7), dtype=bool)
    cases = [
        (dict(k=k[:, :1].repeat(4, axis=1), v=v[:, :1].repeat(4, axis=1)),
         r"n_heads H = q.shape\[1\] = 6 must be divisible by n_kv_heads K = k.shape\[1\] = 4"
         r".*\[1, 2, 3, 6\]"),
        (dict(k=k[:1]), "share the batch size"),
        (dict(v=v[:1]), "share the batch size"),
        (dict(k=k[..., :2]), r"head size D = q.shape\[3\] = 3"),
        (dict(v=v[:, :, :6]), r"v must have the kv heads and length of k"),
        (dict(v=v[:, :1]), r"v must have the kv heads and length of k"),
        (dict(q=q[0]), r"q must be 4-D \(B, H, T, D\)"),
        (dict(k=k[:, :, :0]), "no empty axis"),
        (dict(window=0, causal=True), r"window must be an integer >= 1, got 0"),
        (dict(window=3), "window=3 needs causal=True"),
        (dict(q=np.concatenate([q, q], axis=2), causal=True),
         r"causal attention needs T <= S.*T=10, S=7"),
        (dict(doc_ids=docs[:, :5]), r"doc_ids must have shape \(2, 7\)"),
        (dict(doc_ids=docs.astype(np.float64)), "doc_ids must be an integer array"),
        (dict(key_padding_mask=padding[:1]), r"key_padding_mask must have shape \(2, 7\)"),
        (dict(key_padding_mask=padding.astype(np.float32)), "key_padding_mask must be a bool"),
        (dict(softmax="sparsemax"),
         r"softmax must be one of \['clipped', 'sink', 'softmax', 'softmax1'\], got 'sparsemax'"),
        (dict(softmax="clipped", clip_gamma=0.02), r"clip_gamma must be <= 0.*got 0.02"),
        (dict(softmax="clipped", clip_zeta=0.97), r"clip_zeta must be >= 1.*got 0.97"),
        (dict(softcap=0.0), r"softcap must be a finite number > 0, got 0.0"),
        (dict(softcap=-3.0), r"softcap must be a finite number > 0, got -3.0"),
        (dict(scale=0.0), r"scale must be a finite number > 0"),
        (dict(q=np.where(np.arange(3) == 1, np.nan, q)), r"q contains 60 NaN"),
        (dict(v=v.astype(np.int64)), "v must be a floating-point array"),
        (dict(k=k.astype(np.float32)), "k has dtype float32 but q has dtype float64"),
    ]
    for override, message in cases:
        args = dict(q=q, k=k, v=v)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            attention_forward(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    o, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"do must have shape \(2, 6, 5, 4\)"):
        attention_backward(o[..., :3], cache)
    with pytest.raises(ValueError, match="dtype"):
        attention_backward(o.astype(np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        attention_backward(o * np.nan, cache)
