"""The model's layer implementation: the fused kernels (``layer_impl="numba"``, the default)
and the functional reference (``"numpy"``) are interchangeable — same logits, same gradients,
the same training run — for every preset; a NaN anywhere still stops training.

The kernels themselves are tested against their functional twins in tests/test_*_kernel*.py;
this file checks the wiring (which path each layer takes) and the whole model and step.
"""

import numpy as np
import pytest

from helpers import (assert_close, assert_gradcheck_passes, forward_backward, modules_of,
                     random_weight_model, tiny_train_options)
from npformer.config import ModelConfig
from npformer.kernels import norms as norm_kernels
from npformer.nn.feedforward import FeedForward
from npformer.nn.norm import LayerNorm, RMSNorm
from npformer.optim import AdamW, clip_grad_norm, grad_global_norm
from npformer.presets import preset_names, tiny_config
from npformer.train import Trainer, TrainingDiverged

# fused vs reference: the kernel tolerances of DESIGN.md
KERNEL_TOL = {"float64": 1e-12, "float32": 1e-5}


def _model(name, impl, dtype="float64", **overrides):
    return random_weight_model(name, dtype, layer_impl=impl, **overrides)


def _assert_same_model(fused, reference, dtype):
    logits_f, grads_f = forward_backward(fused)
    logits_r, grads_r = forward_backward(reference)
    tol = KERNEL_TOL[dtype]
    assert_close(logits_f, logits_r, np.dtype(dtype), "logits", rtol=tol, atol=0.0)
    # Gradients that are zero by structure (key biases: softmax ignores a shift shared by a
    # row) come out as rounding noise on both sides: an absolute floor of 10 ulps of the
    # model's largest gradient covers that noise only (as tests/test_attention_impl.py).
    floor = 10 * np.finfo(dtype).eps * max(float(np.max(np.abs(g))) for g in grads_r.values())
    assert set(grads_f) == set(grads_r)
    for key, g in grads_r.items():
        assert_close(grads_f[key], g, np.dtype(dtype), key, rtol=tol, atol=floor)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", preset_names())
def test_fused_and_reference_layers_give_the_same_model(name, dtype):
    fused, reference = _model(name, "numba", dtype), _model(name, "numpy", dtype)
    norms = modules_of(fused, (LayerNorm, RMSNorm))
    assert norms and all(m.pair[0] in (norm_kernels.layernorm_forward, norm_kernels.rmsnorm_forward)
                         for m in norms)
    assert all(m.pair[0].__module__ == "npformer.functional." + type(m).__name__.lower()
               for m in modules_of(reference, (LayerNorm, RMSNorm)))
    assert all(m.fused for m in modules_of(fused, FeedForward))
    assert not any(m.fused for m in modules_of(reference, FeedForward))
    _assert_same_model(fused, reference, dtype)


@pytest.mark.parametrize("name", ["gpt2", "transformer-2017", "gpt-j", "llama3"])
def test_fused_dropout_draws_the_same_masks(name):
    """Dropout on: the fused residual add draws its masks from the same generator calls, so
    both paths drop the same units (sequential, post-norm, parallel and GLU blocks)."""
    fused = _model(name, "numba", dropout=0.3)
    reference = _model(name, "numpy", dropout=0.3)
    _assert_same_model(fused, reference, "float64")


def test_the_default_is_the_fused_path_and_a_bad_impl_is_refused():
    assert ModelConfig().layer_impl == "numba" and tiny_config("llama3").layer_impl == "numba"
    with pytest.raises(ValueError, match="layer_impl='torch' is invalid"):
        tiny_config("gpt2", layer_impl="torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        LayerNorm(8, impl="torch")
    with pytest.raises(ValueError, match="impl must be"):
        AdamW({"w": np.zeros(3)}, lr=0.1, impl="torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        clip_grad_norm({"w": np.ones(3)}, 1.0, impl="numbaa")


# ---- the optimizer and the clip through the kernels ---------------------------------------


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_fused_adamw_and_clip_follow_the_reference(dtype, tol):
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "norm.weight": (5,), "b.weight": (3, 129)}
    params = {impl: {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
              for impl in ("numba",)}
    params["numpy"] = {n: p.copy() for n, p in params["numba"].items()}
    optimizers = {impl: AdamW(params[impl], lr=3e-3, weight_decay=0.1, impl=impl)
                  for impl in ("numba", "numpy")}
    for step in range(5):
        grads = {n: (10 * rng.standard_normal(s)).astype(dtype) for n, s in shapes.items()}
        copies = {impl: {n: g.copy() for n, g in grads.items()} for impl in ("numba", "numpy")}
        norms = {impl: clip_grad_norm(copies[impl], 1.0, impl=impl) for impl in copies}
        assert norms["numba"] == pytest.approx(norms["numpy"], rel=1e-12)
        assert grad_global_norm(copies["numba"], impl="numba") == pytest.approx(1.0, rel=1e-5)
        for impl, optimizer in optimizers.items():
            optimizer.step(copies[impl], lr=3e-3 * (step + 1))
        for n in shapes:
            assert_close(params["numba"][n], params["numpy"][n], np.dtype(dtype), n, rtol=tol,
                         atol=tol)


# ---- training: the same run, and a NaN anywhere stops it ----------------------------------


def _trainer(tmp_path, preset, impl, **changes):
    changes = dict(dict(steps=20, dtype="float64"), **changes)
    options = tiny_train_options(tmp_path, f"{preset}-{impl}", preset=preset, **changes)
    options.model_overrides = dict(options.model_overrides, n_layers=2, layer_impl=impl)
    return Trainer(options, progress=False)


@pytest.mark.parametrize("preset", ["gpt2", "llama3", "transformer-2017"])
def test_fused_and_reference_training_give_the_same_loss_curve(tmp_path, preset):
    """20 steps of AdamW with warm-up, cosine decay and clipping, float64: the two paths
    stay within 1e-10 of each other (losses and gradient norms, every step)."""
    curves = {}
    for impl in ("numba", "numpy"):
        trainer = _trainer(tmp_path, preset, impl)
        assert trainer.model.config.layer_impl == impl
        curves[impl] = [trainer.train_step() for _ in range(20)]
    for fused, reference in zip(curves["numba"], curves["numpy"]):
        assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-10, abs=0)
        assert fused["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-10, abs=0)
    assert curves["numba"][-1]["loss"] < curves["numba"][0]["loss"]  # it did train


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("where", ["embed.tokens.weight", "layers.0.attn_norm.weight",
                                   "layers.0.attn.q_proj.weight", "layers.1.ffn.up.weight",
                                   "layers.1.ffn.down.bias", "final_norm.weight"])
def test_a_nan_anywhere_stops_training_with_the_divergence_message(tmp_path, where, impl):
    """A NaN written into one weight between steps (as a blown-up update would) must stop
    the next step with the divergence message, on the fused path too, where the layers do
    not scan their inputs."""
    trainer = _trainer(tmp_path, "gpt2", impl)
    trainer.train_step()
    trainer.model.parameters()[where].reshape(-1)[1] = np.nan
    with pytest.raises(TrainingDiverged, match=r"the loss became .*at step 2.*lower --lr"):
        trainer.train_step()


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_an_overflow_inside_the_model_stops_training(tmp_path, impl):
    """Finite weights of size 1e30 in the FFN's output projection: the next LayerNorm's
    variance (~1e60) overflows float32. A divergence, never zeros or a finite wrong loss."""
    trainer = _trainer(tmp_path, "gpt2", impl, dtype="float32")
    trainer.train_step()
    weight = trainer.model.parameters()["layers.0.ffn.down.weight"]
    weight[...] = 1e30 * np.random.default_rng(0).standard_normal(weight.shape)
    with pytest.raises(TrainingDiverged, match=r"the loss became .*at step 2"):
        trainer.train_step()


def test_the_cli_selects_the_readable_path(tmp_path):
    """``npformer train --layer-impl numpy --attention-impl numpy``: the run's config says so
    and the run trains (the whole step through the functional pairs)."""
    import json

    from npformer.cli import main

    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "8",
                 "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--no-progress",
                 "--sample-tokens", "0", "--layer-impl", "numpy", "--attention-impl", "numpy"])
    config = json.loads((out / "config.json").read_text())
    assert code == 0 and config["layer_impl"] == "numpy" and config["attention_impl"] == "numpy"
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "bad"), "--layer-impl", "torch"])


# every kernel through finite differences (npformer/checks/fused_layers.py)
FUSED_CHECKS = ["fused_layernorm", "fused_rmsnorm", "fused_gelu", "fused_gelu_tanh", "fused_silu",
                "fused_swiglu", "fused_geglu", "fused_rope", "fused_residual_dropout",
                "fused_cross_entropy", "fused_embedding"]


@pytest.mark.parametrize("name", FUSED_CHECKS)
def test_every_kernel_passes_its_finite_difference_check(name):
    from npformer.gradcheck import run_checks

    reports = run_checks([name])
    assert {r.name for r in reports} == {name}
    assert_gradcheck_passes(reports)
