"""npformer.study.outliers and .instrument: the metrics on activations with known values, the
instrumented forward against the model's own, and the attention masses on known attention."""

import json

import numpy as np
import pytest

from helpers import assert_close
from npformer.models import build_model
from npformer.nn.feedforward import FeedForward
from npformer.presets import preset_config, tiny_config
from npformer.study.instrument import Probe, instrumented, readable_copy
from npformer.study.outliers import (activation_statistics, inf_norm_per_sequence,
                                     kurtosis_per_sequence, outlier_metrics)


GEMMA_LIKE = dict(norm_unit_offset=True, sandwich_norm=True, ffn="geglu_tanh",
                  attention_softcap=50.0, final_logit_softcap=30.0,
                  attention_pattern=("local", "dense"), window=3)


def _gpt2(**changes):
    config = preset_config("gpt2", **{**dict(dtype="float32", d_model=16, n_layers=2, n_heads=4,
                                             vocab_size=13, max_seq_len=12), **changes})
    return build_model(config, seed=3).eval()


def _batches(vocab=13, shapes=((2, 12), (3, 12)), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, shape) for shape in shapes]


# ---- the metrics on synthetic activations ----------------------------------------------------


def test_inf_norm_per_sequence_is_the_largest_magnitude_of_each_sequence():
    x = np.zeros((3, 4, 5))
    x[0, 1, 2] = -7.5  # a negative value counts by its magnitude
    x[1, 3, 4] = 2.0
    x[1, 0, 0] = -1.0
    x[2] = 0.25
    np.testing.assert_array_equal(inf_norm_per_sequence(x), [7.5, 2.0, 0.25])


def test_kurtosis_of_a_gaussian_sample_is_three_within_sampling_error():
    # the standard error of the sample kurtosis of a Gaussian is √(24/N) ≈ 0.011 at N = 2e5
    x = np.random.default_rng(1).standard_normal((2, 400, 500))
    k = kurtosis_per_sequence(x)
    assert k.shape == (2,)
    assert np.all(np.abs(k - 3.0) < 0.06), k


def test_kurtosis_of_constructed_arrays_is_exact():
    # one spike a among N − 1 zeros: μ = a/N, σ² = a²(N−1)/N², μ₄ = a⁴(N−1)((N−1)³+1)/N⁵,
    # so μ₄/σ⁴ = ((N−1)³ + 1)/(N(N−1)) = (N² − 3N + 3)/(N − 1)
    N = 4 * 25
    spike = np.zeros((1, 4, 25))
    spike[0, 2, 7] = 123.0
    # two-point ±a: every |x − μ| = a, so μ₄/σ⁴ = a⁴/a⁴ = 1
    two_point = np.where(np.arange(40) % 2, 3.0, -3.0).reshape(1, 4, 10)
    # the discrete uniform on k equally spaced values: 3(3k² − 7) / (5(k² − 1))
    k = 60
    grid = np.linspace(-2.0, 5.0, k).reshape(1, 6, 10)
    got = [kurtosis_per_sequence(a)[0] for a in (spike, two_point, grid)]
    want = [(N * N - 3 * N + 3) / (N - 1), 1.0, 3 * (3 * k * k - 7) / (5 * (k * k - 1))]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_kurtosis_of_a_uniform_sample_is_one_point_eight_and_uses_central_moments():
    x = np.random.default_rng(2).uniform(-1.0, 1.0, (1, 500, 400))
    k = kurtosis_per_sequence(x)[0]
    assert abs(k - 1.8) < 0.01, k  # standard error ≈ 0.0012 at N = 2e5
    # central moments: a shift and a scale change nothing (raw moments would)
    np.testing.assert_allclose(kurtosis_per_sequence(3.0 * x + 40.0)[0], k, rtol=1e-9)
    # float32 input: the moments are taken in float64 (the same values to float32 rounding)
    np.testing.assert_allclose(kurtosis_per_sequence(x.astype(np.float32))[0], k, rtol=1e-6)


def test_statistics_average_per_sequence_then_over_sequences():
    rng = np.random.default_rng(3)
    one = rng.standard_normal((1, 5, 6)) * 10.0  # a batch of one sequence with a large ∞-norm
    three = rng.standard_normal((3, 5, 6))
    three[0, 0, 0] = 40.0  # a spiky sequence: its kurtosis differs from the others'
    stats = activation_statistics([one, three])
    inf = np.concatenate([inf_norm_per_sequence(one), inf_norm_per_sequence(three)])
    kurt = np.concatenate([kurtosis_per_sequence(one), kurtosis_per_sequence(three)])
    assert stats["n_sequences"] == 4
    np.testing.assert_allclose([stats["inf_norm"], stats["kurtosis"]], [inf.mean(), kurt.mean()],
                               rtol=1e-12)
    # not the mean of the two batch means, nor the statistics of everything pooled
    batch_means = np.mean([inf_norm_per_sequence(one).mean(), inf_norm_per_sequence(three).mean()])
    assert abs(stats["inf_norm"] - batch_means) > 1e-3
    pooled = kurtosis_per_sequence(np.concatenate([one, three]).reshape(1, 4, 30))[0]
    assert abs(stats["kurtosis"] - pooled) > 1e-2


@pytest.mark.parametrize("x, match", [
    (np.ones((2, 3, 4)), "all-equal"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    (np.arange(5.0), "B, T, C"),
    (np.zeros((0, 3, 4)), "no empty axis"),
    (np.arange(6).reshape(2, 3), "float"),
])
def test_bad_activations_are_refused(x, match):
    with pytest.raises(ValueError, match=match):
        kurtosis_per_sequence(x)
    if match != "all-equal":
        with pytest.raises(ValueError, match=match):
            inf_norm_per_sequence(x)


# ---- the instrumented forward ----------------------------------------------------------------


class _Recorder(Probe):
    def __init__(self):
        self.points, self.outputs, self.layers = [], [], []

    def point(self, name, x):
        self.points.append(name)
        return x

    def output(self, name, y):
        self.outputs.append(name)

    def attention(self, layer, P):
        self.layers.append(layer)


@pytest.mark.parametrize("config", [
    preset_config("gpt2", dtype="float32", d_model=16, n_heads=4, n_layers=2, vocab_size=13,
                  max_seq_len=12),
    tiny_config("llama2", dtype="float32"),  # GQA (4 heads, 2 kv heads), RoPE, RMSNorm, SwiGLU
    tiny_config("gpt-j", dtype="float32"),  # parallel block, partial interleaved RoPE
    # Gemma-2-like: sandwich norms, (1 + w) RMSNorms, GeGLU-tanh, soft-caps, a local layer
    tiny_config("llama3", dtype="float32", **GEMMA_LIKE),
], ids=lambda c: f"{c.norm}-{c.ffn}-{c.positions}-{c.block}-K{c.kv_heads}")
def test_instrumented_forward_equals_the_model_and_is_removed_afterwards(config):
    model = build_model(config, seed=5).eval()
    x = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.max_seq_len))
    expected = model.forward(x)  # the model's own path (numba kernels by default)
    copy = readable_copy(model)
    recorder = _Recorder()
    with instrumented(copy, recorder):
        got = copy.forward(x)
    assert_close(got, expected, config.np_dtype, "instrumented logits")
    # the wrappers ran: every block's attention, outputs and quantization points
    assert recorder.layers == list(range(config.n_layers))
    assert {f"layers.{l}" for l in range(config.n_layers)} <= set(recorder.outputs)
    assert "embed" in recorder.points and "layers.0.attn.q_proj" in recorder.points
    ffn_linears = {"ffn.up", "ffn.down"} | ({"ffn.gate"} if config.ffn in ("swiglu", "geglu",
                                                                        "geglu_tanh") else set())
    assert {f"layers.0.{n}" for n in ffn_linears} <= set(recorder.points)
    # ... and are gone: no instance attribute shadows a method, the core is the original pair
    for module_name, module in [("copy", copy)] + [(n, m) for n, m in _modules(copy)]:
        assert "forward" not in vars(module), module_name
    for block, original in zip(copy.layers, [b.attn.core for b in readable_copy(model).layers]):
        assert block.attn.core == original
    assert_close(copy.forward(x), expected, config.np_dtype, "after the block")


def _modules(module, prefix=""):
    for name, child in module.named_children():
        yield prefix + name, child
        yield from _modules(child, prefix + name + ".")


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
def test_the_gated_ffn_written_out_equals_the_fused_pair(kind):
    config = preset_config("llama2", dtype="float64", d_model=12, n_heads=2, n_kv_heads=1,
                           n_layers=1, vocab_size=11, max_seq_len=8, d_ff=20, ffn=kind)
    copy = readable_copy(build_model(config, seed=2))
    ffn = copy.layers[0].ffn
    assert isinstance(ffn, FeedForward) and ffn.kind == kind
    for p in ffn.parameters().values():  # weights far from init, so the activation matters
        p[...] = np.random.default_rng(4).standard_normal(p.shape)
    h = np.random.default_rng(5).standard_normal((2, 8, 12))
    fused, _ = ffn.forward(h)
    with instrumented(copy):
        written_out, _ = ffn.forward(h)
    assert_close(written_out, fused, np.float64, kind)


def test_the_callers_model_is_left_unchanged():
    model = _gpt2()
    x = _batches()[0]
    before = {n: p.copy() for n, p in model.parameters().items()}
    logits = model.forward(x)
    outlier_metrics(model, [x])
    for name, p in model.parameters().items():
        np.testing.assert_array_equal(p, before[name], err_msg=name)
    np.testing.assert_array_equal(model.forward(x), logits)
    assert model.config.attention_impl == "numba"


# ---- outlier_metrics -------------------------------------------------------------------------


def _expected_names(n_layers, norms=("attn_norm", "ffn_norm"), final=True):
    names = {"final_norm"} if final else set()
    for l in range(n_layers):
        names |= {f"layers.{l}", f"layers.{l}.attn.out_proj", f"layers.{l}.ffn.down"}
        names |= {f"layers.{l}.{n}" for n in norms}
    return names


@pytest.mark.parametrize("preset, norms, final", [
    ("gpt2", ("attn_norm", "ffn_norm"), True),
    ("gpt1", ("attn_norm", "ffn_norm"), False),  # post-norm, no final norm
    ("gpt-j", ("attn_norm",), True),  # one shared norm in the parallel block
    ("gemma-like", ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm"), True),
])
def test_metric_names_cover_every_monitored_module(preset, norms, final):
    config = (tiny_config("llama3", dtype="float32", **GEMMA_LIKE) if preset == "gemma-like"
              else tiny_config(preset, dtype="float32"))
    result = outlier_metrics(build_model(config, seed=1), _batches(config.vocab_size,
                                                                   ((2, 9),)))
    assert set(result["per_module"]) == _expected_names(config.n_layers, norms, final)
    json.dumps(result)  # JSON-serialisable
    for stats in result["per_module"].values():
        assert stats["inf_norm"] > 0 and stats["kurtosis"] >= 1.0  # μ₄ ≥ σ⁴ always
    worst = result["max_inf_norm_module"]
    assert result["max_inf_norm"] == result["per_module"][worst]["inf_norm"]
    assert result["max_inf_norm"] == max(s["inf_norm"] for s in result["per_module"].values())
    np.testing.assert_allclose(result["mean_kurtosis"], np.mean(
        [s["kurtosis"] for s in result["per_module"].values()]), rtol=1e-12)
    assert len(result["per_layer_max_inf_norm"]) == config.n_layers
    assert result["n_sequences"] == 2


def test_module_metrics_are_the_statistics_of_the_activation():
    model = _gpt2()
    batches = _batches()
    result = outlier_metrics(model, batches)
    # the final norm's input is the last block's output; recompute the final norm's output
    copy = readable_copy(model)
    finals = []

    class Keep(Probe):
        def output(self, name, y):
            if name == "final_norm":
                finals.append(y.copy())

    with instrumented(copy, Keep()):
        for x in batches:
            copy.forward(x)
    expected = activation_statistics(finals)
    got = result["per_module"]["final_norm"]
    np.testing.assert_allclose([got["inf_norm"], got["kurtosis"]],
                               [expected["inf_norm"], expected["kurtosis"]], rtol=1e-12)


def _uniform_attention(model):
    """Zero queries: every score is 0, so each row's attention is uniform over its keys."""
    for block in model.layers:
        block.attn.q_proj.params["weight"][...] = 0
        if "bias" in block.attn.q_proj.params:
            block.attn.q_proj.params["bias"][...] = 0
    return model


@pytest.mark.parametrize("softmax", ["softmax", "softmax1"])
def test_attention_masses_on_uniform_attention_are_known(softmax):
    # row t sees t + 1 keys with score 0: softmax gives each 1/(t+1), nothing unassigned;
    # softmax₁ gives each 1/(t+2) and leaves 1 − (t+1)/(t+2) = 1/(t+2) to the phantom key.
    # Averaged over the rows t = 1 … T−1 of every sequence.
    model = _uniform_attention(build_model(tiny_config("llama2", dtype="float64",
                                                       softmax=softmax), seed=0))
    T = 9
    result = outlier_metrics(model, _batches(model.config.vocab_size, ((2, T), (1, T))))
    t = np.arange(1, T)
    first = np.mean(1.0 / (t + 1)) if softmax == "softmax" else np.mean(1.0 / (t + 2))
    unassigned = 0.0 if softmax == "softmax" else np.mean(1.0 / (t + 2))
    L, H = model.config.n_layers, model.config.n_heads
    np.testing.assert_allclose(result["first_token_mass"], np.full((L, H), first), atol=1e-12)
    np.testing.assert_allclose(result["unassigned_mass"], np.full((L, H), unassigned), atol=1e-12)
    np.testing.assert_allclose(result["first_token_mass_mean"], first, atol=1e-12)
    np.testing.assert_allclose(result["unassigned_mass_mean"], unassigned, atol=1e-12)
    assert "gate_mean" not in result


@pytest.mark.parametrize("softmax", ["softmax", "softmax1"])
def test_attention_masses_of_a_random_model_lie_in_the_unit_interval(softmax):
    model = _gpt2(softmax=softmax, init_std=0.5)  # far from uniform attention
    result = outlier_metrics(model, _batches())
    first, unassigned = np.array(result["first_token_mass"]), np.array(result["unassigned_mass"])
    assert first.shape == unassigned.shape == (2, 4)
    assert np.all((first >= 0) & (first <= 1))
    if softmax == "softmax":
        assert np.all(np.abs(unassigned) < 1e-6)  # float32 row sums
    else:
        assert np.all((unassigned > 1e-3) & (unassigned <= 1))
        assert np.all(first + unassigned <= 1 + 1e-6)


@pytest.mark.parametrize("batches, match", [
    ([], "empty"),
    (np.zeros((2, 5), dtype=np.int64), "list of batches"),
    ([np.zeros(5, dtype=np.int64)], r"batches\[0\] must be a \(B, T\) integer array"),
    ([np.zeros((2, 5))], r"batches\[0\] must be a \(B, T\) integer array"),
    ([(np.zeros((2, 5), dtype=np.int64),)], r"batches\[0\] must be \(x, y\)"),
    ([np.zeros((2, 1), dtype=np.int64)], "T ≥ 2"),
    ([np.full((2, 5), 13)], r"ids must lie in \[0, 12\]"),
    ([np.zeros((2, 13), dtype=np.int64)], "max_seq_len"),
])
def test_bad_batches_are_refused(batches, match):
    with pytest.raises(ValueError, match=match):
        outlier_metrics(_gpt2(), batches)


def test_an_encoder_decoder_model_is_refused():
    model = build_model(tiny_config("transformer-2017"))
    with pytest.raises(ValueError, match="decoder-only.*EncoderDecoder.*encoder-decoder"):
        outlier_metrics(model, _batches(11))
    with pytest.raises(ValueError, match="decoder-only"):
        readable_copy(model)


def test_instrumented_needs_the_readable_copy():
    with pytest.raises(ValueError, match="readable_copy"):
        with instrumented(_gpt2()):
            pass


def test_trainer_batches_are_accepted_and_give_the_same_metrics():
    model = _gpt2()
    xs = _batches()
    plain = outlier_metrics(model, xs)
    trainer_style = outlier_metrics(model, [(x, x) for x in xs])
    assert plain == trainer_style


def test_gate_means_reach_the_map_through_the_instrumented_attention():
    # the gate of attention_gate is σ(x_h · w_h + b_h); with w = 0 every gate is σ(b_h)
    from npformer.study.outliers import OutlierProbe

    copy = readable_copy(_gpt2(attention_gate=True))
    bias = np.array([-2.0, -1.0, 0.0, 1.5])
    for block in copy.layers:
        block.attn.params["gate_weight"][...] = 0
        block.attn.params["gate_bias"][...] = bias
    points = []

    class Both(OutlierProbe):
        def point(self, name, x):
            points.append(name)
            return x

    probe = Both(2, 4, gated=True)
    with instrumented(copy, probe):
        for x in _batches():
            copy.forward(x)
    gates = np.stack([m.mean() for m in probe.gates])  # (L, H)
    np.testing.assert_allclose(gates, np.tile(1 / (1 + np.exp(-bias)), (2, 1)), rtol=1e-6)
    assert {"layers.0.attn", "layers.1.attn"} <= set(points)  # the gate's input is a point


def test_gate_means_of_a_fresh_gated_model_start_near_the_papers_quarter():
    result = outlier_metrics(_gpt2(attention_gate=True), _batches())
    gates = np.array(result["gate_mean"])
    assert gates.shape == (2, 4)
    np.testing.assert_allclose(gates, 0.25, atol=0.01)  # σ(logit 0.25), weights N(0, 0.02²)
