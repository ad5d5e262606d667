"""Property tests (hypothesis): the numba attention kernels against their NumPy twin, and
cross-entropy against a long-double reference, over magnitudes that span many decades.

Each example draws a dtype, shapes, head size D (non powers of two matter: scale = 1/√D is
then inexact), MHA or GQA, a mask (none, causal, sliding window, packed documents, key
padding with fully padded rows), softmax or softmax₁, soft-capping or not, and q, k with
entries log-uniform in magnitude between 1e-3 and 10^top, top itself drawn up to ~1e15
(float64) or ~1e19 (float32, where scores overflow: then both paths must raise the same
error). Issue 14: such inputs made the kernels return rows of zeros (the exp's fused
multiply-add) and gradients with p ≈ e⁻¹⁰⁰ (the backward's scores rounded differently from
the forward's, and lse = m + log l rounding log l away).

The examples are derandomized (the same on every run and machine: CI cannot flake), and
fewer under NUMBA_DISABLE_JIT=1, where the kernels run as plain Python.

What "agree" means (the tolerance, and why it has a floor)
-----------------------------------------------------------
Two correct implementations of attention differ by more than rounding of the result when
the scores are large: each computes s = scale · q·k with its own summation order (BLAS
picks it), so each score carries an error up to E = (D + 3) u scale Σ_d |q_d k_d| (u the
unit of rounding), and p_j = exp(s_j − lse) moves by E_j relative. So an output may differ
by tol · M + C, where
  M = the size of the terms summed into it (Σ_j p_j |v_j| for o, Σ_j |ds_ij| |k_j| for dq,
      …): relative error tol (DESIGN: 1e-12 float64, 1e-5 float32) of a sum is relative to
      its terms, not to a result that cancels to ~0 (dq when p is one-hot);
  C = the first-order effect of the score errors, Σ_j p_j R_j |v_j − o| for o with R_j =
      2 (E_j + Σ_k p_k E_k) (both sides' errors), and the same chain for the gradients.
For ordinary scores C is at the level of the dtype's rounding. For scores near 1e30 it is
large, and invariants that hold at any size take over: a row is fully masked (lse = −inf,
o = 0) exactly when the mask says so; lse agrees within its own error; and Σ_j dv_j =
Σ_i mass_i do_i, where mass_i = Σ_j p_ij is 1 for softmax whatever the scores.
"""

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npformer._validate import NonFiniteError
from npformer.functional.attention_mask import attention_mask
from npformer.functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from npformer.kernels.flash_attention import _flash_backward, _flash_forward
from npformer.kernels.flash_attention_reference import (
    flash_attention_reference_backward,
    flash_attention_reference_forward,
    prepare_flash_attention,
)

NO_JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
HEAD_SIZES = [1, 3, 5, 6, 7, 8, 12, 24, 48, 64, 80, 96, 128]
KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- attention: inputs --------------------------------------------------------------------


def _log_uniform(rng, shape, top):
    """Entries ± 10^e, e uniform in [−3, top]: magnitudes over many decades."""
    return rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-3.0, top, shape)


@st.composite
def attention_cases(draw):
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    D = draw(st.sampled_from(HEAD_SIZES))
    K = draw(st.integers(1, 2))
    H = K * draw(st.integers(1, 3))  # G = H / K query heads per kv head: MHA or GQA
    B = draw(st.integers(1, 2))
    S = draw(st.integers(1, 20 if NO_JIT else 90))  # past one 64-key tile when compiled
    T = draw(st.integers(1, S))
    Dv = draw(st.integers(1, 5))
    # float64 scores up to ~1e30; float32 products past 3.4e38 (both paths must refuse them)
    top = draw(st.floats(0.0, 15.0 if dtype == np.float64 else 19.5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = draw(st.sampled_from(["none", "causal", "window", "documents", "padding"]))
    kwargs = {}
    if mask == "causal":
        kwargs["causal"] = True
    elif mask == "window":
        kwargs.update(causal=True, window=draw(st.integers(1, 12)))
    elif mask == "documents":
        kwargs.update(doc_ids=np.sort(rng.integers(0, 4, (B, S)), axis=1),
                      causal=draw(st.booleans()))
    elif mask == "padding":
        padding = rng.random((B, S)) < 0.3
        padding[0] = draw(st.booleans())  # sometimes a batch row with every key padded
        kwargs["key_padding_mask"] = padding
    if draw(st.booleans()):
        kwargs["softmax"] = "softmax1"
    if draw(st.integers(0, 3)) == 0:
        kwargs["softcap"] = draw(st.floats(0.5, 50.0))
    q = _log_uniform(rng, (B, H, T, D), top).astype(dtype)
    k = _log_uniform(rng, (B, K, S, D), top).astype(dtype)
    v = rng.standard_normal((B, K, S, Dv)).astype(dtype)
    do = rng.standard_normal((B, H, T, Dv)).astype(dtype)
    return q, k, v, do, kwargs


# ---- attention: the float64 terms that size the tolerance -----------------------------------


def _dense_terms(q, k, v, do, kwargs):
    """Dense float64 p (B, H, T, S), the score errors E and the mask, for the tolerance."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    u = np.finfo(q.dtype).eps
    scale = 1.0 / math.sqrt(D)
    q64 = q.astype(np.float64)
    k64 = np.repeat(k.astype(np.float64), G, axis=1)  # (B, H, S, D)
    v64 = np.repeat(v.astype(np.float64), G, axis=1)  # (B, H, S, Dv)
    with np.errstate(over="ignore", invalid="ignore"):
        s = scale * (q64 @ k64.swapaxes(-1, -2))  # (B, H, T, S)
        size = scale * (np.abs(q64) @ np.abs(k64).swapaxes(-1, -2))  # Σ_d |q_d k_d|, scaled
    E = 2 * (D + 3) * u * size  # both sides' score errors (soft-capping only shrinks them)
    slope = np.ones_like(s)
    cap = kwargs.get("softcap")
    if cap is not None:
        e = np.exp(-2 * np.abs(s / cap))
        slope = 4 * e / (1 + e) ** 2  # sech²(s / cap) ≤ 1, without 1 − tanh² cancelling to 0
        s = cap * np.tanh(s / cap)
        E = E + 2 * u * cap
    allowed = attention_mask(B, T, S, causal=kwargs.get("causal", False),
                             window=kwargs.get("window"), doc_ids=kwargs.get("doc_ids"),
                             key_padding_mask=kwargs.get("key_padding_mask"))  # (B, 1, T, S)
    allowed = np.broadcast_to(allowed, s.shape)
    z = np.where(allowed, s, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)  # (B, H, T, 1)
    if kwargs.get("softmax") == "softmax1":
        m = np.maximum(m, 0.0)  # the extra key, score 0
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m_safe)  # (B, H, T, S)
    l = e.sum(axis=-1, keepdims=True)
    if kwargs.get("softmax") == "softmax1":
        l = l + np.exp(-m_safe)
    p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)  # (B, H, T, S); 0 if fully masked
    E = np.where(allowed, E, 0.0)
    R = E + np.sum(p * E, axis=-1, keepdims=True)  # relative change of p_ij, first order
    # |change of p_ij|: relative R, and absolute 2·tiny — the kernel's exp gives 0 below the
    # smallest normal number (e⁻⁷⁰⁸, e⁻⁸⁷) where np.exp gives a subnormal
    change = p * R + 2 * np.finfo(q.dtype).tiny * allowed
    return dict(p=p, R=R, E=E, change=change, dtype=q.dtype, slope=slope, k=k64, v=v64, q=q64,
                do=do.astype(np.float64), scale=scale, cap=cap, masked=~allowed.any(axis=-1),
                G=G)


def _group_sum(x, G):
    """(B, H, …) summed over the G query heads of each kv head → (B, K, …)."""
    B, H = x.shape[:2]
    return x.reshape((B, H // G, G) + x.shape[2:]).sum(axis=2)


def _bounds(terms, o_ref):
    """tol-free magnitudes M and score-error effects C for o, dq, dk, dv (see the docstring)."""
    p, change, slope = terms["p"], terms["change"], terms["slope"]
    q, k, v, do, scale, G = (terms[n] for n in ("q", "k", "v", "do", "scale", "G"))
    o = o_ref.astype(np.float64)
    dp = do @ v.swapaxes(-1, -2)  # (B, H, T, S) do · v_j
    delta = np.sum(do * o, axis=-1, keepdims=True)  # (B, H, T, 1)
    dp_size = np.abs(do) @ np.abs(v).swapaxes(-1, -2)  # Σ_e |do_e v_je|
    delta_size = np.sum(np.abs(do * o), axis=-1, keepdims=True)
    M_o = p @ np.abs(v)
    C_o = np.einsum("bhts,bhtse->bhte", change, np.abs(v[:, :, None] - o[:, :, :, None]))
    M_dv = _group_sum((p.swapaxes(-1, -2)) @ np.abs(do), G)
    C_dv = _group_sum(change.swapaxes(-1, -2) @ np.abs(do), G)
    A = p * (dp_size + delta_size) * slope  # |terms| of ds
    dz = np.abs(dp - delta)
    C_ds = (change * dz * slope  # p moves
            + p * slope * np.sum(change * np.abs(dp), axis=-1, keepdims=True))  # δ moves
    if terms["cap"] is not None:  # sech² moves with the score: |d sech²/ds| ≤ 0.77 / cap;
        # and below the smallest normal number it is held to 2·tiny absolute, not relative
        tiny = np.finfo(terms["dtype"]).tiny
        C_ds = C_ds + p * dz * (0.77 / terms["cap"] * terms["E"] + 2 * tiny)
    M_dq = scale * (A @ np.abs(k))
    C_dq = scale * (C_ds @ np.abs(k))
    M_dk = _group_sum(scale * (A.swapaxes(-1, -2) @ np.abs(q)), G)
    C_dk = _group_sum(scale * (C_ds.swapaxes(-1, -2) @ np.abs(q)), G)
    return (M_o, C_o), (M_dq, C_dq), (M_dk, C_dk), (M_dv, C_dv)


def _run(fn):
    try:
        return fn(), None
    except ValueError as error:
        return None, error


def check_attention_case(q, k, v, do, kwargs):
    """The kernel (forward, backward) against the twin: the same error, or agreement within
    the tolerance of the module docstring, and the invariants. Returns a string describing
    the first disagreement, or None."""
    dtype = q.dtype
    tol = KERNEL_TOL[dtype]
    qq, kk, vv, options = prepare_flash_attention(q, k, v, **kwargs)
    kernel, kernel_error = _run(lambda: _flash_forward(qq, kk, vv, options, 64, 64))
    twin, twin_error = _run(lambda: flash_attention_reference_forward(q, k, v, **kwargs))
    if kernel_error or twin_error:
        if str(kernel_error) == str(twin_error):
            assert isinstance(kernel_error, NonFiniteError)
            return None
        # scores at the edge of the dtype: a partial sum of q·k may overflow in one summation
        # order and not in the other (BLAS picks it), so either answer is right only where
        # Σ_d |q_d k_d| reaches the largest float (less its rounding)
        G = q.shape[1] // k.shape[1]
        with np.errstate(over="ignore"):
            size = np.abs(q.astype(np.float64)) @ np.abs(
                np.repeat(k.astype(np.float64), G, axis=1)).swapaxes(-1, -2)
        edge = np.finfo(dtype).max * (1 - (q.shape[-1] + 3) * np.finfo(dtype).eps)
        if not np.any(size >= edge):
            return f"errors differ: kernel {kernel_error!r}, twin {twin_error!r}"
        return None
    (o, cache), (o_ref, cache_ref) = kernel, twin
    got = (o,) + _flash_backward(do, cache, 64, 64)
    expected = (o_ref,) + flash_attention_reference_backward(do, cache_ref)
    terms = _dense_terms(q, k, v, do, kwargs)
    # invariants at any magnitude: fully masked exactly where the mask says so
    masked = terms["masked"]  # (B, H, T)
    softmax_one = kwargs.get("softmax") == "softmax1"
    for name, c in (("kernel", cache), ("twin", cache_ref)):
        lse = c.lse
        if softmax_one:
            if not np.all(np.isfinite(lse)):
                return f"{name}: softmax₁ lse not finite"
        elif not np.array_equal(lse == -np.inf, masked) or not np.all(np.isfinite(lse[~masked])):
            return (f"{name}: {int(np.sum((lse == -np.inf) & ~masked))} row(s) taken for fully "
                    f"masked that the mask allows")
    E_row = np.max(terms["E"], axis=-1, initial=0.0)  # (B, H, T)
    with np.errstate(invalid="ignore"):  # −inf − (−inf) for fully masked rows: not compared
        lse_err = np.abs(cache.lse.astype(np.float64) - cache_ref.lse)
    lse_ok = ~np.isfinite(cache_ref.lse) | (
        lse_err <= 2 * E_row + tol * (np.abs(cache_ref.lse) + 1))
    if not lse_ok.all():
        return f"lse differs by {np.max(np.where(lse_ok, 0, lse_err)):.3g} beyond its error"
    # Σ_j dv_j = Σ_i mass_i do_i, mass_i = Σ_j p_ij: exactly 1 (softmax, not masked)
    mass = terms["p"].sum(axis=-1, keepdims=True)  # (B, H, T, 1)
    mass_err = 0.0 if not softmax_one else np.minimum(1.0, np.sum(terms["p"] * terms["R"],
                                                                 axis=-1, keepdims=True))
    want = _group_sum(mass * terms["do"], terms["G"]).sum(axis=2)  # (B, K, Dv)
    room = _group_sum((mass_err + tol) * np.abs(terms["do"]), terms["G"]).sum(axis=2)
    for name, dv in (("kernel", got[3]), ("twin", expected[3])):
        err = np.abs(dv.astype(np.float64).sum(axis=2) - want)
        if not np.all(err <= 4 * room + 1e-300):
            return f"{name}: Σ_j dv_j ≠ Σ_i mass_i do_i (error {err.max():.3g}): p not normalised"
    for name, a, b, (M, C) in zip(("o", "dq", "dk", "dv"), got, expected, _bounds(terms, o_ref)):
        if a.dtype != dtype or not np.all(np.isfinite(a)):
            return f"{name}: dtype {a.dtype} or non-finite values"
        err = np.abs(a.astype(np.float64) - b)
        bound = tol * M + C
        if not np.all(err <= bound):
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            return (f"{name} at {worst}: kernel {a[worst]:.6g}, twin {b[worst]:.6g}, allowed "
                    f"{bound[worst]:.3g} (tol·M {tol * M[worst]:.3g}, C {C[worst]:.3g})")
    return None


@settings(max_examples=6 if NO_JIT else 400, **SETTINGS)
@given(attention_cases())
def test_attention_kernels_agree_with_the_numpy_twin(case):
    q, k, v, do, kwargs = case
    problem = check_attention_case(q, k, v, do, kwargs)
    options = {key: (value if not isinstance(value, np.ndarray) else "array")
               for key, value in kwargs.items()}
    assert problem is None, (f"{problem}\n{q.dtype} q {q.shape} k {k.shape} v {v.shape} "
                             f"{options}")


# ---- cross-entropy ---------------------------------------------------------------------------


@st.composite
def cross_entropy_cases(draw):
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    V = draw(st.integers(1, 40))
    top = draw(st.floats(-2.0, 308.0 if dtype == np.float64 else 38.5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = _log_uniform(rng, lead + (V,), top)
    logits = np.clip(logits, -np.finfo(dtype).max, np.finfo(dtype).max).astype(dtype)
    targets = rng.integers(0, V, size=lead)
    ignored = rng.random(lead) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets = np.where(ignored, -100, targets)
    eps = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return logits, np.asarray(targets), eps, reduction, rng


def _long_double_cross_entropy(logits, targets, eps):
    """Row losses, the size of their terms, and p − q, in long double. (...), (...), (..., V)"""
    x = logits.astype(np.longdouble)
    m = np.max(x, axis=-1)  # (...)
    e = np.exp(x - m[..., None])
    log_sum = np.log(np.sum(e, axis=-1))  # (...)
    valid = targets != -100
    x_y = np.take_along_axis(x, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    mean = np.mean(x, axis=-1)
    # −log p_y = (m − x_y) + log Σ, −mean log p = (m − mean) + log Σ: in this order (at 1e38
    # m + log Σ would round log Σ away)
    rows = (1 - eps) * ((m - x_y) + log_sum) + eps * ((m - mean) + log_sum)
    size = ((1 - eps) * (np.abs(m) + np.abs(x_y)) + eps * (np.abs(m) + np.mean(np.abs(x), -1))
            + log_sum + 1)
    V = x.shape[-1]
    q = np.full(x.shape, eps / V, dtype=np.longdouble)
    np.put_along_axis(q, np.where(valid, targets, 0)[..., None],
                      (1 - eps) + eps / V, axis=-1)
    grad = e / np.sum(e, axis=-1, keepdims=True) - q  # (..., V) p − q
    return (np.where(valid, rows, 0), np.where(valid, size, 0),
            np.where(valid[..., None], grad, 0), valid)


@settings(max_examples=40 if NO_JIT else 400, **SETTINGS)
@given(cross_entropy_cases())
def test_cross_entropy_is_the_true_loss_or_a_clear_error(case):
    logits, targets, eps, reduction, rng = case
    dtype = logits.dtype
    biggest = float(np.finfo(dtype).max)
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}[dtype]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        rows, size, grad, valid = _long_double_cross_entropy(logits, targets, eps)
    n_valid = int(valid.sum())
    total = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / max(n_valid, 1)}[reduction]
    fits = np.all(np.abs(rows) <= biggest) and np.all(np.abs(total) <= biggest)
    near_edge = np.any(np.abs(np.abs(rows[valid]) / biggest - 1) < 1e-3) or (
        reduction != "none" and abs(abs(float(total)) / biggest - 1) < 1e-3)
    if near_edge:  # within rounding of the largest float: either answer is right
        return
    if not fits:
        with pytest.raises(NonFiniteError, match="not representable"):
            cross_entropy_forward(logits, targets, label_smoothing=eps, reduction=reduction)
        return
    loss, cache = cross_entropy_forward(logits, targets, label_smoothing=eps,
                                        reduction=reduction)
    assert loss.dtype == dtype and np.all(np.isfinite(loss))
    size_total = {"none": size, "sum": size.sum(), "mean": size.sum() / max(n_valid, 1)}[
        reduction]
    # relative to the size of the terms (|m|, |x_y|, mean |x|): −log p_y = (m − x_y) + log Σ
    # cancels, and its error is the rounding of those terms, not of the result
    assert np.all(np.abs(loss.astype(np.longdouble) - total) <= tol * size_total), (
        loss, total, size_total)
    dloss = (rng.standard_normal(targets.shape) if reduction == "none"
             else np.asarray(rng.standard_normal())).astype(dtype)
    dlogits = cross_entropy_backward(dloss, cache)
    g = dloss.astype(np.longdouble)
    if reduction == "mean":
        g = g / max(n_valid, 1)
    expected = grad * (g[..., None] if reduction == "none" else g)  # entries in [−|g|, |g|]
    assert dlogits.dtype == dtype and np.all(np.isfinite(dlogits))
    room = tol * np.abs(g[..., None] if reduction == "none" else g)
    assert np.all(np.abs(dlogits.astype(np.longdouble) - expected) <= room + 1e-300)
