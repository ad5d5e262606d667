"""Fused numba kernels for the activations: GeLU (exact and tanh), SiLU, and the elementwise
middle of the gated FFN (SwiGLU / GeGLU), each the fast twin of a functional pair.

    gelu_forward(x, approximate, out=)   /  gelu_backward(dy, cache, dx_out=)   functional/gelu.py
    silu_forward(x, out=)                /  silu_backward(dy, cache, dx_out=)   functional/silu.py
    glu_forward(g, u, activation, approximate, out=)  →  h = act(g) ⊙ u
    glu_backward(dh, cache, dg_out=, du_out=)          →  dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g)
                                                          functional/glu.py (_glu_forward/_backward)

The caches are the functional ones (GeluCache, SiluCache: the input x), so a kernel's cache
feeds the functional backward and vice versa; GluActivationCache holds g and u (act(g) is
recomputed in the backward, see below). An ``out=`` buffer must not overlap an input: the
cache keeps the inputs for the backward (checked, O(1)). The maths and its
derivation are in the functional twins; this file is the same maths arranged for speed.

What is fused, and why
----------------------
The functional pairs are NumPy expressions: each line is a pass over memory and a temporary,
the exact GeLU converts x to a float64 copy for a scalar ``math.erf`` loop, and the tanh GeLU
runs five in-place passes plus ``np.tanh``. Here each call is one pass over flat chunks of the
input (``prange`` over chunks of CHUNK elements), reading the inputs once and writing each
output once. The transcendental is the vectorisable exp of :mod:`._exp`:

    σ(z)  with e = exp(−|z|) ∈ [0, 1] (never overflows), r = 1 / (1 + e):
          σ(z) = r and σ(−z) = 1 − σ(z) = e·r for z ≥ 0; swapped for z < 0
    tanh GeLU:  ½ (1 + tanh(u)) = σ(2u),  1 − tanh²(u) = 4 σ(2u) σ(−2u),  so
          y = x σ(2u),   ∂y/∂x = σ(2u) + 2 k x σ(2u) σ(−2u) (1 + 3 c x²)
    SiLU:       y = x σ(x),   ∂y/∂x = σ(x) (1 + x σ(−x))
    exact GeLU: y = x Φ(x),   ∂y/∂x = Φ(x) + x φ(x),  φ(x) = exp(−x²/2) / √(2π)

The exact GeLU is evaluated in float64 as in functional/gelu.py (float32 results are rounded
once, on the store); its erf is :func:`.erf.erf_float64`, a branch-free series/Chebyshev erf
within 2 ulp of ``math.erf`` (a scalar libm call, which was the whole cost of this kernel:
~30 ns per element, no faster than the functional twin), and φ uses the vector exp.
Measured (float32, 2 threads, medians of 11 interleaved runs on a shared, loaded machine;
issue 15 report): forward / backward faster than the functional pairs by 1.3–1.9× / 2.4–3.5×
(tanh GeLU), 2.2–2.6× / 2.8–2.9× (exact GeLU), 4–6× / 12× (SiLU), 5–6× / 8–10× (SwiGLU
middle), on (2048, 512) and (2048, 1536). The exact GeLU costs ~8× the tanh one here (a
float64 erf of ~100 operations). act(g) is recomputed in the gated backward, not cached:
act'(g) needs σ(g) (or Φ(g)) anyway, and given it act(g) is one multiply, while caching it
would add a full write in the forward and a read in the backward.
Writing into reused ``out=`` buffers saves the page faults of fresh arrays (0.9–1.0× the
time), but in one benchmark process the gated backward into two reused buffers ran 3–6×
slower than into fresh arrays, and not in another with the buffers at other addresses
(suspected 4K aliasing of the load and store streams; not proven): time it in place.

Overflow: σ saturates to exactly 0 or 1 (e underflows to 0), so ±1e4, ±1e30 and float32
±3e38 give the functional twin's answers; the tanh backward caps x² at 1e8 (where σ(−2u) is
already exactly 0), so x² = inf never meets a 0. Products of finite numbers that overflow
(y, dx, h, dg, du reaching ±inf, e.g. dy near float32's maximum) are detected inside the
loop (one compare per element) and raise NonFiniteError instead of returning inf. NaN inputs
propagate as NaN: there is no per-call isfinite pass (the model validates once per step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .._validate import FLOAT_DTYPES, NonFiniteError
from ..functional.gelu import GeluCache, _check_approximate
from ..functional.silu import SiluCache
from ._buffers import empty_apart
from ._exp import exp_nonpositive
from .erf import _check_float_array, erf_float64

CHUNK = 8192  # elements per parallel work item: 32 kB of float32, a few per core's L2

GLU_ACTIVATIONS = ("silu", "gelu")

# Activation kinds of the kernels (one compiled loop each).
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2


# ---- constants in the input's dtype --------------------------------------------------------
# Numba types a Python float as float64, and float32 · float64 is float64: every constant a
# float32 kernel touches is therefore read from a float32 array into a local before the loop.

_TANH_K = math.sqrt(2.0 / math.pi)  # k = √(2/π)
_TANH_C = 0.044715  # c
_CONSTANT_VALUES = (
    0.0,  # 0  zero
    1.0,  # 1  one
    2.0 * _TANH_K,  # 2  2k: 2u = 2k x (1 + c x²)
    _TANH_C,  # 3  c
    3.0 * _TANH_C,  # 4  3c
    1e8,  # 5  cap of x² in the tanh backward (|x| > 1e4: σ(−2u) is exactly 0)
    math.inf,  # 6  inf, the overflow test
)
_CONSTANTS = {dtype: np.array(_CONSTANT_VALUES, dtype=dtype) for dtype in FLOAT_DTYPES}
_INV_SQRT2 = 1.0 / math.sqrt(2.0)  # exact GeLU, always in float64
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---- one element: (act(x), act'(x)) -------------------------------------------------------


@njit(error_model="numpy")  # no ZeroDivisionError check: it stops vectorisation
def _sigmoid_pair(z, one):
    """(σ(z), σ(−z)) without overflow; e = exp(−|z|) ∈ [0, 1]."""
    e = exp_nonpositive(-abs(z))
    r = one / (one + e)
    if z >= 0:
        return r, e * r
    return e * r, r


@njit(error_model="numpy")  # no ZeroDivisionError check: it stops vectorisation
def _silu_pair(x, k):
    s, s_neg = _sigmoid_pair(x, k[1])
    return x * s, s * (k[1] + x * s_neg)  # y, ∂y/∂x = σ(x) (1 + x σ(−x))


@njit(error_model="numpy")  # no ZeroDivisionError check: it stops vectorisation
def _gelu_tanh_pair(x, k):
    x2 = x * x
    s, s_neg = _sigmoid_pair(k[2] * x * (k[1] + k[3] * x2), k[1])  # σ(2u), σ(−2u)
    x2 = min(x2, k[5])
    # x σ(−2u) first: it is exactly 0 where 2k·x would overflow (|x| near the dtype's max)
    return x * s, s + (x * s_neg) * s * (k[2] * (k[1] + k[4] * x2))


@njit(inline="always", error_model="numpy")  # numba-level inlining: too big for LLVM's
def _gelu_erf_pair(x, k):
    """Exact GeLU, evaluated in float64 and rounded to x's dtype."""
    x64 = np.float64(x)
    cdf = 0.5 * (1.0 + erf_float64(x64 * _INV_SQRT2))  # Φ(x)
    pdf = _INV_SQRT_2PI * exp_nonpositive(-0.5 * (x64 * x64))  # φ(x)
    return _like(x64 * cdf, x), _like(cdf + x64 * pdf, x)


def _like(value, x):
    """value converted to the type of the number x (float32 or float64)."""
    return type(x)(value)


@overload(_like)
def _like_compiled(value, x):
    if x.bitwidth == 32:
        return lambda value, x: np.float32(value)
    return lambda value, x: np.float64(value)


# ---- kernels over flat (N,) arrays: one chunk of CHUNK elements per work item -------------
# kind selects the activation outside the inner loop, so each inner loop is one straight
# formula that LLVM vectorises. overflowed[chunk] is set when an output reached ±inf.


@njit(cache=True, parallel=True, fastmath={"contract"}, error_model="numpy")
def _forward_kernel(kind, x, u, has_u, y, consts, overflowed):
    """y = act(x), or y = act(x) ⊙ u when has_u (the gated FFN's h = act(g) ⊙ u)."""
    n = x.shape[0]
    k = (consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6])
    inf = consts[6]
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(start + CHUNK, n)
        bad = False
        if kind == _SILU:
            for i in range(start, stop):
                a = _silu_pair(x[i], k)[0]
                a = a * u[i] if has_u else a
                y[i] = a
                bad |= abs(a) == inf
        elif kind == _GELU_TANH:
            for i in range(start, stop):
                a = _gelu_tanh_pair(x[i], k)[0]
                a = a * u[i] if has_u else a
                y[i] = a
                bad |= abs(a) == inf
        else:
            for i in range(start, stop):
                a = _gelu_erf_pair(x[i], k)[0]
                a = a * u[i] if has_u else a
                y[i] = a
                bad |= abs(a) == inf
        overflowed[chunk] = bad


@njit(cache=True, parallel=True, fastmath={"contract"}, error_model="numpy")
def _backward_kernel(kind, x, dy, dx, consts, overflowed):
    """dx = dy ⊙ act'(x)."""
    n = x.shape[0]
    k = (consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6])
    inf = consts[6]
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(start + CHUNK, n)
        bad = False
        if kind == _SILU:
            for i in range(start, stop):
                d = dy[i] * _silu_pair(x[i], k)[1]
                dx[i] = d
                bad |= abs(d) == inf
        elif kind == _GELU_TANH:
            for i in range(start, stop):
                d = dy[i] * _gelu_tanh_pair(x[i], k)[1]
                dx[i] = d
                bad |= abs(d) == inf
        else:
            for i in range(start, stop):
                d = dy[i] * _gelu_erf_pair(x[i], k)[1]
                dx[i] = d
                bad |= abs(d) == inf
        overflowed[chunk] = bad


@njit(cache=True, parallel=True, fastmath={"contract"}, error_model="numpy")
def _glu_backward_kernel(kind, g, u, dh, dg, du, consts, overflowed):
    """Gated FFN, h = act(g) ⊙ u: dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g). (A separate
    kernel: a conditional store of du inside the activation's loop stopped its vectorisation,
    10× slower.)"""
    n = g.shape[0]
    k = (consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6])
    inf = consts[6]
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(start + CHUNK, n)
        bad = False
        if kind == _SILU:
            for i in range(start, stop):
                a, slope = _silu_pair(g[i], k)
                d = dh[i] * u[i] * slope
                e = dh[i] * a
                dg[i] = d
                du[i] = e
                bad |= (abs(d) == inf) | (abs(e) == inf)
        elif kind == _GELU_TANH:
            for i in range(start, stop):
                a, slope = _gelu_tanh_pair(g[i], k)
                d = dh[i] * u[i] * slope
                e = dh[i] * a
                dg[i] = d
                du[i] = e
                bad |= (abs(d) == inf) | (abs(e) == inf)
        else:
            for i in range(start, stop):
                a, slope = _gelu_erf_pair(g[i], k)
                d = dh[i] * u[i] * slope
                e = dh[i] * a
                dg[i] = d
                du[i] = e
                bad |= (abs(d) == inf) | (abs(e) == inf)
        overflowed[chunk] = bad


# ---- the public pairs: O(1) checks, flat views, one kernel call ----------------------------


def _check_same_layout(array, name, reference, reference_name):
    """array must be a float ndarray with reference's shape and dtype (no isfinite pass)."""
    _check_float_array(array, name)
    if array.shape != reference.shape:
        raise ValueError(f"{name} has shape {array.shape} but {reference_name} has shape "
                         f"{reference.shape}; they must be equal")
    if array.dtype != reference.dtype:
        raise ValueError(f"{name} has dtype {array.dtype} but {reference_name} has dtype "
                         f"{reference.dtype}; pass both in the same dtype")
    return array


def _flat(array):
    """(N,) C-contiguous view of array (a copy only if it is not contiguous)."""
    return np.ascontiguousarray(array).reshape(-1)


def _output(buffer, name, reference, reference_name, *inputs):
    """A fresh (N,) array like reference, or the caller's buffer after O(1) checks: same shape
    and dtype, C-contiguous, and not overlapping an input (the cache keeps the inputs)."""
    if buffer is None:
        return empty_apart(reference.size, reference.dtype)  # see kernels/_buffers.py
    _check_same_layout(buffer, name, reference, reference_name)
    if not buffer.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (a reusable buffer made by np.empty), "
                         f"got strides {buffer.strides} for shape {buffer.shape}")
    for array in inputs:
        if np.may_share_memory(buffer, array):
            raise ValueError(f"{name} overlaps an input of this call; the cache keeps the "
                             "inputs for the backward, so pass a separate buffer")
    return buffer.reshape(-1)


def _raise_if_overflowed(overflowed, what, *inputs):
    if overflowed.any():
        largest = ", ".join(f"{name} {float(np.abs(a).max()):.3g}" for name, a in inputs)
        raise NonFiniteError(
            f"{what} overflows {inputs[0][1].dtype} to ±inf (largest |input|: {largest}); "
            "scale the inputs down or compute in float64")


def _run_forward(kind, x, u, out, what):
    y = _output(out, "out", x, "x", *((x,) if u is None else (x, u)))
    x_flat = _flat(x)
    overflowed = np.zeros((x.size + CHUNK - 1) // CHUNK, dtype=np.bool_)
    _forward_kernel(kind, x_flat, x_flat if u is None else _flat(u), u is not None, y,
                    _CONSTANTS[x.dtype], overflowed)
    inputs = (("x", x),) if u is None else (("g", x), ("u", u))
    _raise_if_overflowed(overflowed, what, *inputs)
    return y.reshape(x.shape) if out is None else out


def _run_backward(kind, x, u, dy, dx_out, du_out, what):
    inputs = (x, dy) if u is None else (x, u, dy)
    dx_name = "dx_out" if u is None else "dg_out"
    reference_name = "x" if u is None else "g"
    dx = _output(dx_out, dx_name, x, reference_name, *inputs)
    du = dx if u is None else _output(du_out, "du_out", x, reference_name, *inputs, dx)
    overflowed = np.zeros((x.size + CHUNK - 1) // CHUNK, dtype=np.bool_)
    if u is None:
        _backward_kernel(kind, _flat(x), _flat(dy), dx, _CONSTANTS[x.dtype], overflowed)
    else:
        _glu_backward_kernel(kind, _flat(x), _flat(u), _flat(dy), dx, du, _CONSTANTS[x.dtype],
                             overflowed)
    names = ("x", "dy") if u is None else ("g", "u", "dh")
    _raise_if_overflowed(overflowed, what, *zip(names, inputs))
    dx = dx.reshape(x.shape) if dx_out is None else dx_out
    if u is None:
        return dx
    return dx, du.reshape(x.shape) if du_out is None else du_out


def _gelu_kind(approximate):
    return _GELU_TANH if _check_approximate(approximate) == "tanh" else _GELU_ERF


def gelu_forward(x: np.ndarray, approximate: str = "none", out: np.ndarray = None):
    """GeLU, exact (``"none"``) or tanh form: :func:`npformer.functional.gelu.gelu_forward`.
    x: (...)  →  (y (...) same dtype, GeluCache). ``out``: a C-contiguous buffer for y."""
    x = _check_float_array(x)
    kind = _gelu_kind(approximate)
    return _run_forward(kind, x, None, out, "gelu_forward: y"), GeluCache(x, approximate)


def gelu_backward(dy: np.ndarray, cache: GeluCache, dx_out: np.ndarray = None) -> np.ndarray:
    """dx (...) = dy ⊙ gelu'(x); ``dx_out``: a C-contiguous buffer for dx."""
    x, approximate = cache
    dy = _check_same_layout(dy, "dy", x, "the forward input x")
    return _run_backward(_gelu_kind(approximate), x, None, dy, dx_out, None,
                         "gelu_backward: dx")


def silu_forward(x: np.ndarray, out: np.ndarray = None):
    """SiLU ``y = x σ(x)``: :func:`npformer.functional.silu.silu_forward`.
    x: (...)  →  (y (...) same dtype, SiluCache). ``out``: a C-contiguous buffer for y."""
    x = _check_float_array(x)
    return _run_forward(_SILU, x, None, out, "silu_forward: y"), SiluCache(x)


def silu_backward(dy: np.ndarray, cache: SiluCache, dx_out: np.ndarray = None) -> np.ndarray:
    """dx (...) = dy ⊙ σ(x) (1 + x σ(−x)); ``dx_out``: a C-contiguous buffer for dx."""
    (x,) = cache
    dy = _check_same_layout(dy, "dy", x, "the forward input x")
    return _run_backward(_SILU, x, None, dy, dx_out, None, "silu_backward: dx")


class GluActivationCache(NamedTuple):
    g: np.ndarray  # gate pre-activation    (..., F)
    u: np.ndarray  # up projection          (..., F)
    activation: str  # "silu" or "gelu"
    approximate: str  # GeLU form, "none" or "tanh" ("none" for SiLU)


def _glu_kind(activation, approximate):
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, GLU_ACTIVATIONS))} "
                         f"('silu': SwiGLU, 'gelu': GeGLU), got {activation!r}")
    return _SILU if activation == "silu" else _gelu_kind(approximate)


def glu_forward(g: np.ndarray, u: np.ndarray, activation: str, approximate: str = "none",
                out: np.ndarray = None):
    """The gated FFN's middle, ``h = act(g) ⊙ u`` (functional/glu.py's a = act(g), h = a ⊙ u).

    activation: "silu" (SwiGLU) or "gelu" (GeGLU, ``approximate`` "none" or "tanh").
    g, u: (..., F) same shape and dtype  →  (h (..., F), GluActivationCache).
    """
    kind = _glu_kind(activation, approximate)
    g = _check_float_array(g, "g")
    u = _check_same_layout(u, "u", g, "g")
    h = _run_forward(kind, g, u, out, "glu_forward: h = act(g) ⊙ u")
    return h, GluActivationCache(g, u, activation, approximate)


def glu_backward(dh: np.ndarray, cache: GluActivationCache, dg_out: np.ndarray = None,
                 du_out: np.ndarray = None):
    """Returns ``(dg, du)`` (..., F): du = dh ⊙ act(g), dg = dh ⊙ u ⊙ act'(g)."""
    g, u, activation, approximate = cache
    dh = _check_same_layout(dh, "dh", g, "the forward input g")
    return _run_backward(_glu_kind(activation, approximate), g, u, dh, dg_out, du_out,
                         "glu_backward: dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g)")
