"""Clipped softmax with a per-row γ and the length-aware γ_t = −clip_alpha / n_t of
``softmax="clipped"`` + ``clip_alpha``: the functional pair, the attention core, the model
(torch parity, KV-cache decoding, the kernels' fallback) and the errors."""

import numpy as np
import pytest

from helpers import (assert_close, assert_gradcheck_passes, decoded_logits, forward_backward,
                     random_weight_model, to_torch)
from npformer.checks.attention import _length_aware_inputs
from npformer.config import ModelConfig
from npformer.functional.attention import (attention_backward, attention_forward,
                                           length_aware_gamma)
from npformer.functional.attention_mask import attention_mask
from npformer.functional.softmax_variants import (clipped_softmax_backward,
                                                  clipped_softmax_forward)
from npformer.gradcheck import check_pair, run_checks
from npformer.kernels.flash_attention import flash_attention_forward
from npformer.kernels.flash_attention_reference import flash_attention_reference_forward


def _scores(rng, shape, spread=2.0):
    x = rng.standard_normal(shape) * spread + 0.3
    x[0, 1, 2] = -np.inf
    x[1, 2, :] = -np.inf  # a fully masked row
    return x


# ---- the pair with a per-row γ ----------------------------------------------------------

def test_a_per_row_gamma_filled_with_one_value_is_the_fixed_gamma_bit_for_bit():
    rng = np.random.default_rng(1)
    x = _scores(rng, (2, 3, 6))
    dp = rng.standard_normal(x.shape)
    p, cache = clipped_softmax_forward(x, -0.2, 1.1)
    p_rows, cache_rows = clipped_softmax_forward(x, np.full((2, 3, 1), -0.2), 1.1)
    assert np.array_equal(p, p_rows)
    assert np.array_equal(clipped_softmax_backward(dp, cache),
                          clipped_softmax_backward(dp, cache_rows))
    assert isinstance(cache.stretch, float)  # the fixed-γ path is unchanged


def test_per_row_gamma_by_finite_differences_and_torch():
    """γ differs per row (one broadcast over an axis too): FD in float64 (no entry near a
    clip boundary), and torch's clamp autograd within 1e-12."""
    import torch

    rng = np.random.default_rng(2)
    x = _scores(rng, (2, 3, 6))
    gamma = -np.array([0.05, 0.4, 0.9])[None, :, None]  # (1, 3, 1): broadcast over axis 0
    with np.errstate(invalid="ignore"):  # the fully masked row: 0 / 0, left out below
        u = (1.2 - gamma) * np.exp(x) / np.exp(x).sum(-1, keepdims=True) + gamma
    finite = np.isfinite(u)
    assert (u[finite] < 0).any() and (u[finite] > 1).any() and ((u > 0) & (u < 1)).any()
    assert min(np.abs(u[finite]).min(), np.abs(u[finite] - 1).min()) > 1e-3
    reports = check_pair("clipped_rows", clipped_softmax_forward, clipped_softmax_backward,
                         {"x": x, "gamma": gamma, "zeta": 1.2}, ("x",))
    assert_gradcheck_passes(reports)

    dp = rng.standard_normal(x.shape)
    p, cache = clipped_softmax_forward(x, gamma, 1.2)
    xt = to_torch(x, True)
    g = to_torch(gamma)
    pt = ((1.2 - g) * torch.softmax(xt, dim=-1) + g).clamp(0, 1)
    pt = torch.nan_to_num(pt)  # torch's softmax of a fully masked row is NaN; ours 0
    pt.backward(to_torch(dp))
    assert_close(p, pt, np.float64, "p", rtol=1e-12)
    grad = torch.nan_to_num(xt.grad).numpy()
    assert_close(clipped_softmax_backward(dp, cache), grad, np.float64, "dx", rtol=1e-12)
    assert np.all(p[1, 2] == 0)


def test_bad_per_row_gamma_is_refused():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="gamma must be <= 0 in every row.*0.5"):
        clipped_softmax_forward(x, np.array([[[-0.1]], [[0.5]]]))
    with pytest.raises(ValueError, match=r"gamma must broadcast to one value per row of x.*"
                                         r"\(2, 3, 1\), got shape \(2, 3, 4\)"):
        clipped_softmax_forward(x, np.full((2, 3, 4), -0.1))
    with pytest.raises(ValueError, match="gamma contains 1 NaN"):
        clipped_softmax_forward(x, np.array([[[np.nan]]]))
    with pytest.raises(ValueError, match="gamma has dtype float32 but x has dtype float64"):
        clipped_softmax_forward(x, np.full((2, 3, 1), -0.1, dtype=np.float32))
    with pytest.raises(ValueError, match="zeta must be >= 1"):
        clipped_softmax_forward(x, np.full((2, 3, 1), -0.1), 0.5)


# ---- the attention core --------------------------------------------------------------------

def test_n_keys_counts_every_mask():
    """γ_t = −α / n_t with n_t from the mask: causal (t + 1 with bottom-right alignment),
    window, documents and padding; a row with no key gets −α (its output is 0 anyway)."""
    doc_ids = np.array([[0, 0, 0, 1, 1, 1, 2, 2], [3] * 8])
    padding = np.zeros((2, 8), dtype=bool)
    padding[0, 4] = True
    padding[1] = True
    allowed = attention_mask(2, 6, 8, causal=True, window=3, doc_ids=doc_ids,
                             key_padding_mask=padding)[:, :, None]  # (B, 1, 1, T, S)
    gamma = length_aware_gamma(0.6, allowed, 8, np.float64)
    # query t sits at position t + 2; keys in (pos − 3, pos], same document, not padding
    # batch 0, positions 2 … 7: keys {0,1,2}, {3}, {3} (4 padded), {3,5}, {6}, {6,7}
    expected = np.array([[3, 1, 1, 2, 1, 2], [0] * 6])
    assert gamma.shape == (2, 1, 1, 6, 1)
    assert_close(gamma[..., 0].reshape(2, 6), -0.6 / np.maximum(expected, 1), np.float64,
                 "gamma", rtol=0)
    assert length_aware_gamma(0.6, None, 8, np.float64) == -0.6 / 8


def test_length_aware_attention_by_finite_differences():
    reports = run_checks(["attention_clipped_length_aware"])
    assert {r.tensor for r in reports} == {"q", "k", "v"}
    assert_gradcheck_passes(reports)


def test_length_aware_attention_matches_torch_and_differs_from_the_fixed_gamma():
    """o, dq, dk, dv against torch autograd with γ_t = −α / (row's allowed keys), GQA,
    causal with a window; the same inputs with the fixed clip_gamma give another answer."""
    import torch

    inputs = _length_aware_inputs()  # q (2, 4, 6, 3), k, v (2, 2, 6, 3); causal, window 4
    rng = np.random.default_rng(3)
    do = rng.standard_normal((2, 4, 6, 3))
    o, cache = attention_forward(**inputs)
    dq, dk, dv = attention_backward(do, cache)
    allowed = torch.from_numpy(attention_mask(2, 6, 6, causal=True, window=4))  # (B, 1, T, S)
    q, k, v = (to_torch(inputs[n], True) for n in "qkv")
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = ((q @ kr.transpose(-1, -2)) / np.sqrt(3)).masked_fill(~allowed, float("-inf"))
    gamma = -inputs["clip_alpha"] / allowed.sum(-1, keepdim=True).double()
    zeta = inputs["clip_zeta"]
    ot = (((zeta - gamma) * torch.softmax(scores, dim=-1) + gamma).clamp(0, 1)) @ vr
    ot.backward(to_torch(do))
    assert_close(o, ot, np.float64, "o", rtol=1e-12)
    for name, ours, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert_close(ours, t.grad, np.float64, name, rtol=1e-12)
    for gamma_fixed in (-0.03, -inputs["clip_alpha"] / 6):  # default and α / T (OPT's form)
        fixed, _ = attention_forward(**{**inputs, "clip_alpha": None, "clip_gamma": gamma_fixed})
        assert not np.allclose(fixed, o)


def test_fully_masked_rows_give_zeros():
    inputs = _length_aware_inputs()
    padding = np.zeros((2, 6), dtype=bool)
    padding[1] = True
    with np.errstate(all="raise"):
        o, cache = attention_forward(**inputs, key_padding_mask=padding)
        grads = attention_backward(np.ones_like(o), cache)
    assert np.all(o[1] == 0) and all(np.all(g[1] == 0) for g in grads)
    assert np.all(np.isfinite(o))


def test_clip_alpha_is_refused_where_it_means_nothing():
    inputs = {k: v for k, v in _length_aware_inputs().items() if k in "qkv"}
    for forward in (attention_forward, flash_attention_forward, flash_attention_reference_forward):
        for bad in (0.0, -1.0, np.inf, np.nan):
            with pytest.raises(ValueError, match=f"clip_alpha must be a finite number > 0, got {bad}"):
                forward(**inputs, softmax="clipped", clip_alpha=bad)
        with pytest.raises(ValueError, match="clip_alpha must be a number, got str"):
            forward(**inputs, softmax="clipped", clip_alpha="1")
        with pytest.raises(ValueError, match="clip_alpha .* needs softmax='clipped', got "
                                             "softmax='softmax1'"):
            forward(**inputs, softmax="softmax1", clip_alpha=1.0)
    for forward in (flash_attention_forward, flash_attention_reference_forward):
        with pytest.raises(ValueError, match=r"softmax='clipped' \(fixed or length-aware γ\) has "
                                             "no online"):
            forward(**inputs, softmax="clipped", clip_alpha=1.0)


# ---- the config and the model -------------------------------------------------------------

def test_config_validates_clip_alpha():
    assert ModelConfig(softmax="clipped", clip_alpha=2.5).clip_alpha == 2.5
    assert ModelConfig().clip_alpha is None
    with pytest.raises(ValueError, match="config field clip_alpha=1.0 is invalid: .*only used "
                                         "with softmax='clipped' \\(softmax='softmax'\\)"):
        ModelConfig(clip_alpha=1.0)
    for bad in (0.0, -2.0, True, "3"):
        with pytest.raises(ValueError, match=f"config field clip_alpha={bad!r} is invalid"):
            ModelConfig(softmax="clipped", clip_alpha=bad)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_alpha"):
            ModelConfig(softmax="clipped", clip_alpha=bad)
    with pytest.raises(ValueError, match="config field softmax='sinks' is invalid: choose one "
                                         "of .*'sink'"):
        ModelConfig(softmax="sinks")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_matches_the_torch_reference(dtype):
    """A GPT-2-style decoder with clipped softmax and clip_alpha = 1.5 (γ from −1.5 at the
    first query to −0.21 at the seventh); every gradient against torch autograd."""
    from npformer.interop.torch_reference import compare_with_torch_reference

    model = random_weight_model("gpt2", dtype, softmax="clipped", clip_alpha=1.5)
    reports = compare_with_torch_reference("gpt2-clip-alpha", model, dtype)
    assert len(reports) > 10 and all(r.passed for r in reports), [r for r in reports if not r.passed]
    bar = 1e-10 if dtype == "float64" else 1e-4
    assert all(r.max_rel_err <= bar for r in reports if r.tensor in ("logits", "loss"))
    fixed, _ = forward_backward(random_weight_model("gpt2", dtype, softmax="clipped"))
    ours, _ = forward_backward(model)
    assert not np.allclose(fixed, ours)  # clip_alpha reached the model


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_kv_cache_decoding_equals_the_full_forward(impl):
    """n_t of a decoded token counts its cached keys (bottom-right causal, window of gpt3's
    local layers): token by token gives the full forward's logits."""
    model = random_weight_model("gpt3", softmax="clipped", clip_alpha=2.0,
                                attention_impl=impl).eval()
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, 9))
    full = model.forward(ids)
    assert_close(decoded_logits(model, ids, prompt=3), full, np.float64, "decoded", rtol=1e-12)


def test_the_kernel_setting_falls_back_to_the_reference():
    kernel = random_weight_model("gpt2", softmax="clipped", clip_alpha=1.0, attention_impl="numba")
    reference = random_weight_model("gpt2", softmax="clipped", clip_alpha=1.0,
                                    attention_impl="numpy")
    logits_k, grads_k = forward_backward(kernel)
    logits_r, grads_r = forward_backward(reference)
    assert np.array_equal(logits_k, logits_r)
    assert all(np.array_equal(grads_k[n], g) for n, g in grads_r.items())


def test_hugging_face_export_refuses_clipped_with_clip_alpha():
    from npformer.interop.hf_config import hf_config_from_config

    with pytest.raises(ValueError, match="softmax='clipped'"):
        hf_config_from_config(ModelConfig(softmax="clipped", clip_alpha=1.0))
