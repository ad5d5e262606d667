"""The learned attention sink (``softmax="sink"``, gpt-oss): the functional pair, the attention
core, the numba kernels and their NumPy twin, the module's parameter, model-level torch
parity, KV-cache decoding and the errors."""

import numpy as np
import pytest

from helpers import (assert_close, assert_gradcheck_passes, assert_subset_passes_without_jit,
                     decoded_logits, forward_backward, random_weight_model, to_torch)
from npformer.checks.attention import _qkv
from npformer.config import ModelConfig
from npformer.functional.attention import attention_backward, attention_forward
from npformer.functional.softmax_variants import (sink_softmax_backward, sink_softmax_forward,
                                                  softmax1_backward, softmax1_forward)
from npformer.gradcheck import run_checks
from npformer.kernels.flash_attention import (FLASH_SOFTMAX_VARIANTS, _flash_backward,
                                              _flash_forward, flash_attention_backward,
                                              flash_attention_forward)
from npformer.kernels.flash_attention_reference import (flash_attention_reference_backward,
                                                        flash_attention_reference_forward,
                                                        prepare_flash_attention)
from npformer.nn.attention import MultiHeadAttention

KERNEL_RTOL = {np.float64: 1e-12, np.float32: 1e-5}  # DESIGN.md: kernel vs NumPy reference


def _scores(rng, shape):
    """Scores with an offset and spread, two masked entries and a fully masked row."""
    x = rng.standard_normal(shape) * 1.7 + 0.4
    x[0, 1, 2] = x[1, 0, 4] = -np.inf
    x[1, 2, :] = -np.inf
    return x


# ---- the functional pair ------------------------------------------------------------------

def test_sink_softmax_registered_checks_pass():
    """Finite differences, float64: the pair alone (x and a sink shared by rows) and the
    attention core with sinks (q, k, v, sinks; GQA; causal, window and documents)."""
    reports = run_checks(["sink_softmax", "attention_sink"])
    assert {r.tensor for r in reports} == {"x", "sink", "q", "k", "v", "sinks"}
    assert_gradcheck_passes(reports)


def test_sink_softmax_matches_torch_autograd_of_the_appended_column():
    """gpt-oss's form in torch: cat a column of s, softmax, drop it; p, dx and ds (per row)
    within 1e-12 in float64, with masked entries and a fully masked row."""
    import torch

    rng = np.random.default_rng(1)
    x = _scores(rng, (2, 3, 6))  # (2, 3) rows of S = 6
    sink = rng.standard_normal((2, 3, 1)) * 1.4 - 0.2  # one per row
    dp = rng.standard_normal(x.shape)
    p, cache = sink_softmax_forward(x, sink)
    dx, dsink = sink_softmax_backward(dp, cache)
    xt, st = to_torch(x, True), to_torch(sink, True)
    pt = torch.softmax(torch.cat([xt, st], dim=-1), dim=-1)[..., :-1]
    pt.backward(to_torch(dp))
    assert_close(p, pt, np.float64, "p", rtol=1e-12)
    assert_close(dx, xt.grad, np.float64, "dx", rtol=1e-12)
    assert_close(dsink, st.grad, np.float64, "dsink", rtol=1e-12)
    assert np.all(p[1, 2] == 0) and np.all(dx[1, 2] == 0) and dsink[1, 2, 0] == 0
    assert np.all(p[0, 1, 2] == 0) and dx[0, 1, 2] == 0


def test_softmax1_is_the_sink_at_zero_bit_for_bit():
    """softmax₁ computes exp(x − m)/(exp(−m) + Σ) with m = max(max x, 0); the sink at s = 0
    computes exp(0 − m) with m = max(max x, 0): the same operations on the same numbers."""
    rng = np.random.default_rng(2)
    for dtype in (np.float64, np.float32):
        x = _scores(rng, (2, 3, 7)).astype(dtype)
        x[0, 0] += 5.0  # some rows above 0, some below: both branches of the max
        x[0, 2] -= 9.0
        dp = rng.standard_normal(x.shape).astype(dtype)
        p1, c1 = softmax1_forward(x)
        ps, cs = sink_softmax_forward(x, np.zeros((1, 1, 1), dtype=dtype))
        assert np.array_equal(p1, ps)
        dx1 = softmax1_backward(dp, c1)
        dxs, _ = sink_softmax_backward(dp, cs)
        assert np.array_equal(dx1, dxs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_sinks_are_stable(dtype):
    """s = +1000 takes all the mass (p = 0, p_sink = 1, ds = −⟨dp, p⟩ = 0); s = −1000 none
    (p = softmax(x)); no overflow, no NaN — the naive exp(s) would be inf."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5)).astype(dtype) * 3
    dp = rng.standard_normal(x.shape).astype(dtype)
    with np.errstate(over="raise", invalid="raise"):  # no overflow (underflow to 0 is the point)
        p_hi, c_hi = sink_softmax_forward(x, np.full((4, 1), 1000.0, dtype=dtype))
        p_lo, c_lo = sink_softmax_forward(x, np.full((4, 1), -1000.0, dtype=dtype))
    assert np.all(p_hi == 0) and np.all(c_hi.p_sink == 1)
    assert np.all(sink_softmax_backward(dp, c_hi)[1] == 0)
    softmax = np.exp(x - x.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    assert_close(p_lo, softmax, dtype, "s = -1000", rtol=10 * np.finfo(dtype).eps)
    assert np.all(c_lo.p_sink == 0)


# ---- the attention core -------------------------------------------------------------------

def _attention_case(rng, B=2, H=6, K=2, T=5, S=7, D=3, dtype=np.float64):
    inputs = {k: v.astype(dtype) for k, v in _qkv(rng, B, H, K, T, S, D, D).items()}
    sinks = (rng.standard_normal(H) * 1.5 + 0.3).astype(dtype)
    do = rng.standard_normal((B, H, T, D)).astype(dtype)
    return inputs, sinks, do


def test_attention_with_sinks_matches_torch_autograd():
    """GQA (H = 6 over K = 2), bottom-right causal with a window and documents, a fully
    padded batch row: o, dq, dk, dv and dsinks (H,) against torch's autograd within 1e-12;
    sinks are per QUERY head (each head of a kv group its own)."""
    import torch

    rng = np.random.default_rng(4)
    inputs, sinks, do = _attention_case(rng, B=3)
    doc_ids = np.array([[0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3], [0] * 7])
    padding = np.zeros((3, 7), dtype=bool)
    padding[2] = True
    options = dict(causal=True, window=4, doc_ids=doc_ids, key_padding_mask=padding)
    o, cache = attention_forward(**inputs, softmax="sink", sinks=sinks, **options)
    grads = attention_backward(do, cache)
    assert len(grads) == 4 and grads[3].shape == (6,)

    from npformer.functional.attention_mask import attention_mask
    allowed = torch.from_numpy(attention_mask(3, 5, 7, **options))  # (B, 1, T, S)
    q, k, v, s = (to_torch(a, True) for a in (inputs["q"], inputs["k"], inputs["v"], sinks))
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    scores = (q @ kr.transpose(-1, -2)) / np.sqrt(3)
    scores = scores.masked_fill(~allowed, float("-inf"))
    column = s.view(1, 6, 1, 1).expand(3, 6, 5, 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    ot = probs @ vr
    ot.backward(to_torch(do))
    assert_close(o, ot, np.float64, "o", rtol=1e-12)
    for name, ours, theirs in zip(("dq", "dk", "dv", "dsinks"), grads, (q, k, v, s)):
        assert_close(ours, theirs.grad, np.float64, name, rtol=1e-12)
    assert np.all(o[2] == 0) and np.all(grads[0][2] == 0)  # the fully padded row


def test_attention_softmax1_equals_sinks_at_zero_bit_for_bit_on_both_paths():
    rng = np.random.default_rng(5)
    inputs, _, do = _attention_case(rng, H=4, K=2, T=9, S=9)
    zeros = np.zeros(4)
    for forward, backward in ((attention_forward, attention_backward),
                              (flash_attention_forward, flash_attention_backward)):
        o1, c1 = forward(**inputs, causal=True, softmax="softmax1")
        os_, cs = forward(**inputs, causal=True, softmax="sink", sinks=zeros)
        assert np.array_equal(o1, os_)
        for a, b in zip(backward(do, c1), backward(do, cs)[:3]):
            assert np.array_equal(a, b)


# ---- the kernels against the NumPy reference ------------------------------------------------

def _reference(inputs, do, **options):
    o, cache = attention_forward(**inputs, **options)
    return (o,) + attention_backward(do, cache)


def _kernel(inputs, do, block_q, block_k, schedule, **options):
    q, k, v, prepared = prepare_flash_attention(**inputs, **options)
    o, cache = _flash_forward(q, k, v, prepared, block_q, block_k)
    return (o,) + _flash_backward(do, cache, block_q, block_k, schedule)


def _assert_same(got, want, dtype, what):
    names = ("o", "dq", "dk", "dv", "dsinks")
    assert len(got) == len(want) == 5
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype and a.shape == b.shape, (what, name)
        assert_close(a, b, dtype, f"{what} {name}", rtol=KERNEL_RTOL[dtype], atol=0.0)


MASKS = {
    "causal_gqa": dict(H=6, K=2, T=11, S=11, options=dict(causal=True)),
    "mqa_window_decode": dict(H=4, K=1, T=5, S=13, options=dict(causal=True, window=6)),
    "documents_padding": dict(H=4, K=2, T=10, S=10, options=dict(
        causal=True, doc_ids=np.array([[0, 0, 0, 1, 2, 2, 2, 2, 3, 3], [5] * 10]),
        key_padding_mask=np.array([[False] * 10, [True] * 10]))),  # row 1: fully masked
    "cross_mha": dict(H=2, K=2, T=6, S=9, options={}),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(MASKS))
def test_sink_kernel_equals_the_reference(case, dtype):
    """Both backward schedules and the NumPy twin, small tiles (4 × 3: partial, full and
    skipped tiles), against attention_forward/backward with the same sinks."""
    spec = MASKS[case]
    rng = np.random.default_rng(6)
    inputs, sinks, do = _attention_case(rng, B=2, H=spec["H"], K=spec["K"], T=spec["T"],
                                        S=spec["S"], dtype=dtype)
    options = dict(spec["options"], softmax="sink", sinks=sinks)
    want = _reference(inputs, do, **options)
    for schedule in ("by_kv_head", "two_pass"):
        _assert_same(_kernel(inputs, do, 4, 3, schedule, **options), want, dtype, schedule)
    o, cache = flash_attention_reference_forward(**inputs, **options, block_q=4, block_k=3)
    twin = (o,) + flash_attention_reference_backward(do, cache, block_q=3, block_k=4)
    _assert_same(twin, want, dtype, "twin")
    if case == "documents_padding":
        assert np.all(want[0][1] == 0) and np.all(twin[0][1] == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sink_kernel_with_default_tiles_and_t_not_a_multiple_of_64(dtype):
    """The public pair with its 64 × 64 tiles, T = S = 70 (a partial edge tile)."""
    rng = np.random.default_rng(7)
    inputs, sinks, do = _attention_case(rng, B=1, H=4, K=2, T=70, S=70, D=8, dtype=dtype)
    options = dict(causal=True, softmax="sink", sinks=sinks)
    o, cache = flash_attention_forward(**inputs, **options)
    _assert_same((o,) + flash_attention_backward(do, cache), _reference(inputs, do, **options),
                 dtype, "T = 70")


@pytest.mark.parametrize("sink", [1000.0, -1000.0])
def test_sink_kernel_large_sinks(sink):
    """s = ±1000: finite everywhere and equal to the reference (+1000: o = 0, all mass on
    the sink, every gradient 0)."""
    rng = np.random.default_rng(8)
    inputs, _, do = _attention_case(rng, H=2, K=1, T=6, S=6, dtype=np.float32)
    options = dict(causal=True, softmax="sink", sinks=np.full(2, sink, dtype=np.float32))
    want = _reference(inputs, do, **options)
    got = _kernel(inputs, do, 4, 3, "by_kv_head", **options)
    _assert_same(got, want, np.float32, f"sink {sink}")
    if sink > 0:
        assert all(np.all(g == 0) for g in got)


def test_sink_is_a_kernel_variant_and_clipped_is_not():
    assert "sink" in FLASH_SOFTMAX_VARIANTS and "clipped" not in FLASH_SOFTMAX_VARIANTS


def test_sink_kernel_checks_pass():
    reports = run_checks(["kernel_sink"])
    assert {r.tensor for r in reports} == {"q", "k", "v", "sinks"}
    assert_gradcheck_passes(reports)


def test_sink_kernels_pass_as_plain_python_under_numba_disable_jit():
    """The kernel-vs-reference tests above (float32, every mask case) in a child process with
    NUMBA_DISABLE_JIT=1."""
    assert_subset_passes_without_jit(__file__, "test_sink_kernel_equals_the_reference and float32",
                                     4, "npformer.kernels.flash_attention:_forward_kernel")


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", [attention_forward, flash_attention_forward,
                                     flash_attention_reference_forward])
def test_bad_sinks_are_refused_on_every_path(forward):
    rng = np.random.default_rng(9)
    inputs, sinks, _ = _attention_case(rng)
    with pytest.raises(ValueError, match=r"softmax='sink' needs sinks.*\(6,\)"):
        forward(**inputs, softmax="sink")
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\) = \(6,\).*got shape \(2,\)"):
        forward(**inputs, softmax="sink", sinks=sinks[:2])
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\).*got shape \(1, 6\)"):
        forward(**inputs, softmax="sink", sinks=sinks[None])
    bad = sinks.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="sinks contains 1 NaN"):
        forward(**inputs, softmax="sink", sinks=bad)
    with pytest.raises(ValueError, match="sinks has dtype float32 but q has dtype float64"):
        forward(**inputs, softmax="sink", sinks=sinks.astype(np.float32))
    with pytest.raises(ValueError, match="sinks must be a numpy.ndarray"):
        forward(**inputs, softmax="sink", sinks=[0.0] * 6)
    for softmax in ("softmax", "softmax1"):
        with pytest.raises(ValueError, match=f"sinks are only used with softmax='sink', got "
                                             f"softmax='{softmax}'"):
            forward(**inputs, softmax=softmax, sinks=sinks)


def test_bad_sink_for_the_functional_pair():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"sink must broadcast to one value per row of x, "
                                         r"x.shape\[:-1\] \+ \(1,\) = \(2, 3, 1\), got shape \(2, 3, 4\)"):
        sink_softmax_forward(x, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="sink contains 1 NaN or infinite"):
        sink_softmax_forward(x, np.array([[[np.inf]]]))


# ---- the module, the config and the model ----------------------------------------------------

def test_module_has_zero_sinks_and_accumulates_their_gradient():
    """sinks (H,) start at 0; their gradient through the module (GQA, causal, kernel path)
    equals central differences, and a second backward adds to it."""
    rng = np.random.default_rng(10)
    attention = MultiHeadAttention(12, 6, 2, softmax="sink", rng=rng)
    assert attention.params["sinks"].shape == (6,) and np.all(attention.params["sinks"] == 0)
    assert "sinks" not in attention.core_options
    assert "sinks" not in MultiHeadAttention(12, 6, 2, softmax="softmax1").params
    x = rng.standard_normal((2, 5, 12))
    dy = rng.standard_normal((2, 5, 12))
    sinks = attention.params["sinks"]
    sinks[...] = rng.standard_normal(6)
    y, cache = attention.forward(x)
    attention.zero_grad()
    attention.backward(dy, cache)
    once = attention.grads["sinks"].copy()
    step, numeric = 1e-6, np.empty(6)
    for h in range(6):
        saved = sinks[h]
        sinks[h] = saved + step
        up = np.sum(attention.forward(x)[0] * dy)
        sinks[h] = saved - step
        down = np.sum(attention.forward(x)[0] * dy)
        sinks[h] = saved
        numeric[h] = (up - down) / (2 * step)
    assert_close(once, numeric, np.float64, "dsinks vs FD", rtol=1e-7)
    attention.backward(dy, cache)  # a second use adds (the chain rule's sum)
    assert_close(attention.grads["sinks"], 2 * once, np.float64, "accumulated", rtol=1e-15)


def test_config_accepts_sink_and_counts_its_parameters():
    from npformer.models import build_model
    from npformer.models.stats import parameter_count

    config = ModelConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2, max_seq_len=8,
                         softmax="sink")
    model = build_model(config)
    assert parameter_count(config) == model.num_parameters()
    assert parameter_count(config) == parameter_count(config.replace(softmax="softmax")) + 2 * 2
    assert [n for n in model.parameters() if "sinks" in n] == ["layers.0.attn.sinks",
                                                               "layers.1.attn.sinks"]


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_matches_the_torch_reference(impl, dtype):
    """A GPT-2-style decoder with softmax="sink" (random sinks, ~N(0, 0.3²)), every gradient
    including layers.*.attn.sinks, against torch autograd of the appended column."""
    from npformer.interop.torch_reference import compare_with_torch_reference

    model = random_weight_model("gpt2", dtype, softmax="sink", attention_impl=impl)
    assert np.all(model.parameters()["layers.0.attn.sinks"] != 0)
    reports = compare_with_torch_reference("gpt2-sink", model, dtype)
    tensors = {r.tensor for r in reports}
    assert {"logits", "loss", "layers.0.attn.sinks", "layers.1.attn.sinks"} <= tensors
    assert all(r.passed for r in reports), [r for r in reports if not r.passed]
    bar = 1e-10 if dtype == "float64" else 1e-4
    for r in reports:
        if r.tensor in ("logits", "loss") or "sinks" in r.tensor:
            assert r.max_rel_err <= bar, r


def test_kernel_and_reference_models_agree_and_the_sink_changes_the_model():
    kernel = random_weight_model("llama2", softmax="sink", attention_impl="numba")
    reference = random_weight_model("llama2", softmax="sink", attention_impl="numpy")
    assert all(m.core[0] is flash_attention_forward for m in _attention_modules(kernel))
    logits_k, grads_k = forward_backward(kernel)
    logits_r, grads_r = forward_backward(reference)
    assert_close(logits_k, logits_r, np.float64, "logits", rtol=1e-12)
    for name, g in grads_r.items():
        assert_close(grads_k[name], g, np.float64, name, rtol=1e-12, atol=1e-15)
    one, _ = forward_backward(random_weight_model("llama2", softmax="softmax1"))
    assert not np.allclose(one, logits_k)  # the learned sinks (≠ 0) really change the model


def _attention_modules(model):
    from npformer.nn.attention import MultiHeadAttention as MHA
    return [m for m in _walk(model) if isinstance(m, MHA)]


def _walk(module):
    yield module
    for _, child in module.named_children():
        yield from _walk(child)


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_kv_cache_decoding_equals_the_full_forward(impl):
    model = random_weight_model("llama2", softmax="sink", attention_impl=impl).eval()
    ids = np.random.default_rng(11).integers(0, model.config.vocab_size, (2, 9))
    full = model.forward(ids)
    assert_close(decoded_logits(model, ids, prompt=4), full, np.float64, "decoded", rtol=1e-12)


def test_hugging_face_export_refuses_the_sink():
    from npformer.interop.hf_config import hf_config_from_config

    with pytest.raises(ValueError, match="softmax='sink'"):
        hf_config_from_config(ModelConfig(softmax="sink"))
