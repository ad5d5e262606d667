"""The flat-buffer optimizer kernels (npformer.kernels.optimizer) against npformer.optim:
AdamW over mixed segments for several steps, the gradient norm and clipping, bad input, and
a subset as plain Python under NUMBA_DISABLE_JIT=1."""

import numpy as np

from helpers import assert_subset_passes_without_jit
import pytest

from npformer.kernels.optimizer import (
    NORM_CHUNK,
    STEP_CHUNK,
    adamw_step_flat,
    clip_grad_norm_flat,
    grad_norm_flat,
    scale_flat_,
)
from npformer.optim import AdamW, adamw_update_, clip_grad_norm

RTOL = {np.float64: 1e-14, np.float32: 1e-6}  # the brief's bound vs adamw_update_ per tensor


def _segments(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _assert_rel(actual, expected, rtol, what):
    scale = np.maximum(np.abs(expected.astype(np.float64)), np.finfo(expected.dtype).tiny)
    rel = np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / scale
    assert actual.dtype == expected.dtype and np.all(rel <= rtol), (what, float(rel.max()))


# sizes: an empty segment, 1 element, odd sizes, and one crossing work-item boundaries
MIXED_SIZES = [7, 0, 128, 65, STEP_CHUNK + 3, 1, 2 * STEP_CHUNK - 5, 33]
MIXED_DECAY = [0.1, 0.3, 0.0, 0.05, 0.1, 0.0, 0.0, 0.2]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # torch's two lerp forms (1 − β₁ < or ≥ 1/2)
def test_adamw_matches_adamw_update_per_tensor_over_several_steps(dtype, beta1):
    rng = np.random.default_rng(int(beta1 * 10))
    starts = _segments(MIXED_SIZES)
    n = int(starts[-1])
    param = rng.standard_normal(n).astype(dtype)
    exp_avg, exp_avg_sq = np.zeros(n, dtype), np.zeros(n, dtype)
    pieces = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
    ref_param = [param[s].copy() for s in pieces]
    ref_m = [np.zeros_like(p) for p in ref_param]
    ref_v = [np.zeros_like(p) for p in ref_param]
    for step in range(1, 7):
        # gradients over six orders of magnitude, a few exact zeros
        grad = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 3, n)).astype(dtype)
        grad[rng.integers(0, n, 50)] = 0
        lr = 1e-2 / step
        adamw_step_flat(param, grad, exp_avg, exp_avg_sq, starts, MIXED_DECAY, step=step,
                        lr=lr, beta1=beta1, beta2=0.95, eps=1e-8)
        for k, s in enumerate(pieces):
            adamw_update_(ref_param[k], grad[s], ref_m[k], ref_v[k], step=step, lr=lr,
                          beta1=beta1, beta2=0.95, eps=1e-8, weight_decay=MIXED_DECAY[k])
        rtol = RTOL[dtype]
        _assert_rel(param, np.concatenate(ref_param), rtol, f"param, step {step}")
        _assert_rel(exp_avg, np.concatenate(ref_m), rtol, f"exp_avg, step {step}")
        _assert_rel(exp_avg_sq, np.concatenate(ref_v), rtol, f"exp_avg_sq, step {step}")


def test_adamw_flat_equals_the_adamw_optimizer_with_its_no_decay_groups():
    # the trainer's use: every parameter of a model end to end, λ from AdamW.weight_decay_of
    rng = np.random.default_rng(7)
    shapes = {"embed.tokens.weight": (65, 16), "layers.0.attn_norm.weight": (16,),
              "layers.0.attn.q_proj.weight": (16, 16), "layers.0.attn.q_proj.bias": (16,),
              "lm_head.weight": (65, 16)}
    params = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in shapes.items()}
    optimizer = AdamW({k: v.copy() for k, v in params.items()}, lr=3e-3, betas=(0.9, 0.95),
                      eps=1e-8, weight_decay=0.1)
    flat = np.concatenate([p.reshape(-1) for p in params.values()])
    starts = _segments([p.size for p in params.values()])
    decay = [optimizer.weight_decay_of(name) for name in params]
    assert decay == [0.0, 0.0, 0.1, 0.0, 0.1]
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    for step in range(1, 5):
        grads = {name: rng.standard_normal(shape).astype(np.float32)
                 for name, shape in shapes.items()}
        optimizer.step(grads)
        adamw_step_flat(flat, np.concatenate([g.reshape(-1) for g in grads.values()]), m, v,
                        starts, decay, step=step, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    expected = np.concatenate([optimizer.params[name].reshape(-1) for name in params])
    _assert_rel(flat, expected, RTOL[np.float32], "param")


def test_adamw_bad_inputs_are_clear_errors():
    n = 10
    buffers = [np.zeros(n, np.float32) for _ in range(4)]
    starts, decay = np.array([0, 4, n]), [0.1, 0.0]
    kwargs = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    with pytest.raises(ValueError, match="exp_avg has shape .* dtype float64, but param has"):
        adamw_step_flat(buffers[0], buffers[1], np.zeros(n), buffers[3], starts, decay, **kwargs)
    with pytest.raises(ValueError, match=r"grad must be a 1-D C-contiguous .* shape \(2, 5\)"):
        adamw_step_flat(buffers[0], buffers[1].reshape(2, 5), buffers[2], buffers[3], starts,
                        decay, **kwargs)
    with pytest.raises(ValueError, match="not contiguous"):
        adamw_step_flat(buffers[0], np.zeros(2 * n, np.float32)[::2], buffers[2], buffers[3],
                        starts, decay, **kwargs)
    with pytest.raises(ValueError, match="segment_starts must rise from 0 to the buffer "
                                         "length 10"):
        adamw_step_flat(*buffers, np.array([0, 4, 9]), decay, **kwargs)
    with pytest.raises(ValueError, match="non-decreasing"):
        adamw_step_flat(*buffers, np.array([0, 6, 4, n]), [0.0] * 3, **kwargs)
    with pytest.raises(ValueError, match=r"segment_decay must have shape \(2,\)"):
        adamw_step_flat(*buffers, starts, [0.1], **kwargs)
    with pytest.raises(ValueError, match="segment_decay must be finite and >= 0"):
        adamw_step_flat(*buffers, starts, [0.1, -0.1], **kwargs)
    with pytest.raises(ValueError, match="segment_starts must be a 1-D integer array"):
        adamw_step_flat(*buffers, np.array([0.0, 4.0, 10.0]), decay, **kwargs)
    with pytest.raises(ValueError, match=r"step \(t, counting this step\)"):
        adamw_step_flat(*buffers, starts, decay, **dict(kwargs, step=0))
    for name, value, message in [("lr", -1e-3, "lr must be a finite number >= 0"),
                                 ("beta1", 1.0, r"beta1 must lie in \[0, 1\)"),
                                 ("beta2", -0.1, r"beta2 must lie in \[0, 1\)"),
                                 ("eps", 0.0, "eps")]:
        with pytest.raises(ValueError, match=message):
            adamw_step_flat(*buffers, starts, decay, **dict(kwargs, **{name: value}))
    assert all(np.all(b == 0) for b in buffers)  # nothing was changed by a refused call


# ---- gradient norm and clipping ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [0, 1, 7, 65, NORM_CHUNK + 3, 3 * NORM_CHUNK])
def test_grad_norm_matches_clip_grad_norm(dtype, n):
    rng = np.random.default_rng(n)
    grad = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(dtype)
    expected = clip_grad_norm({"g": grad.copy()}, max_norm=1e30)  # no clipping: the norm
    norm = grad_norm_flat(grad)
    assert isinstance(norm, float)
    assert abs(norm - expected) <= 1e-13 * expected, (norm, expected)


def test_grad_norm_is_the_same_with_one_or_two_threads():
    import numba

    grad = np.random.default_rng(0).standard_normal(5 * NORM_CHUNK + 11).astype(np.float32)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = grad_norm_flat(grad)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = grad_norm_flat(grad)
    finally:
        numba.set_num_threads(saved)
    assert one == two  # fixed chunks summed in order: deterministic


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left alone
def test_clip_matches_clip_grad_norm(dtype, max_norm):
    rng = np.random.default_rng(1)
    sizes = [7, 0, 65, STEP_CHUNK + 3, 1]
    starts = _segments(sizes)
    grad = rng.standard_normal(int(starts[-1])).astype(dtype)
    grads = {str(k): grad[a:b].copy() for k, (a, b) in enumerate(zip(starts[:-1], starts[1:]))}
    expected_norm = clip_grad_norm(grads, max_norm)
    before = grad.copy()
    norm = clip_grad_norm_flat(grad, max_norm)
    assert abs(norm - expected_norm) <= 1e-13 * expected_norm
    _assert_rel(grad, np.concatenate(list(grads.values())), RTOL[dtype], "clipped grad")
    assert np.array_equal(grad, before) == (max_norm > norm)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_norm_is_returned_and_the_gradient_left_alone(bad):
    grad = np.ones(NORM_CHUNK + 5, dtype=np.float32)
    grad[NORM_CHUNK + 2] = bad
    before = grad.copy()
    norm = clip_grad_norm_flat(grad, 1.0)
    expected = clip_grad_norm({"g": before.copy()}, 1.0)
    assert not np.isfinite(norm) and (np.isnan(norm) == np.isnan(expected))
    assert np.array_equal(grad, before, equal_nan=True)


def test_scale_rounds_the_factor_to_the_dtype_like_in_place_multiplication():
    grad = np.random.default_rng(2).standard_normal(STEP_CHUNK + 9).astype(np.float32)
    expected = grad.copy()
    expected *= 0.3  # NumPy: the Python float becomes a float32
    scale_flat_(grad, 0.3)
    assert np.array_equal(grad, expected)


def test_norm_and_clip_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_flat(np.ones(3, np.float32), 0.0)
    with pytest.raises(ValueError, match="grad must be a float32/float64"):
        grad_norm_flat(np.ones(3, np.int64))
    with pytest.raises(ValueError, match=r"grad must be a 1-D C-contiguous .* \(3, 1\)"):
        scale_flat_(np.ones((3, 1), np.float32), 2.0)


# ---- the kernels as plain Python ---------------------------------------------------------

JIT_FREE_SUBSET = ("test_adamw_matches and float32 or test_adamw_flat_equals or "
                   "test_grad_norm_matches and float32 or test_clip_matches or "
                   "test_a_non_finite_norm or test_scale_rounds")


def test_kernels_pass_as_plain_python_under_numba_disable_jit():
    """A subset of this file in a child process with NUMBA_DISABLE_JIT=1 (prange = range)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 16,
                                     "npformer.kernels.optimizer:_adamw_kernel")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_over_a_list_of_tensors_equals_the_reference(dtype):
    """adamw_step_tensors (what AdamW(impl="numba") calls): several steps over tensors of
    odd shapes with and without weight decay, equal to the per-tensor adamw_update_ (to
    1e-14 in float64, 1e-6 in float32, as adamw_step_flat)."""
    from npformer.kernels.optimizer import adamw_step_tensors
    from npformer.optim import adamw_update_

    rng = np.random.default_rng(5)
    shapes, decays = [(7, 5), (3,), (1,), (2, 3, 129)], [0.1, 0.0, 0.0, 0.3]
    fused = [[rng.standard_normal(s).astype(dtype), np.zeros(s, dtype), np.zeros(s, dtype)]
             for s in shapes]
    reference = [[a.copy() for a in arrays] for arrays in fused]
    for step in range(1, 5):
        grads = [(3 * rng.standard_normal(s)).astype(dtype) for s in shapes]
        lr = 1e-2 * step
        adamw_step_tensors([(p, g, m, v, d) for (p, m, v), g, d in zip(fused, grads, decays)],
                           step=step, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8)
        for (p, m, v), g, d in zip(reference, grads, decays):
            adamw_update_(p, g, m, v, step=step, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8,
                          weight_decay=d)
        tol = 1e-14 if dtype == np.float64 else 1e-6
        for got, want in zip(fused, reference):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    with pytest.raises(ValueError, match="shape"):
        adamw_step_tensors([(np.zeros(3, dtype), np.zeros(4, dtype), np.zeros(3, dtype),
                             np.zeros(3, dtype), 0.0)], step=1, lr=0.1, beta1=0.9, beta2=0.9,
                           eps=1e-8)
