"""softmax1, clipped softmax, softcap: finite differences, PyTorch parity (the formulas written
in torch, autograd gradients), masks and fully masked rows, stability, bad input."""

import numpy as np
import pytest
import torch

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.softmax import softmax_backward, softmax_forward
from npformer.functional.softmax_variants import (
    clipped_softmax_backward,
    clipped_softmax_forward,
    softcap_backward,
    softcap_forward,
    softmax1_backward,
    softmax1_forward,
)
from npformer.gradcheck import check_pair

SHAPES = [(7,), (3, 5), (2, 3, 5), (2, 1, 3, 4)]  # (..., S): odd sizes, 1-3 leading dims
GAMMA, ZETA = -0.05, 1.2  # clipped softmax: both clips active
CLIP_MARGIN = 1e-4  # distance of every pre-clip value from 0 and 1 in the FD tests


def _scores(rng, shape, dtype=np.float64, spread=2.4, mask=True):
    """Scores with an offset and a wide spread; with mask, a few -inf entries and, when
    there is more than one row, one fully masked row."""
    x = (rng.standard_normal(shape) * spread - 0.6).astype(dtype)
    if mask and shape[-1] > 2:
        flat = x.reshape(-1, shape[-1])  # a view
        flat[0, 1] = -np.inf
        flat[-1, -1] = -np.inf
        if flat.shape[0] > 2:
            flat[1, :] = -np.inf
    return x


def _preclip(x):
    """u = (ζ − γ)·softmax(x) + γ, for the distance-from-the-clips guard."""
    q, _ = softmax_forward(x)
    return (ZETA - GAMMA) * q + GAMMA


def torch_softmax1(x):
    # p_i = exp(x_i − m) / (exp(−m) + Σ exp(x_k − m)), m = max(max x, 0) (a constant)
    m = x.amax(dim=-1, keepdim=True).clamp(min=0).detach()
    e = torch.exp(x - m)
    return e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))


def torch_clipped(x, gamma=GAMMA, zeta=ZETA):
    return torch.clamp((zeta - gamma) * torch.softmax(x, dim=-1) + gamma, 0, 1)


def torch_softcap(x, cap):
    return cap * torch.tanh(x / cap)


# ---- finite differences ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax1_finite_differences(shape):
    rng = np.random.default_rng(sum(shape) + 1)
    inputs = {"x": _scores(rng, shape)}
    reports = check_pair("softmax1", softmax1_forward, softmax1_backward, inputs, ("x",))
    assert_gradcheck_passes(reports)


@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_softmax_finite_differences(shape):
    rng = np.random.default_rng(sum(shape) + 2)
    x = _scores(rng, shape)
    u = _preclip(x)[np.isfinite(x)]
    assert min(np.abs(u).min(), np.abs(u - 1).min()) > CLIP_MARGIN  # away from the kinks
    assert (u < 0).any() and ((u > 0) & (u < 1)).any()  # clipped at 0, and not everywhere
    inputs = {"x": x, "gamma": GAMMA, "zeta": ZETA}
    assert_gradcheck_passes(
        check_pair("clipped_softmax", clipped_softmax_forward, clipped_softmax_backward, inputs,
                   ("x",))
    )


def test_clipped_softmax_finite_differences_clipped_at_one():
    # peaked rows: the largest probability exceeds (1 − γ)/(ζ − γ) and is clipped to 1
    x = np.array([[4.1, -0.4, -0.9, -1.7], [0.3, 0.9, -0.2, 0.4], [-2.3, 2.9, -0.8, 0.1]])
    u = _preclip(x)
    assert (u > 1).any() and (u < 0).any() and ((u > 0) & (u < 1)).any()
    assert min(np.abs(u).min(), np.abs(u - 1).min()) > CLIP_MARGIN
    inputs = {"x": x, "gamma": GAMMA, "zeta": ZETA}
    reports = check_pair("clipped_softmax", clipped_softmax_forward, clipped_softmax_backward,
                         inputs, ("x",))
    assert_gradcheck_passes(reports)
    p, cache = clipped_softmax_forward(x, GAMMA, ZETA)
    assert p.max() == 1.0 and (p == 0).any()
    dx = clipped_softmax_backward(np.ones_like(x) * 0.7 + x, cache)
    np.testing.assert_array_equal(dx[0], 0.0)  # row 0: one entry at 1, the others at 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cap", [0.8, 3.0])
def test_softcap_finite_differences(shape, cap):
    rng = np.random.default_rng(sum(shape) + int(cap * 10))
    inputs = {"x": _scores(rng, shape, mask=False), "cap": cap}  # -inf would make L = ±inf
    reports = check_pair("softcap", softcap_forward, softcap_backward, inputs, ("x",))
    assert_gradcheck_passes(reports)


# ---- PyTorch parity ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax1_torch_parity(dtype, shape):
    rng = np.random.default_rng(sum(shape) + 3)
    x = _scores(rng, shape, dtype)  # with masked entries and a fully masked row
    p, cache = softmax1_forward(x)
    dp = rng.standard_normal(shape).astype(dtype)
    dx = softmax1_backward(dp, cache)
    xt = to_torch(x, True)
    pt = torch_softmax1(xt)
    pt.backward(to_torch(dp))
    assert p.dtype == dtype and dx.dtype == dtype
    assert_close(p, pt, dtype, "softmax1 p")
    assert_close(dx, xt.grad, dtype, "softmax1 dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_softmax_torch_parity(dtype, shape):
    rng = np.random.default_rng(sum(shape) + 4)
    x = _scores(rng, shape, dtype, mask=False)
    x.reshape(-1, shape[-1])[0, 2] = -np.inf  # one masked entry (torch.softmax: no full rows)
    p, cache = clipped_softmax_forward(x, GAMMA, ZETA)
    dp = rng.standard_normal(shape).astype(dtype)
    dx = clipped_softmax_backward(dp, cache)
    xt = to_torch(x, True)
    pt = torch_clipped(xt)
    pt.backward(to_torch(dp))
    assert p.dtype == dtype and dx.dtype == dtype
    assert_close(p, pt, dtype, "clipped p")
    assert_close(dx, xt.grad, dtype, "clipped dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cap", [0.8, 30.0])
def test_softcap_torch_parity(dtype, shape, cap):
    rng = np.random.default_rng(sum(shape) + 5)
    x = _scores(rng, shape, dtype, spread=4.0, mask=False)
    y, cache = softcap_forward(x, cap)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = softcap_backward(dy, cache)
    xt = to_torch(x, True)
    yt = torch_softcap(xt, cap)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "softcap y")
    assert_close(dx, xt.grad, dtype, "softcap dx")


# ---- masks and identities ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", ["softmax1", "clipped"])
def test_fully_masked_rows_give_zeros(dtype, variant):
    x = np.array([[-np.inf] * 4, [0.3, -np.inf, 1.2, -0.4], [-np.inf] * 4], dtype=dtype)
    forward, backward = {"softmax1": (softmax1_forward, softmax1_backward),
                         "clipped": (clipped_softmax_forward, clipped_softmax_backward)}[variant]
    with np.errstate(all="raise"):  # no 0/0, no inf − inf on the way
        p, cache = forward(x)
        dx = backward(np.full(x.shape, 1.7, dtype=dtype) - x.clip(-1, 1), cache)
    assert p.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(p[[0, 2]], 0.0)
    np.testing.assert_array_equal(dx[[0, 2]], 0.0)
    assert p[1, 1] == 0.0 and dx[1, 1] == 0.0  # masked entry of a live row
    assert np.all(np.isfinite(dx))


def test_softmax1_is_softmax_with_an_extra_zero_logit():
    rng = np.random.default_rng(6)
    x = _scores(rng, (4, 5), mask=True)
    p1, _ = softmax1_forward(x)
    padded = np.concatenate([x, np.zeros((4, 1))], axis=-1)  # the implicit "attend to nothing"
    p, _ = softmax_forward(padded)
    np.testing.assert_allclose(p1, p[:, :-1], rtol=1e-14, atol=1e-300)
    assert np.all(p1.sum(axis=-1) < 1)
    # no shift invariance: adding a constant to every score changes the output
    shifted, _ = softmax1_forward(x + 2.0)
    assert np.all(shifted.sum(axis=-1)[[0, 2, 3]] > p1.sum(axis=-1)[[0, 2, 3]])


def test_clipped_softmax_without_stretch_is_softmax():
    rng = np.random.default_rng(7)
    x = _scores(rng, (3, 6))
    dp = rng.standard_normal(x.shape)
    p, cache = clipped_softmax_forward(x, gamma=0.0, zeta=1.0)
    q, softmax_cache = softmax_forward(x)
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(clipped_softmax_backward(dp, cache),
                                  softmax_backward(dp, softmax_cache))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softcap_masks_and_saturation(dtype):
    cap = 5.0
    x = np.array([[-np.inf, 0.001, -3.0, 40.0, -1e4, 1e4]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = softcap_forward(x, cap)
        dx = softcap_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and dx.dtype == dtype
    assert y[0, 0] == -np.inf and dx[0, 0] == 0.0  # masked stays masked, no gradient
    assert np.all(np.abs(y[0, 1:]) <= cap)
    np.testing.assert_allclose(y[0, 1], 0.001, rtol=1e-6)  # the identity near 0
    np.testing.assert_allclose(y[0, 4:], [-cap, cap], rtol=1e-7)
    assert dx[0, 4] == 0.0 and dx[0, 5] == 0.0  # saturated: sech² underflows to exactly 0
    np.testing.assert_allclose(dx[0, 3], 4 * np.exp(-16) / (1 + np.exp(-16)) ** 2, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_scores_are_stable(dtype):
    x = np.array([[1e4, 1e4 - 1.0, -1e4, -np.inf], [-1e4, -1e4 + 3, -1e4, -1e4]], dtype=dtype)
    dp = np.array([[0.3, -1.1, 0.8, 2.0], [1.4, -0.2, 0.5, -0.9]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p1, c1 = softmax1_forward(x)
        dx1 = softmax1_backward(dp, c1)
        pc, cc = clipped_softmax_forward(x, GAMMA, ZETA)
        dxc = clipped_softmax_backward(dp, cc)
    for a in (p1, dx1, pc, dxc):
        assert a.dtype == dtype and np.all(np.isfinite(a))
    e = np.exp(-1.0)
    assert_close(p1[0], [1 / (1 + e), e / (1 + e), 0, 0], dtype, "softmax1 at 1e4")
    np.testing.assert_array_equal(p1[1], 0.0)  # exp(−1e4) underflows: attends to nothing
    q = np.exp([0.0, 3.0, 0.0, 0.0]) / np.exp([0.0, 3.0, 0.0, 0.0]).sum()  # shift invariant
    assert_close(pc[1], np.clip((ZETA - GAMMA) * q + GAMMA, 0, 1), dtype, "clipped at -1e4")


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs():
    x = np.array([[0.2, -0.5, 1.1]])
    with pytest.raises(ValueError, match=r"gamma must be <= 0.*got 0.1"):
        clipped_softmax_forward(x, gamma=0.1)
    with pytest.raises(ValueError, match=r"zeta must be >= 1.*got 0.9"):
        clipped_softmax_forward(x, zeta=0.9)
    with pytest.raises(ValueError, match="gamma must be a number"):
        clipped_softmax_forward(x, gamma=None)
    with pytest.raises(ValueError, match="zeta must be finite"):
        clipped_softmax_forward(x, zeta=np.inf)
    for cap in (0.0, -2.0, np.inf):
        with pytest.raises(ValueError, match=r"cap must be a finite number > 0"):
            softcap_forward(x, cap)
    for forward in (softmax1_forward, clipped_softmax_forward, lambda a: softcap_forward(a, 2.0)):
        with pytest.raises(ValueError, match="NaN"):
            forward(np.array([[0.1, np.nan]]))
        with pytest.raises(ValueError, match="floating-point"):
            forward(np.array([[1, 2]]))
        with pytest.raises(ValueError, match=r"\+inf"):
            forward(np.array([[0.1, np.inf]]))
    with pytest.raises(ValueError, match="length 0"):
        softmax1_forward(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        softmax1_forward(np.array(1.0))
    _, cache = softmax1_forward(x)
    with pytest.raises(ValueError, match="dp must have shape"):
        softmax1_backward(np.ones((1, 4)), cache)
    _, cache = clipped_softmax_forward(x)
    with pytest.raises(ValueError, match="dtype"):
        clipped_softmax_backward(np.ones((1, 3), dtype=np.float32), cache)
    _, cache = softcap_forward(x, 2.0)
    with pytest.raises(ValueError, match="dy must have shape"):
        softcap_backward(np.ones(3), cache)
