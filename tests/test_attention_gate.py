"""Gated attention (Bondarenko et al. 2023, ``attention_gate=True``): the head_gate pair, the
gate inside MultiHeadAttention and the decoder, against finite differences and torch."""

import hashlib
import warnings

import numpy as np
import pytest
import torch

from helpers import assert_close, assert_gradcheck_passes, decoded_logits, to_torch
from npformer._validate import NonFiniteError
from npformer.checks.models import check_config
from npformer.config import ModelConfig
from npformer.functional.attention_gate import head_gate_backward, head_gate_forward
from npformer.gradcheck import run_checks
from npformer.interop.hf_config import hf_config_from_config
from npformer.interop.torch_reference import compare_with_torch_reference
from npformer.models import build_model
from npformer.models.stats import parameter_count
from npformer.nn.attention import KVCache, MultiHeadAttention
from npformer.checks.models import randomize_model

F64 = np.dtype(np.float64)


def _gate_inputs(rng, B=2, T=5, C=12, H=3, Dv=4, dtype=np.float64):
    """x (B, T, C), o (B, H, T, Dv), weight (H, C/H), bias (H,): unusual values."""
    return dict(x=(rng.standard_normal((B, T, C)) * 1.2 + 0.3).astype(dtype),
                o=(rng.standard_normal((B, H, T, Dv)) * 1.5 - 0.4).astype(dtype),
                weight=(rng.standard_normal((H, C // H)) * 0.7 + 0.1).astype(dtype),
                bias=(rng.standard_normal(H) - 0.5).astype(dtype))


def _tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=11, d_model=8, n_heads=2, n_layers=2, max_seq_len=10,
                  attention_gate=True)
    return ModelConfig(**{**fields, **overrides})


# ---- the functional pair -----------------------------------------------------------------

def test_registered_check_passes():
    # head_gate's x, o, weight, bias and a gated grouped-query MultiHeadAttention (every
    # parameter and x), central differences in float64
    reports = run_checks(["attention_gate"])
    assert_gradcheck_passes(reports)
    assert {"x", "o", "weight", "bias", "mha/gate_weight", "mha/gate_bias", "mha/x"} <= {
        r.tensor for r in reports}


def _torch_head_gate(x, o, weight, bias):
    """The definition written in torch: a[b,t,h] = x_h · w_h + b_h, y = σ(a) o per head."""
    B, T, C = x.shape
    H = weight.shape[0]
    a = (x.view(B, T, H, C // H) * weight).sum(-1) + bias  # (B, T, H)
    return torch.sigmoid(a).transpose(1, 2)[..., None] * o


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pair_matches_torch_autograd(dtype):
    rng = np.random.default_rng(5)
    inputs = _gate_inputs(rng, B=3, T=6, C=15, H=5, Dv=7, dtype=dtype)
    y, cache = head_gate_forward(**inputs)
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = head_gate_backward(dy, cache)
    t = {k: to_torch(v, requires_grad=True) for k, v in inputs.items()}
    ty = _torch_head_gate(**t)
    ty.backward(to_torch(dy))
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(y, ty, dtype, "y")
    for name, grad in zip(("x", "o", "weight", "bias"), grads):
        assert_close(grad, t[name].grad, dtype, f"d{name}")


def test_gate_is_sigmoid_of_the_head_slice():
    # a hand-computed case: H = 2 heads of width 2; head 1 reads x[..., 2:4] only
    x = np.array([[[1.0, 2.0, -1.0, 0.5]]])  # (1, 1, 4)
    o = np.ones((1, 2, 1, 3))
    weight = np.array([[0.5, -0.25], [2.0, 4.0]])
    bias = np.array([0.1, -0.3])
    y, _ = head_gate_forward(x, o, weight, bias)
    a = np.array([1.0 * 0.5 + 2.0 * -0.25 + 0.1, -1.0 * 2.0 + 0.5 * 4.0 - 0.3])
    np.testing.assert_allclose(y[0, :, 0, :], np.repeat(1 / (1 + np.exp(-a)), 3).reshape(2, 3),
                               rtol=1e-15)


def test_saturated_gates_are_exact_and_warning_free():
    # logits ±1000: exp(1000) overflows, so a naive σ warns and a naive 1 − σ loses the tail
    x = np.array([[[1.0, 1.0], [1.0, -1.0]]])  # (1, 2, 2), H = 1
    o = np.full((1, 1, 2, 3), 2.0)
    weight, bias = np.array([[500.0, 500.0]]), np.array([0.0])  # a = +1000, 0
    x32 = x.astype(np.float32)
    for inputs in ((x, o, weight, bias), tuple(v.astype(np.float32) for v in (x, o, weight, bias))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with np.errstate(over="raise", invalid="raise", divide="raise"):  # (underflow to 0 is the answer)
                y, cache = head_gate_forward(*inputs)
                dx, do, dweight, dbias = head_gate_backward(np.ones_like(y), cache)
        assert np.all(y[0, 0, 0] == 2.0) and np.all(y[0, 0, 1] == 1.0)  # σ(1000) = 1, σ(0) = ½
        assert np.all(dx[0, 0] == 0.0)  # σ'(1000) = 0 exactly
    neg = head_gate_forward(x32, o.astype(np.float32), -weight.astype(np.float32),
                            bias.astype(np.float32))[0]
    assert np.all(neg[0, 0, 0] == 0.0)  # σ(−1000) = 0


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((2, 5))), r"x must have shape \(B, T, C\)"),
    (dict(o=np.zeros((2, 3, 5))), r"o must have shape \(B, H, T, Dv\)"),
    (dict(o=np.zeros((2, 3, 4, 4))), r"o has shape \(2, 3, 4, 4\) but x has shape \(2, 5, 12\)"),
    (dict(o=np.zeros((2, 5, 5, 4))), r"C=12 channels into H=5 head slices.*divisible"),
    (dict(weight=np.zeros((3, 3))), r"weight must have shape \(3, 4\)"),
    (dict(bias=np.zeros(4)), r"bias must have shape \(3,\)"),
    (dict(bias=np.zeros(3, dtype=np.float32)), r"bias has dtype float32 but x has dtype float64"),
    (dict(x=np.zeros((2, 5, 12), dtype=np.int64)), r"x must be a floating-point array"),
])
def test_bad_inputs_are_clear_errors(change, message):
    inputs = {**_gate_inputs(np.random.default_rng(0)), **change}
    with pytest.raises(ValueError, match=message):
        head_gate_forward(**inputs)


def test_nan_input_and_bad_gradient_are_refused():
    inputs = _gate_inputs(np.random.default_rng(1))
    inputs["o"][1, 2, 3, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"o contains 1 NaN"):
        head_gate_forward(**inputs)
    y, cache = head_gate_forward(**_gate_inputs(np.random.default_rng(1)))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5, 4\)"):
        head_gate_backward(np.ones((2, 3, 5, 5)), cache)


# ---- inside MultiHeadAttention and the decoder ---------------------------------------------

def test_initial_gate_and_weights():
    # σ(gate_bias) is attention_gate_init; gate_weight ~ N(0, init_std²) is drawn after every
    # other parameter, so those equal the gateless module's bit for bit
    gated = MultiHeadAttention(16, 4, 2, attention_gate=True, attention_gate_init=0.25,
                               qk_norm=True, rng=np.random.default_rng(9), init_std=0.05)
    plain = MultiHeadAttention(16, 4, 2, qk_norm=True, rng=np.random.default_rng(9), init_std=0.05)
    np.testing.assert_allclose(1 / (1 + np.exp(-gated.params["gate_bias"])), 0.25, rtol=1e-15)
    assert gated.params["gate_weight"].shape == (4, 4) and gated.params["gate_bias"].shape == (4,)
    assert 0.02 < gated.params["gate_weight"].std() < 0.09
    shared = plain.parameters()
    assert set(gated.parameters()) - set(shared) == {"gate_weight", "gate_bias"}
    for name, value in shared.items():
        assert np.array_equal(gated.parameters()[name], value), name
    model = build_model(_tiny(attention_gate_init=0.7, dtype="float32"))
    for layer in range(2):
        bias = model.parameters()[f"layers.{layer}.attn.gate_bias"]
        assert bias.dtype == np.float32
        np.testing.assert_allclose(1 / (1 + np.exp(-bias.astype(np.float64))), 0.7, rtol=1e-6)


def _parameter_digest(config) -> str:
    model = build_model(config, seed=3)
    h = hashlib.sha256()
    for name, value in sorted(model.parameters().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


def test_configs_without_the_gate_keep_their_initial_weights():
    # digests of the initial parameters before the gate existed (commit 086730a): the bytes
    # of our own draws (NumPy's PCG64 normals times init_std, IEEE products and casts)
    gpt2_like = ModelConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2, max_seq_len=8,
                            scaled_residual_init=True)
    llama_like = ModelConfig(vocab_size=11, d_model=8, n_heads=2, n_kv_heads=1, n_layers=2,
                             max_seq_len=8, positions="rope", norm="rmsnorm", norm_bias=False,
                             ffn="swiglu", ffn_bias=False, qkv_bias=False, out_bias=False,
                             tie_embeddings=False, dtype="float32")
    assert _parameter_digest(gpt2_like) == "e43b1024409e3170"
    assert _parameter_digest(llama_like) == "cf55d35d5d000e96"
    assert parameter_count(gpt2_like.replace(attention_gate=True)) == \
        parameter_count(gpt2_like) + 2 * (8 + 2)  # (H, C/H) + (H,) per layer
    assert build_model(gpt2_like.replace(attention_gate=True)).num_parameters() == \
        parameter_count(gpt2_like.replace(attention_gate=True))


@pytest.mark.parametrize("overrides", [
    dict(),  # pre-LN: the gate reads the normalised x
    dict(norm_placement="post", final_norm=False),  # the gate reads the raw x
    dict(block="parallel", positions="rope", norm="rmsnorm", norm_bias=False, n_kv_heads=1,
         head_dim=6, qkv_bias=False),  # head size 6 ≠ C/H = 4
], ids=["pre", "post", "parallel-mqa"])
def test_decoder_finite_differences_every_parameter(overrides):
    # the readable path (thousands of tiny forwards; the numba path's gate is the same code,
    # checked against torch below)
    config = _tiny(layer_impl="numpy", attention_impl="numpy", **overrides)
    reports = check_config(config, "gated decoder", max_entries=8)  # 8 entries per tensor
    assert_gradcheck_passes(reports)
    checked = {r.tensor for r in reports}
    assert set(build_model(config).parameters()) <= checked
    assert {"layers.0.attn.gate_weight", "layers.1.attn.gate_bias",
            "input token vectors"} <= checked


@pytest.mark.parametrize("overrides", [
    dict(), dict(positions="rope", n_kv_heads=1, layer_impl="numpy", attention_impl="numpy"),
    dict(block="parallel", norm="rmsnorm", norm_bias=False, document_mask=True),
], ids=["gpt2-like", "rope-mqa-numpy", "parallel-rmsnorm"])
def test_decoder_matches_the_torch_reference(overrides):
    config = _tiny(**overrides)
    model = build_model(config, seed=1).eval()
    randomize_model(model, np.random.default_rng(1))
    reports = compare_with_torch_reference("gated", model, "float64")
    tensors = {r.tensor for r in reports}
    assert {"logits", "loss", "layers.0.attn.gate_weight", "layers.1.attn.gate_bias"} <= tensors
    for r in reports:  # (k's bias has a structurally zero gradient: softmax ignores it)
        assert r.passed, r
        assert r.max_rel_err <= 1e-10 or r.tensor.endswith("k_proj.bias"), r


def test_torch_reference_sees_a_wrong_gate_gradient(monkeypatch):
    # the comparison can fail: a 1e-9 relative error in dgate_bias is caught in float64
    from npformer.nn import attention

    original = attention.head_gate_backward

    def broken(dy, cache):
        dx, do, dweight, dbias = original(dy, cache)
        return dx, do, dweight, dbias * (1 + 1e-9)

    monkeypatch.setattr(attention, "head_gate_backward", broken)
    model = build_model(_tiny(), seed=1).eval()
    randomize_model(model, np.random.default_rng(1))
    failed = {r.tensor for r in compare_with_torch_reference("gated", model, "float64")
              if not r.passed}
    assert failed == {"layers.0.attn.gate_bias", "layers.1.attn.gate_bias"}


@pytest.mark.parametrize("attention_impl", ["numpy", "numba"])
def test_kv_cache_decoding_equals_full_forward(attention_impl):
    config = _tiny(positions="rope", n_kv_heads=1, attention_impl=attention_impl)
    model = build_model(config, seed=2).eval()
    randomize_model(model, np.random.default_rng(2))
    ids = np.random.default_rng(3).integers(0, 11, (2, 7))
    full = model.forward(ids)  # a prompt, then one token at a time
    assert_close(decoded_logits(model, ids, prompt=3), full, F64, "decoded logits", rtol=1e-12)
    # the module alone, token by token
    mha = MultiHeadAttention(8, 2, attention_gate=True, rng=np.random.default_rng(4))
    randomize_model_like = np.random.default_rng(5)
    for value in mha.parameters().values():
        value[...] = randomize_model_like.standard_normal(value.shape) * 0.4
    x = np.random.default_rng(6).standard_normal((2, 6, 8))
    cache = KVCache()
    decoded = np.concatenate([mha.forward(x[:, t:t + 1], kv_cache=cache)[0] for t in range(6)], 1)
    assert_close(decoded, mha.forward(x)[0], F64, "decoded attention", rtol=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_gate_init=0.0), r"attention_gate_init=0.0 is invalid: .*strictly inside \(0, 1\)"),
    (dict(attention_gate_init=1.0), r"attention_gate_init=1.0 is invalid"),
    (dict(attention_gate_init=-0.5), r"attention_gate_init=-0.5 is invalid"),
    (dict(attention_gate_init=float("nan")), r"attention_gate_init=nan is invalid: must be a finite"),
    (dict(attention_gate_init=True), r"attention_gate_init=True is invalid: must be a finite"),
    (dict(attention_gate=False, attention_gate_init=0.5),
     r"attention_gate_init=0.5 is invalid: only read with attention_gate=True"),
    (dict(attention_gate="yes"), r"attention_gate='yes' is invalid: must be True or False"),
    (dict(d_model=9, n_heads=2, head_dim=4),
     r"attention_gate=True is invalid: .*d_model=9 is not divisible by n_heads=2"),
    (dict(architecture="encoder-decoder", positions="learned"),
     r"attention_gate=True is invalid: decoder only"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_module_refuses_bad_options():
    with pytest.raises(ValueError, match=r"attention_gate splits x's d_model=9 .*n_heads=2"):
        MultiHeadAttention(9, 2, head_dim=4, attention_gate=True)
    for bad in (0.0, 1.0, 2, float("nan"), True):
        with pytest.raises(ValueError, match=r"attention_gate_init .*strictly inside \(0, 1\)"):
            MultiHeadAttention(8, 2, attention_gate=True, attention_gate_init=bad)


def test_hugging_face_export_is_refused():
    # no Hugging Face model has the gate: every family refuses to express it
    with pytest.raises(ValueError, match=r"no Hugging Face model_type reproduces this config"
                                         r"(.|\n)*gpt2: cannot express .*attention_gate=True"):
        hf_config_from_config(_tiny())
    hf_config_from_config(_tiny(attention_gate=False))  # the same model without it is exported
