"""optim: SGD and AdamW against torch.optim step by step, the lr schedule against LambdaLR,
clip_grad_norm against torch.nn.utils.clip_grad_norm_, exact state round trips, bad input."""

import io
import math

import numpy as np
import pytest
import torch

from helpers import assert_close
from npformer.interop.safetensors_file import load_file, save_file
from npformer.models import build_model
from npformer.optim import (SGD, AdamW, clip_grad_norm, default_no_decay, flatten_state,
                            from_flat_state, lr_at)
from npformer.presets import tiny_config

# Optimizer parity (max abs diff relative to max|p|, per tensor): float64 1e-12, float32 1e-6.
OPT_RTOL = {np.float64: 1e-12, np.float32: 1e-6}

# Names as a DecoderLM has them, odd sizes (V=13, C=6, P=7, F=5).
SHAPES = {
    "embed.tokens.weight": (13, 6),
    "embed.position_table": (7, 6),
    "layers.0.attn_norm.weight": (6,),
    "layers.0.attn_norm.bias": (6,),
    "layers.0.attn.q_proj.weight": (10, 6),
    "layers.0.attn.q_proj.bias": (10,),
    "layers.0.ffn.up.weight": (5, 6),
    "final_norm.weight": (6,),
    "lm_head.weight": (13, 6),
}
DECAYED = {"layers.0.attn.q_proj.weight", "layers.0.ffn.up.weight", "lm_head.weight"}
N_STEPS = 12
WARMUP = 3


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 1.7 + 0.3).astype(dtype)
            for name, shape in SHAPES.items()}


def make_grads(dtype, n_steps=N_STEPS, seed=1):
    """A fixed sequence of gradient dicts; scales vary per step and tensor (1e-6 ... 10)."""
    rng = np.random.default_rng(seed)
    sequence = []
    for _ in range(n_steps):
        grads = {}
        for name, shape in SHAPES.items():
            scale = 10 ** rng.uniform(-2, 1) if name != "final_norm.weight" else 1e-6
            grads[name] = (rng.standard_normal(shape) * scale + 0.1 * scale).astype(dtype)
        sequence.append(grads)
    return sequence


def torch_lambda(warmup, total, min_ratio):
    """The schedule written independently, as a factor for torch's LambdaLR."""
    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        if s >= total:
            return min_ratio
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    return factor


def torch_params(params):
    return {name: torch.tensor(p.copy(), requires_grad=True) for name, p in params.items()}


def run_both(ours, params, theirs, tparams, base_lr, dtype, buffer_pairs):
    """Feed the same gradients to both for N_STEPS steps, lr per lr_at / LambdaLR; compare
    the parameters after every step and the optimizer state at the end."""
    min_lr = base_lr / 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(theirs, torch_lambda(WARMUP, N_STEPS, 0.1))
    for step, grads in enumerate(make_grads(dtype)):
        lr = lr_at(step, base_lr, WARMUP, N_STEPS, min_lr)
        assert math.isclose(lr, theirs.param_groups[0]["lr"], rel_tol=1e-14)
        kept = {name: g.copy() for name, g in grads.items()}
        ours.step(grads, lr=lr)
        for name, t in tparams.items():
            t.grad = torch.from_numpy(grads[name].copy())
        theirs.step()
        scheduler.step()
        for name, p in params.items():
            assert p.dtype == dtype
            np.testing.assert_array_equal(grads[name], kept[name])  # grads are never modified
            assert_close(p, tparams[name], dtype, f"step {step + 1} {name}",
                         rtol=OPT_RTOL[dtype], atol=0.0)
    assert ours.step_count == N_STEPS
    for ours_kind, torch_kind in buffer_pairs:
        for name, t in tparams.items():
            buf = ours.buffers[ours_kind][name]
            assert buf.dtype == dtype
            assert_close(buf, theirs.state[t][torch_kind], dtype, f"{ours_kind} {name}",
                         rtol=OPT_RTOL[dtype], atol=0.0)


SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.7, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
    dict(weight_decay=0.05),
    dict(momentum=0.8, dampening=0.1, weight_decay=0.02),
    dict(momentum=0.95, nesterov=True, weight_decay=0.1),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sgd_matches_torch(dtype, config):
    params = make_params(dtype)
    tparams = torch_params(params)
    ours = SGD(params, lr=0.05, **config)
    theirs = torch.optim.SGD(list(tparams.values()), lr=0.05, **config)
    buffers = [("momentum_buffer", "momentum_buffer")] if config.get("momentum") else []
    run_both(ours, params, theirs, tparams, 0.05, dtype, buffers)
    if not config.get("momentum"):
        assert ours.buffers["momentum_buffer"] == {}


ADAMW_CONFIGS = [
    dict(),  # torch defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
    dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(betas=(0.3, 0.6), eps=1e-10, weight_decay=0.3),  # beta1 < 0.5: lerp's other branch
    dict(betas=(0.95, 0.95), eps=1e-3, weight_decay=0.0),
    dict(betas=(0.0, 0.5), eps=1e-7, weight_decay=0.02),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_adamw_matches_torch(dtype, config):
    params = make_params(dtype)
    tparams = torch_params(params)
    ours = AdamW(params, lr=3e-2, **config)
    assert set(params) - ours.no_decay_names == DECAYED
    wd = config.get("weight_decay", 0.01)
    groups = [
        {"params": [tparams[n] for n in params if n in DECAYED], "weight_decay": wd},
        {"params": [tparams[n] for n in params if n not in DECAYED], "weight_decay": 0.0},
    ]
    theirs = torch.optim.AdamW(groups, lr=3e-2, **{k: v for k, v in config.items() if k != "weight_decay"})
    run_both(ours, params, theirs, tparams, 3e-2, dtype,
             [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")])
    for t in tparams.values():
        assert int(theirs.state[t]["step"]) == ours.step_count


@pytest.mark.parametrize("no_decay", [set(), {"lm_head.weight", "layers.0.attn_norm.bias"},
                                      lambda name, p: name.startswith("layers.")])
def test_adamw_custom_no_decay_matches_torch(no_decay):
    dtype = np.float64
    params = make_params(dtype)
    tparams = torch_params(params)
    ours = AdamW(params, lr=1e-2, weight_decay=0.2, no_decay=no_decay)
    expected = {n for n in params if (no_decay(n, params[n]) if callable(no_decay) else n in no_decay)}
    assert ours.no_decay_names == expected
    for name in params:
        assert ours.weight_decay_of(name) == (0.0 if name in expected else 0.2)
    groups = [{"params": [tparams[n] for n in params if n not in expected]},
              {"params": [tparams[n] for n in params if n in expected], "weight_decay": 0.0}]
    theirs = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-2, weight_decay=0.2)
    run_both(ours, params, theirs, tparams, 1e-2, dtype, [("exp_avg", "exp_avg")])


def test_weight_decay_is_decoupled_and_per_group():
    # zero gradients: Adam's update is 0/(0+eps) = 0, only the decay acts: p(1 - lr*wd)
    params = make_params(np.float64)
    before = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    opt.step({n: np.zeros_like(p) for n, p in params.items()})
    for name, p in params.items():
        factor = 1 - 0.1 * 0.5 if name in DECAYED else 1.0
        np.testing.assert_array_equal(p, before[name] * factor)


def test_default_no_decay_on_real_models():
    for preset in ("gpt2", "gpt1", "llama2", "gpt-j", "palm"):
        model = build_model(tiny_config(preset))
        params = model.parameters()
        decayed = {n for n, p in params.items() if not default_no_decay(n, p)}
        # exactly the 2-D weights of linear layers (and an untied head)
        expected = {n for n, p in params.items() if p.ndim == 2 and n not in
                    ("embed.tokens.weight", "embed.position_table")}
        assert decayed == expected, preset
        assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert default_no_decay("model.embed.tokens.weight", np.zeros((3, 2)))
    assert default_no_decay("layers.3.ffn.up.bias", np.zeros(4))
    assert not default_no_decay("layers.3.ffn.up.weight", np.zeros((4, 2)))


def test_updates_model_parameters_in_place():
    model = build_model(tiny_config("gpt2"))
    params = model.parameters()
    ids = np.arange(8).reshape(2, 4) % model.config.vocab_size
    logits = model.forward(ids)
    model.zero_grad()
    model.backward(np.full(logits.shape, 0.01))
    before = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=1e-2)
    opt.step(model.gradients())
    after = model.parameters()
    for name in params:
        assert after[name] is params[name]
    changed = [n for n in params if not np.array_equal(after[n], before[n])]
    assert "layers.0.attn.q_proj.weight" in changed and "embed.tokens.weight" in changed


# ---- schedule --------------------------------------------------------------------------------


def test_lr_at_hand_values():
    base, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    assert lr_at(0, base, warmup, total, min_lr) == pytest.approx(1e-4, rel=1e-15)  # base/W
    assert lr_at(4, base, warmup, total, min_lr) == pytest.approx(5e-4, rel=1e-15)
    assert lr_at(9, base, warmup, total, min_lr) == base  # end of warm-up
    assert lr_at(10, base, warmup, total, min_lr) == base  # first decay step: cos 0 = 1
    assert lr_at(60, base, warmup, total, min_lr) == pytest.approx(5.5e-4, rel=1e-14)  # midpoint
    last = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * 0.99))
    assert lr_at(109, base, warmup, total, min_lr) == pytest.approx(last, rel=1e-14)
    assert lr_at(109, base, warmup, total, min_lr) > min_lr
    assert lr_at(110, base, warmup, total, min_lr) == min_lr
    assert lr_at(500, base, warmup, total, min_lr) == min_lr
    assert lr_at(0, base, 0, total) == base  # no warm-up
    assert lr_at(3, base, 50, 5) == pytest.approx(base * 4 / 50)  # warm-up longer than the run
    assert isinstance(lr_at(3, base, warmup, total), float)


@pytest.mark.parametrize("warmup,total,min_ratio", [(5, 40, 0.1), (0, 17, 0.0), (1, 2, 0.5), (7, 7, 0.2)])
def test_lr_at_matches_lambda_lr(warmup, total, min_ratio):
    base = 3e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, torch_lambda(warmup, total, min_ratio))
    for step in range(total + 3):
        ours = lr_at(step, base, warmup, total, base * min_ratio)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-14, abs=0), step
        opt.step()
        scheduler.step()


# ---- clipping --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm", [0.5, 1e3, "equal"])
def test_clip_grad_norm_matches_torch(dtype, max_norm):
    grads = make_grads(dtype, n_steps=1, seed=5)[0]
    expected_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    if max_norm == "equal":  # norm == max_norm: torch still scales by max/(max + 1e-6)
        max_norm = expected_norm
    tensors = []
    for g in grads.values():
        t = torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype, requires_grad=True)
        t.grad = torch.from_numpy(g.copy())
        tensors.append(t)
    before = {n: g.copy() for n, g in grads.items()}
    norm = clip_grad_norm(grads, max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert isinstance(norm, float)
    assert_close(np.array(norm), torch_norm, dtype, "norm")
    assert norm == pytest.approx(expected_norm, rel=1e-14)
    for (name, g), t in zip(grads.items(), tensors):
        assert g.dtype == dtype
        assert_close(g, t.grad, dtype, name)
    if max_norm == 1e3:  # no clipping: untouched, bit for bit
        for name, g in grads.items():
            np.testing.assert_array_equal(g, before[name])
    else:
        clipped = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        assert clipped == pytest.approx(max_norm, rel=1e-6)
        if dtype == np.float64:  # scaled by max/(norm + 1e-6) < 1, even when norm == max_norm
            assert clipped < max_norm
            assert not np.array_equal(grads["lm_head.weight"], before["lm_head.weight"])


def test_clip_grad_norm_non_finite_returned_not_applied():
    params = make_params(np.float64)
    grads = {n: np.ones_like(p) for n, p in params.items()}
    grads["layers.0.ffn.up.weight"][1, 2] = np.nan
    kept = {n: g.copy() for n, g in grads.items()}
    assert math.isnan(clip_grad_norm(grads, 1.0))
    for name, g in grads.items():
        np.testing.assert_array_equal(g, kept[name])  # NaN compares equal in assert_array_equal
    grads["layers.0.ffn.up.weight"][1, 2] = np.inf
    assert clip_grad_norm(grads, 1.0) == math.inf
    with pytest.raises(ValueError, match=r"grads\['layers.0.ffn.up.weight'\].*NaN or infinite"):
        AdamW(params, lr=1e-3).step(grads)
    assert clip_grad_norm({}, 1.0) == 0.0


# ---- state -----------------------------------------------------------------------------------


OPTIMIZERS = [
    lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: SGD(p, lr=0.05, momentum=0.6, dampening=0.2),
    lambda p: AdamW(p, lr=3e-2, betas=(0.85, 0.98), weight_decay=0.1),
]


def _run(opt, grads_seq, start, stop):
    for step in range(start, stop):
        opt.step({n: g.copy() for n, g in grads_seq[step].items()},
                 lr=lr_at(step, 0.05, WARMUP, 10, 0.005))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("storage", ["savez", "safetensors"])
def test_resume_is_bit_identical(dtype, which, storage, tmp_path):
    make = OPTIMIZERS[which]
    grads_seq = make_grads(dtype, n_steps=10, seed=3)
    params_a = make_params(dtype)
    opt_a = make(params_a)
    _run(opt_a, grads_seq, 0, 10)

    params_b = make_params(dtype)
    opt_b = make(params_b)
    _run(opt_b, grads_seq, 0, 5)
    flat = opt_b.flat_state()
    assert flat["step"].shape == () and flat["step"].dtype == np.int64 and int(flat["step"]) == 5
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    if storage == "savez":
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        buffer.seek(0)
        with np.load(buffer, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    else:
        save_file(flat, str(tmp_path / "optimizer.safetensors"))
        stored = load_file(str(tmp_path / "optimizer.safetensors"))

    params_c = {n: p.copy() for n, p in params_b.items()}
    opt_c = make(params_c)
    opt_c.load_flat_state(stored)
    assert opt_c.step_count == 5
    _run(opt_c, grads_seq, 5, 10)
    for name in params_a:
        assert params_c[name].dtype == dtype
        np.testing.assert_array_equal(params_c[name], params_a[name], err_msg=name)
    state_a, state_c = opt_a.state_dict(), opt_c.state_dict()
    assert state_a.keys() == state_c.keys() and state_c["step"] == 10
    for kind in state_a:
        if kind != "step":
            for name in params_a:
                np.testing.assert_array_equal(state_c[kind][name], state_a[kind][name])


def test_state_dict_is_a_copy_and_round_trips():
    params = make_params(np.float64)
    opt = AdamW(params, lr=1e-2)
    _run(opt, make_grads(np.float64, n_steps=2), 0, 2)
    state = opt.state_dict()
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"] == 2
    state["exp_avg"]["lm_head.weight"][...] = 123.0  # editing the copy changes nothing
    assert not np.any(opt.buffers["exp_avg"]["lm_head.weight"] == 123.0)
    flat = opt.flat_state()
    assert "exp_avg.layers.0.attn.q_proj.weight" in flat
    assert "exp_avg_sq.embed.position_table" in flat
    back = from_flat_state(flat)
    assert back.keys() == {"step", "exp_avg", "exp_avg_sq"}
    assert flatten_state(back).keys() == flat.keys()
    # SGD with momentum has no buffer before its first step; the state says so
    sgd = SGD(make_params(np.float64), lr=0.1, momentum=0.9)
    assert sgd.flat_state().keys() == {"step"}
    sgd.load_flat_state(sgd.flat_state())
    assert sgd.buffers["momentum_buffer"] == {}


def test_load_state_errors():
    params = make_params(np.float64)
    opt = AdamW(params, lr=1e-2)
    good = opt.state_dict()

    def altered(kind, name, value):
        state = opt.state_dict()
        if value is None:
            del state[kind][name]
        else:
            state[kind][name] = value
        return state

    with pytest.raises(ValueError, match=r"exp_avg\.lm_head\.weight must have shape"):
        opt.load_state_dict(altered("exp_avg", "lm_head.weight", np.zeros((6, 13))))
    with pytest.raises(ValueError, match=r"exp_avg_sq\.final_norm\.weight has dtype float32"):
        opt.load_state_dict(altered("exp_avg_sq", "final_norm.weight", np.zeros(6, np.float32)))
    with pytest.raises(ValueError, match=r"no tensor exp_avg\.embed\.tokens\.weight"):
        opt.load_state_dict(altered("exp_avg", "embed.tokens.weight", None))
    with pytest.raises(ValueError, match=r"exp_avg\.layers\.9\.attn\.q_proj\.weight.*not a parameter"):
        opt.load_state_dict(altered("exp_avg", "layers.9.attn.q_proj.weight", np.zeros(3)))
    with pytest.raises(ValueError, match="unknown entry 'momentum_buffer'"):
        opt.load_state_dict({**good, "momentum_buffer": {}})
    with pytest.raises(ValueError, match=r"state\['step'\]"):
        opt.load_state_dict({**good, "step": -1})
    with pytest.raises(ValueError, match="flat state key 'exp_avg'"):
        from_flat_state({"step": np.array(0), "exp_avg": np.zeros(3)})
    with pytest.raises(ValueError, match="'step'"):
        from_flat_state({"exp_avg.lm_head.weight": np.zeros((13, 6))})
    with pytest.raises(ValueError, match="'step' must be a 0-d integer"):
        from_flat_state({"step": np.array(1.5)})
    sgd = SGD(make_params(np.float64), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"no tensor momentum_buffer\.embed\.tokens\.weight"):
        sgd.load_state_dict({"step": 3})  # after a step every buffer must be there
    # a failed load leaves the optimizer as it was
    opt.load_state_dict(good)
    np.testing.assert_array_equal(opt.buffers["exp_avg"]["lm_head.weight"], good["exp_avg"]["lm_head.weight"])


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "lr must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0"),
    (dict(lr="0.1"), "lr must be a number"),
    (dict(lr=0.1, momentum=-0.5), "momentum must lie in"),
    (dict(lr=0.1, momentum=1.0), "momentum must lie in"),
    (dict(lr=0.1, momentum=0.9, dampening=1.5), "dampening must lie in"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
    (dict(lr=0.1, nesterov=True), "nesterov=True requires momentum > 0"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening = 0"),
    (dict(lr=0.1, momentum=0.9, nesterov="yes"), "nesterov must be True or False"),
])
def test_sgd_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD(make_params(np.float64), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "lr must be a finite number >= 0"),
    (dict(lr=1e-3, betas=(1.0, 0.999)), r"betas\[0\] \(beta1\) must lie in \[0, 1\)"),
    (dict(lr=1e-3, betas=(0.9, -0.1)), r"betas\[1\] \(beta2\) must lie in"),
    (dict(lr=1e-3, betas=(0.9,)), "betas must be a pair"),
    (dict(lr=1e-3, eps=0.0), "eps must be a finite number > 0"),
    (dict(lr=1e-3, eps=float("inf")), "eps must be a finite number > 0"),
    (dict(lr=1e-3, weight_decay=-0.01), "weight_decay must be a finite number >= 0"),
    (dict(lr=1e-3, no_decay={"lm_head.weight", "nope.weight"}), "no_decay names 'nope.weight'"),
    (dict(lr=1e-3, no_decay="lm_head.weight"), "no_decay must be a function"),
])
def test_adamw_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(np.float64), **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="params is empty"):
        SGD({}, lr=0.1)
    with pytest.raises(ValueError, match="must be a dict"):
        AdamW([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match=r"params\['w'\] must be a floating-point array"):
        AdamW({"w": np.zeros(3, dtype=np.int64)}, lr=0.1)
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\['w'\] is read-only"):
        SGD({"w": frozen}, lr=0.1)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: AdamW(p, lr=0.1)], ids=["sgd", "adamw"])
def test_bad_grads_change_nothing(make):
    params = make_params(np.float64)
    opt = make(params)
    opt.step(make_grads(np.float64, n_steps=1)[0])
    before = {n: p.copy() for n, p in params.items()}
    state = opt.state_dict()
    good = make_grads(np.float64, n_steps=1, seed=9)[0]

    def bad(**changes):
        grads = {n: g.copy() for n, g in good.items()}
        for name, value in changes.items():
            name = name.replace("__", ".")
            if value is None:
                del grads[name]
            else:
                grads[name] = value
        return grads

    nan = np.ones((10, 6))
    nan[3, 1] = np.nan
    inf = np.ones((5, 6))
    inf[0, 0] = -np.inf
    cases = [
        (bad(lm_head__weight=None), "no gradient for parameter 'lm_head.weight'"),
        ({**good, "extra.weight": np.zeros(2)}, "'extra.weight', which is not a parameter"),
        (bad(layers__0__ffn__up__weight=np.zeros((6, 5))),
         r"grads\['layers.0.ffn.up.weight'\] must have shape \(5, 6\)"),
        (bad(final_norm__weight=np.zeros(6, np.float32)),
         r"grads\['final_norm.weight'\] has dtype float32 but the parameter has dtype float64"),
        (bad(final_norm__weight=np.zeros(6, np.int64)), "floating-point"),
        # two non-finite gradients: the first in parameter order is named
        (bad(layers__0__attn__q_proj__weight=nan, layers__0__ffn__up__weight=inf),
         r"grads\['layers.0.attn.q_proj.weight'\] contains 1 NaN"),
        (bad(layers__0__ffn__up__weight=inf), r"grads\['layers.0.ffn.up.weight'\] contains 1 NaN or infinite"),
    ]
    for grads, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.step(grads)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        opt.step(good, lr=-1.0)
    with pytest.raises(ValueError, match="grads must be a dict"):
        opt.step(list(good.values()))
    for name, p in params.items():  # nothing was applied
        np.testing.assert_array_equal(p, before[name])
    assert opt.step_count == 1
    after = opt.state_dict()
    for kind in state:
        if kind != "step":
            for name in state[kind]:
                np.testing.assert_array_equal(after[kind][name], state[kind][name])


def test_float32_stays_float32():
    params = make_params(np.float32)
    opt = AdamW(params, lr=np.float64(1e-2), weight_decay=np.float64(0.1))
    sgd_params = make_params(np.float32)
    sgd = SGD(sgd_params, lr=np.float64(0.1), momentum=0.9, weight_decay=np.float64(0.01))
    for grads in make_grads(np.float32, n_steps=2):
        opt.step(grads, lr=np.float64(3e-3))
        sgd.step(grads, lr=np.float64(0.05))
    for p in list(params.values()) + list(sgd_params.values()):
        assert p.dtype == np.float32
    for kind in ("exp_avg", "exp_avg_sq"):
        assert all(b.dtype == np.float32 for b in opt.buffers[kind].values())
    assert all(b.dtype == np.float32 for b in sgd.buffers["momentum_buffer"].values())
    grads = make_grads(np.float32, n_steps=1)[0]
    assert clip_grad_norm(grads, 0.1) > 0.1
    assert all(g.dtype == np.float32 for g in grads.values())


@pytest.mark.parametrize("args,match", [
    ((-1, 1e-3, 10, 100), "step must be an integer >= 0"),
    ((1.0, 1e-3, 10, 100), "step must be an integer"),
    ((0, -1e-3, 10, 100), "base_lr must be a finite number >= 0"),
    ((0, 1e-3, -1, 100), "warmup_steps must be an integer >= 0"),
    ((0, 1e-3, 10, 0), "total_steps must be an integer >= 1"),
    ((0, 1e-3, 10, 100, 2e-3), "min_lr must be <= base_lr"),
    ((0, 1e-3, 10, 100, float("nan")), "min_lr must be a finite number"),
])
def test_lr_at_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        lr_at(*args)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), "1"])
def test_clip_grad_norm_bad_input(max_norm):
    with pytest.raises(ValueError, match="max_norm must be"):
        clip_grad_norm({"w": np.ones(3)}, max_norm)


def test_clip_grad_norm_bad_grads():
    with pytest.raises(ValueError, match=r"grads\['w'\] must be a float32/float64"):
        clip_grad_norm({"w": np.ones(3, dtype=np.int32)}, 1.0)
