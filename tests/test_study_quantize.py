"""npformer.study.quantize: the quantizers on known inputs, which weights and activations are
quantized, the calibration's data, and the loss cost on a model with an injected outlier."""

import numpy as np
import pytest

from npformer.models import build_model
from npformer.presets import preset_config, tiny_config
from npformer.study.instrument import instrumented, readable_copy
from npformer.study.quantize import (_ActivationQuantizer, calibrate_activations, mse_range,
                                     parse_mode, quantize_asymmetric, quantize_symmetric,
                                     quantize_weights, quantized_losses,
                                     quantized_weight_names)
from npformer.tour.jobs import mean_nll

# ---- the quantizers --------------------------------------------------------------------------


def test_symmetric_grid_values_round_trip_exactly_and_the_scale_is_max_over_127():
    scale = 0.25  # a power of two: k·s and 127·s/127 are exact
    grid = np.arange(-127, 128) * scale
    q = quantize_symmetric(grid, 8)
    assert q.scale == scale
    np.testing.assert_array_equal(q.values, grid)
    # off-grid values go to the nearest grid value
    x = np.array([127 * 0.02, 0.013, -0.011, 0.0049])
    q = quantize_symmetric(x, 8)
    np.testing.assert_allclose(q.scale, 0.02, rtol=1e-15)
    np.testing.assert_allclose(q.values, [2.54, 0.02, -0.02, 0.0], rtol=1e-12)
    # 4 bits: 7 levels each side
    q4 = quantize_symmetric(np.array([7.0, 2.4, -3.6]), 4)
    assert q4.scale == 1.0
    np.testing.assert_array_equal(q4.values, [7.0, 2.0, -4.0])


def test_symmetric_clips_outside_its_range_and_keeps_the_dtype():
    x = np.array([3.0, -3.0, 0.5, -0.25], dtype=np.float32)
    q = quantize_symmetric(x, 8, max_abs=1.0)
    assert q.values.dtype == np.float32
    np.testing.assert_allclose(q.values, [1.0, -1.0, 64 / 127, -32 / 127], rtol=1e-6)
    zero = quantize_symmetric(np.zeros(3), 8)
    assert zero.scale == 0.0 and not zero.values.any()


def test_asymmetric_scale_zero_point_clipping_and_round_trip():
    lo, hi = -1.0, 3.0
    s = 4.0 / 255
    q = quantize_asymmetric(np.array([-1.0, 0.0, 1.0, 10.0, -5.0]), lo, hi, 8)
    assert q.scale == pytest.approx(s, rel=1e-15)
    assert q.zero_point == 64  # round(1 / s) = round(63.75)
    # −1 → round(−63.75) + 64 = 0; 1 → round(63.75) + 64 = 128; 10 and −5 clip to 255 and 0
    np.testing.assert_allclose(q.values, [-64 * s, 0.0, 64 * s, 191 * s, -64 * s], rtol=1e-12)
    grid = (np.arange(256) - 64) * s
    np.testing.assert_allclose(quantize_asymmetric(grid, lo, hi, 8).values, grid, rtol=0,
                               atol=1e-15)
    # a range that excludes 0 is widened to contain it: [0.5, 3] → [0, 3], zero point 0
    q = quantize_asymmetric(np.array([0.0, 1.0, -1.0]), 0.5, 3.0, 8)
    assert q.zero_point == 0 and q.scale == pytest.approx(3 / 255, rel=1e-15)
    np.testing.assert_allclose(q.values, [0.0, 85 * 3 / 255, 0.0], rtol=1e-12)
    # 16 bits: 65535 levels
    q16 = quantize_asymmetric(np.array([0.3]), -1.0, 1.0, 16)
    assert q16.scale == pytest.approx(2 / 65535, rel=1e-15)
    assert abs(q16.values[0] - 0.3) <= q16.scale / 2
    # nothing but zeros seen: everything maps to 0
    assert not quantize_asymmetric(np.array([1.0, -2.0]), 0.0, 0.0, 8).values.any()


@pytest.mark.parametrize("call, match", [
    (lambda: quantize_asymmetric(np.ones(2), 1.0, -1.0), "lo ≤ hi"),
    (lambda: quantize_asymmetric(np.ones(2), np.nan, 1.0), "lo must be a finite number"),
    (lambda: quantize_asymmetric(np.ones(2), -1.0, 1.0, bits=1), "bits must be an integer >= 2"),
    (lambda: quantize_symmetric(np.ones(2), bits=17), r"bits must be an integer in \[2, 16\]"),
    (lambda: quantize_symmetric(np.ones(2), bits=8.0), "bits must be an integer"),
    (lambda: quantize_symmetric(np.array([1.0, np.inf])), "inf"),
    (lambda: quantize_symmetric(np.arange(3)), "float"),
    (lambda: quantize_symmetric(np.ones(2), max_abs=-1.0), "max_abs must be ≥ 0"),
])
def test_bad_quantizer_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _squared_error(w, bits, max_abs):
    return float(np.sum((quantize_symmetric(w, bits, max_abs).values - w) ** 2))


def test_the_mse_range_clips_a_lone_outlier_and_never_does_worse_than_minmax():
    w = np.random.default_rng(0).standard_normal(2000) * 0.02
    w[0] = 1.0  # one weight 50σ out
    m = mse_range(w, 4)
    assert m < 0.5
    assert _squared_error(w, 4, m) < _squared_error(w, 4, None)
    gaussian = np.random.default_rng(1).standard_normal(2000)
    assert _squared_error(gaussian, 8, mse_range(gaussian, 8)) <= _squared_error(gaussian, 8, None)


@pytest.mark.parametrize("mode, bits", [("W8A8", (8, 8)), ("W8", (8, None)), ("A8", (None, 8)),
                                        ("W4A16", (4, 16))])
def test_modes_parse(mode, bits):
    assert parse_mode(mode) == bits


@pytest.mark.parametrize("mode", ["", "int8", "W8A", "A1", "W32", "w8a8", 8, "fp32", "delta"])
def test_unknown_modes_are_refused(mode):
    with pytest.raises(ValueError, match="mode"):
        parse_mode(mode)


# ---- which weights, which activations ---------------------------------------------------------


def _model(preset="gpt2", **changes):
    base = dict(dtype="float32", d_model=16, n_heads=4, n_layers=2, vocab_size=13, max_seq_len=12)
    if preset != "gpt2":
        return build_model(tiny_config(preset, dtype="float32", **changes), seed=2).eval()
    return build_model(preset_config("gpt2", **{**base, **changes}), seed=2).eval()


@pytest.mark.parametrize("preset, ffn", [("gpt2", ("up", "down")),
                                         ("llama2", ("gate", "up", "down"))])
def test_every_block_linear_weight_and_nothing_else_is_quantized(preset, ffn):
    copy = readable_copy(_model(preset))
    names = [f"layers.{l}.attn.{p}.weight" for l in range(2)
             for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    names += [f"layers.{l}.ffn.{p}.weight" for l in range(2) for p in ffn]
    assert sorted(quantized_weight_names(copy)) == sorted(names)
    before = {n: p.copy() for n, p in copy.parameters().items()}
    quantize_weights(copy, 8)
    for name, p in copy.parameters().items():
        if name in names:
            assert len(np.unique(p)) <= 255, name  # 8-bit: at most 255 distinct values
            assert not np.array_equal(p, before[name]), name
            np.testing.assert_allclose(p, before[name], atol=np.abs(before[name]).max() / 254
                                       * (1 + 1e-6))
        else:  # embeddings, positions, norms, biases, head
            np.testing.assert_array_equal(p, before[name], err_msg=name)


def test_calibration_ranges_come_from_the_calibration_batches_only():
    model = _model()
    rng = np.random.default_rng(3)
    calibration = [rng.integers(0, 4, (2, 12))]  # tokens 0..3 only
    ranges = calibrate_activations(model, calibration)
    # the embedding output entering block 0 is W_tok[x] + P[t]: its range by hand
    params = model.parameters()
    embedded = params["embed.tokens.weight"][calibration[0]] + params["embed.position_table"]
    assert ranges["embed"] == (float(embedded.min()), float(embedded.max()))
    points = {"embed", "layers.0", "layers.1"} | {
        f"layers.{l}.{p}" for l in range(2)
        for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn.up",
                  "ffn.down")}
    assert set(ranges) == points
    # quantized_losses calibrates on its calibration batches, not on the evaluation ones
    eval_batches = [(x, rng.integers(0, 13, x.shape)) for x in [rng.integers(0, 13, (3, 12))]]
    got = quantized_losses(model, calibration, eval_batches, modes=("A8",))["A8"]
    copy = readable_copy(model)
    with instrumented(copy, _ActivationQuantizer(ranges, 8)):
        expected = mean_nll(copy, eval_batches)
    assert got == pytest.approx(expected, rel=1e-12)
    other = quantized_losses(model, [x for x, _ in eval_batches], eval_batches, modes=("A8",))
    assert abs(other["A8"] - got) > 1e-6  # the calibration data matters


def _outlier_model(dtype="float32", inject=True):
    """A GPT-2-like model whose predictions depend strongly on its input (weights of std 0.3),
    with, if ``inject``, one FFN hidden unit per layer at ≈ 300 (bias 300) whose output
    column is 0: the float model does not see it, but the down projection's input range is
    [−0.17, 300], so 8-bit activations (step ≈ 1.2) flatten every other hidden unit."""
    config = preset_config("gpt2", dtype=dtype, d_model=32, n_layers=2, vocab_size=20,
                           max_seq_len=16, init_std=0.3, scaled_residual_init=False)
    model = build_model(config, seed=0).eval()
    if inject:
        for block in model.layers:
            block.ffn.up.params["bias"][0] = 300.0
            block.ffn.down.params["weight"][:, 0] = 0.0
    return model


def _own_prediction_batches(model, n=2, seed=0):
    """Targets = the float model's own argmax, so the float loss is low and a damaged model's
    higher."""
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, model.config.vocab_size, (4, 16)) for _ in range(n)]
    return [(x, model.forward(x).argmax(axis=-1)) for x in xs]


def test_16_bits_cost_nothing_and_8_bits_cost_loss_with_an_outlier():
    model = _outlier_model()
    batches = _own_prediction_batches(model)
    # calibrated on the evaluation batches themselves, so nothing is clipped: what is left
    # is the rounding, ≈ 2⁻¹⁶ of each range at 16 bits
    result = quantized_losses(model, [x for x, _ in batches], batches,
                              modes=("W16A16", "W8A8", "W8", "A8"))
    delta = result["delta"]
    assert set(result) == {"fp32", "W16A16", "W8A8", "W8", "A8", "delta"}
    assert abs(delta["W16A16"]) < 2e-3, delta
    assert delta["W8A8"] > 0.05 and delta["A8"] > 0.05, delta
    assert delta["A8"] > 20 * abs(delta["W16A16"])
    for mode in delta:
        assert delta[mode] == result[mode] - result["fp32"]
    # the float loss is the model's own
    assert result["fp32"] == pytest.approx(mean_nll(model, batches), rel=1e-5)
    # without the outlier the same model loses far less at A8
    clean = _outlier_model(inject=False)
    clean_batches = _own_prediction_batches(clean)
    clean_delta = quantized_losses(clean, [x for x, _ in clean_batches], clean_batches,
                                   modes=("A8",))["delta"]["A8"]
    assert delta["A8"] > 10 * abs(clean_delta), (delta["A8"], clean_delta)


def test_quantized_losses_leave_the_model_unchanged_and_work_with_the_mse_range():
    model = _model("llama2")
    before = {n: p.copy() for n, p in model.parameters().items()}
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8)))]
    result = quantized_losses(model, [batches[0][0]], batches, modes=("W8",),
                              weight_range="mse")
    assert np.isfinite(result["W8"])
    for name, p in model.parameters().items():
        np.testing.assert_array_equal(p, before[name], err_msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(modes=("W8A8", "int4")), "unknown quantization mode 'int4'"),
    (dict(modes="W8A8"), "modes must be a non-empty list"),
    (dict(modes=()), "modes must be a non-empty list"),
    (dict(calibration_batches=[]), "calibration_batches is empty"),
    (dict(eval_batches=[]), "eval_batches is empty"),
    (dict(eval_batches=[np.zeros((2, 5), dtype=np.int64)]), "trainer batch"),
    (dict(eval_batches=[(np.zeros((2, 5), dtype=np.int64), np.zeros((2, 4), dtype=np.int64))]),
     r"targets y must be an integer array of the shape of x \(2, 5\)"),
    (dict(calibration_batches=[np.zeros((2, 5))]), r"calibration_batches\[0\]"),
    (dict(weight_range="percentile"), "weight_range"),
])
def test_bad_arguments_are_refused(kwargs, match):
    x = np.zeros((2, 5), dtype=np.int64)
    arguments = dict(calibration_batches=[x], eval_batches=[(x, x)])
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        quantized_losses(_model(), **arguments)


def test_an_encoder_decoder_model_is_refused():
    model = build_model(tiny_config("transformer-2017"))
    x = np.zeros((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="decoder-only.*encoder-decoder"):
        quantized_losses(model, [x], [(x, x)])
    with pytest.raises(ValueError, match="decoder-only"):
        calibrate_activations(model, [x])
