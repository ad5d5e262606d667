"""The fused activation kernels (npformer/kernels/activations.py) against their functional
twins (functional/gelu.py, silu.py, and glu.py's elementwise middle), and the vectorisable
erf and exp they are built on.

Tolerances (DESIGN.md, kernel vs reference): 1e-12 in float64, 1e-5 in float32, per element
relative to max(|reference|, 1) — relative where the value is ≥ 1, absolute below (a GeLU
of x = −6 is −6e-9, computed by both sides from 1 + erf(x/√2) ≈ 1e-9, whose last bits are
rounding of the 1, not information).
Sizes stay small so that a subset also runs under NUMBA_DISABLE_JIT=1 (last test).
"""

import math

import numpy as np

from helpers import assert_subset_passes_without_jit
import pytest
from numba import njit

from npformer._validate import NonFiniteError
from npformer.functional import gelu as gelu_twin
from npformer.functional import silu as silu_twin
from npformer.functional.gelu import GeluCache
from npformer.functional.silu import SiluCache
from npformer.kernels import activations
from npformer.kernels._exp import exp_nonpositive
from npformer.kernels.activations import (
    GluActivationCache,
    gelu_backward,
    gelu_forward,
    glu_backward,
    glu_forward,
    silu_backward,
    silu_forward,
)
from npformer.kernels.erf import erf_float64

# the functional twins warn about x² overflowing at |x| = 1e30 (harmless there, see their
# docstrings); the kernels use no NumPy arithmetic that could warn
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md
ACTIVATIONS = ["gelu_none", "gelu_tanh", "silu"]
SHAPES = [(), (1,), (7,), (1023,), (2049,), (3, 5, 67)]


def _shape_id(shape):
    return "shape_" + ("x".join(map(str, shape)) or "scalar")


def assert_close(actual, expected, what):
    """|actual − expected| ≤ tol · max(|expected|, 1) for every element; same dtype, shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not np.isnan(actual).any(), what
    tol = KERNEL_TOL[expected.dtype]
    a = actual.astype(np.float64)
    b = expected.astype(np.float64)
    error = np.abs(a - b) / np.maximum(np.abs(b), 1.0)
    assert error.max(initial=0.0) <= tol, (what, error.max(), a.ravel()[np.argmax(error)],
                                           b.ravel()[np.argmax(error)])


def _inputs(shape, dtype, seed):
    """x spread over the interesting range (the tails, the kink near −0.75 and the region
    where erf switches formula at |x|/√2 = 1), ±1e4 offsets, and the extremes."""
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape) * 3.0)
    flat = x.reshape(-1)
    extremes = [1e4 + 0.3, -1e4 - 0.7, 1e30, -1e30, np.finfo(dtype).max, -np.finfo(dtype).max,
                0.0, -0.0, 1e-30, -1e-30, math.sqrt(2.0), -math.sqrt(2.0), 8.5, -8.5, 40.0, -40.0]
    if flat.size >= 40:
        flat[:len(extremes)] = extremes
    dy = np.asarray(rng.standard_normal(shape) * 1.5 + 0.2)
    return x.astype(dtype), dy.astype(dtype)


def _pairs(activation):
    """(kernel forward, kernel backward, twin forward, twin backward), each forward of x only."""
    if activation == "silu":
        return (silu_forward, silu_backward, silu_twin.silu_forward, silu_twin.silu_backward)
    approximate = activation.split("_")[1]
    return (lambda x, **kw: gelu_forward(x, approximate, **kw), gelu_backward,
            lambda x: gelu_twin.gelu_forward(x, approximate), gelu_twin.gelu_backward)


# ---- the building blocks: erf and exp -----------------------------------------------------


@njit
def _erf_array(x, out):
    for i in range(x.shape[0]):
        out[i] = erf_float64(x[i])


@njit
def _exp_array(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])


def _erf_sample(n):
    rng = np.random.default_rng(7)
    return np.concatenate([
        rng.uniform(-7.0, 7.0, n), rng.standard_normal(n) * 2.0,
        np.linspace(-6.5, 6.5, n + 1),  # through both seams, |x| = 1 and |x| = 6
        np.logspace(-320, 300, n // 4), -np.logspace(-320, 300, n // 4),  # subnormal to huge
        np.nextafter(1.0, [0.0, 2.0]), np.nextafter(6.0, [0.0, 7.0]), [-1.0, 1.0],
    ])


def test_erf_float64_within_two_units_of_math_erf():
    # the branch-free erf of the exact GeLU kernel against math.erf (glibc, ~1 ulp), in units
    # of the last place of math.erf's value: measured max 2 (mean 0.09, 3e-5 of the points
    # above 1) on 1.4 million points; the bound allows math.erf's own ulp on another libm
    x = _erf_sample(200_000)
    got = np.empty_like(x)
    _erf_array(x, got)
    expected = np.array([math.erf(v) for v in x])
    units = np.abs(got - expected) / np.spacing(np.abs(expected))
    assert units.max() <= 3, (units.max(), x[np.argmax(units)])
    assert np.all(np.abs(got) <= 1.0)


def test_erf_float64_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6.0, -6.0, 1e300, -1e-310])
    got = np.empty_like(x)
    _erf_array(x, got)
    assert got[0] == 0.0 and not np.signbit(got[0]) and got[1] == 0.0 and np.signbit(got[1])
    assert list(got[2:4]) == [1.0, -1.0] and np.isnan(got[4])
    assert list(got[5:8]) == [1.0, -1.0, 1.0] and got[8] == math.erf(-1e-310)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_within_rounding(dtype):
    # the elementwise exp (same algorithm as flash attention's _exp_tile) against np.exp in
    # long double: ≤ 1 float32 / 2 float64 units, 0 at and below the floor, for −inf and NaN
    rng = np.random.default_rng(11)
    x = (-rng.integers(0, 90 * 256, 3001) / 256).astype(dtype)  # exact grid, down to −90
    x[:4] = [-np.inf, np.nan, 0.0, -1e30]
    got = np.empty_like(x)
    _exp_array(x, got)
    floor = -87.0 if dtype == np.float32 else -708.0
    with np.errstate(under="ignore", invalid="ignore"):
        expected = np.where(x > floor, np.exp(x.astype(np.longdouble)), 0.0)
    assert got[0] == 0.0 and got[1] == 0.0 and got[2] == 1.0 and got[3] == 0.0
    inside = expected > 0
    assert np.all(got[~inside] == 0.0)
    relative = np.abs(got[inside] - expected[inside]) / expected[inside]
    assert relative.max() <= (1 if dtype == np.float32 else 2) * np.finfo(dtype).eps


# ---- each activation kernel equals its functional twin ------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_equals_functional_twin(activation, shape, dtype):
    forward, backward, twin_forward, twin_backward = _pairs(activation)
    x, dy = _inputs(shape, dtype, seed=len(shape) * 10000 + int(np.prod(shape)))
    y, cache = forward(x)
    y_twin, twin_cache = twin_forward(x)
    assert type(cache) is type(twin_cache) and cache.x is x
    assert_close(y, y_twin, "y")
    dx = backward(dy, cache)
    assert_close(dx, twin_backward(dy, twin_cache), "dx")
    # cross-fed caches: the kernel's forward feeds the twin's backward and vice versa
    assert_close(twin_backward(dy, cache), twin_backward(dy, twin_cache), "twin dx, kernel cache")
    assert_close(backward(dy, twin_cache), twin_backward(dy, twin_cache), "kernel dx, twin cache")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saturation_gives_the_twins_exact_answers(activation, dtype):
    # far in the tails σ, tanh and erf saturate: y = x or −0 and dy/dx = 1 or 0 exactly,
    # with no 0 · inf (x² overflows float32 above 1.8e19 and float64 above 1.3e154)
    forward, backward, twin_forward, twin_backward = _pairs(activation)
    big = np.finfo(dtype).max
    x = np.array([1e4, -1e4, 1e30, -1e30, 3e38, -3e38, big, -big, 1e20, -1e20], dtype=dtype)
    y, cache = forward(x)
    y_twin, twin_cache = twin_forward(x)
    assert np.array_equal(y, y_twin) and np.array_equal(y, np.where(x > 0, x, 0.0))
    assert np.array_equal(np.signbit(y), np.signbit(y_twin))
    dx = backward(np.ones_like(x), cache)
    assert np.array_equal(dx, np.where(x > 0, 1.0, 0.0).astype(dtype))
    assert np.array_equal(dx, twin_backward(np.ones_like(x), twin_cache))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_contiguous_input(activation):
    forward, backward, twin_forward, twin_backward = _pairs(activation)
    x, dy = _inputs((9, 40), np.float64, seed=5)
    x = x[:, ::3]  # (9, 14), strided: the kernel runs on a contiguous copy
    dy = dy[:, ::3] * 0.5 + 0.1  # (9, 14), a fresh array
    y, cache = forward(x)
    assert_close(y, twin_forward(x)[0], "y")
    assert_close(backward(dy, cache), twin_backward(dy, twin_forward(x)[1]), "dx")


# ---- the gated FFN's middle: h = act(g) ⊙ u ------------------------------------------------

GLU_CASES = [("silu", "none"), ("gelu", "none"), ("gelu", "tanh")]


def _glu_twin(g, u, dh, activation, approximate):
    """functional/glu.py's _glu_forward / _glu_backward, lines a = act(g) … dg."""
    if activation == "silu":
        a, act_cache = silu_twin.silu_forward(g)
        act_backward = silu_twin.silu_backward
    else:
        a, act_cache = gelu_twin.gelu_forward(g, approximate)
        act_backward = gelu_twin.gelu_backward
    h = a * u
    da = dh * u
    du = dh * a
    dg = act_backward(da, act_cache)
    return h, dg, du


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (2049,), (2, 3, 171)], ids=_shape_id)
@pytest.mark.parametrize("activation,approximate", GLU_CASES)
def test_glu_equals_functional_glu(activation, approximate, shape, dtype):
    g, dh = _inputs(shape, dtype, seed=int(np.prod(shape)) + 3)
    g = np.clip(g, -1e30, 1e30)  # act(g) ⊙ u of the dtype's max would overflow (tested below)
    u = (np.random.default_rng(9).standard_normal(shape) * 2.0 - 0.3).astype(dtype)
    h, cache = glu_forward(g, u, activation, approximate)
    h_twin, dg_twin, du_twin = _glu_twin(g, u, dh, activation, approximate)
    assert isinstance(cache, GluActivationCache) and cache.g is g and cache.u is u
    assert_close(h, h_twin, "h")
    dg, du = glu_backward(dh, cache)
    assert_close(dg, dg_twin, "dg")
    assert_close(du, du_twin, "du")


# ---- out= buffers ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_out_buffers_are_written_and_returned(activation):
    forward, backward, _, _ = _pairs(activation)
    x, dy = _inputs((4, 33), np.float32, seed=2)
    y_buffer = np.full_like(x, np.nan)
    dx_buffer = np.full_like(x, np.nan)
    y, cache = forward(x, out=y_buffer)
    assert y is y_buffer and np.array_equal(y, forward(x)[0])
    dx = backward(dy, cache, dx_out=dx_buffer)
    assert dx is dx_buffer and np.array_equal(dx, backward(dy, cache))


def test_glu_out_buffers_are_written_and_returned():
    g, dh = _inputs((5, 21), np.float64, seed=4)
    g = np.clip(g, -1e30, 1e30)
    u = g[::-1].copy()
    h_buffer, dg_buffer, du_buffer = (np.full_like(g, np.nan) for _ in range(3))
    h, cache = glu_forward(g, u, "gelu", "tanh", out=h_buffer)
    assert h is h_buffer and np.array_equal(h, glu_forward(g, u, "gelu", "tanh")[0])
    dg, du = glu_backward(dh, cache, dg_out=dg_buffer, du_out=du_buffer)
    assert dg is dg_buffer and du is du_buffer
    dg_new, du_new = glu_backward(dh, cache)
    assert np.array_equal(dg, dg_new) and np.array_equal(du, du_new)


def test_bad_out_buffers_are_refused():
    x, dy = _inputs((4, 6), np.float32, seed=3)
    with pytest.raises(ValueError, match=r"out has shape \(4, 5\) but x has shape \(4, 6\)"):
        silu_forward(x, out=np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="out has dtype float64 but x has dtype float32"):
        gelu_forward(x, out=np.empty((4, 6)))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        gelu_forward(x, "tanh", out=np.empty((6, 4), np.float32).T)
    with pytest.raises(ValueError, match="out overlaps an input"):
        silu_forward(x, out=x)  # the cache keeps x: writing y over it would break the backward
    _, cache = gelu_forward(x)
    with pytest.raises(ValueError, match="dx_out overlaps an input"):
        gelu_backward(dy, cache, dx_out=dy)
    _, cache = glu_forward(x, dy, "silu")
    buffer = np.empty_like(x)
    with pytest.raises(ValueError, match="du_out overlaps an input"):
        glu_backward(x + 1, cache, dg_out=buffer, du_out=buffer)


# ---- bad arguments and overflow ------------------------------------------------------------


def test_bad_arguments_name_the_option():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="approximate must be one of 'none', 'tanh'.*'exact'"):
        gelu_forward(x, "exact")
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu'.*'relu'"):
        glu_forward(x, x, "relu")
    with pytest.raises(ValueError, match="x must be a numpy.ndarray, got list"):
        silu_forward([1.0, 2.0])
    with pytest.raises(ValueError, match="got dtype int64"):
        gelu_forward(np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"u has shape \(3, 2\) but g has shape \(2, 3\)"):
        glu_forward(x, np.ones((3, 2)), "silu")
    _, cache = silu_forward(x)
    with pytest.raises(ValueError, match=r"dy has shape \(3,\) but the forward input x"):
        silu_backward(np.ones(3), cache)
    with pytest.raises(ValueError, match="dy has dtype float32 but the forward input x"):
        silu_backward(np.ones((2, 3), np.float32), cache)


def test_overflow_of_finite_inputs_raises_instead_of_inf():
    # products of finite float32 numbers beyond 3.4e38: the twins return inf silently (checked
    # here, so the test fails if that changes), the kernels refuse with NonFiniteError
    g = np.array([1.0, 2e19, -3.0], np.float32)
    u = np.array([1.0, 3e19, 2.0], np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(_glu_twin(g, u, np.ones_like(g), "silu", "none")[0]).any()
    with pytest.raises(NonFiniteError, match=r"glu_forward: h = act\(g\) ⊙ u overflows float32"):
        glu_forward(g, u, "silu")
    x = np.array([2.0, 0.5], np.float32)
    dy = np.array([3.3e38, 1.0], np.float32)  # dy/dx at x = 2: 1.091 (SiLU), 1.085 (GeLU)
    for forward, backward, _, twin_backward in map(_pairs, ACTIVATIONS):
        _, cache = forward(x)
        with np.errstate(over="ignore"):
            assert np.isinf(twin_backward(dy, cache)[0])
        with pytest.raises(NonFiniteError, match="_backward: dx overflows float32"):
            backward(dy, cache)
    _, cache = glu_forward(x, np.array([1e38, 1.0], np.float32), "gelu", "tanh")  # h ≤ 2e38
    with pytest.raises(NonFiniteError, match="glu_backward"):  # du = dh · gelu(2) = 7.8, but
        glu_backward(np.array([4.0, 1.0], np.float32), cache)  # dg = 4 · 1e38 · 1.085 = inf


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_without_a_per_call_check(activation):
    # no isfinite pass over the input (the model validates once per step): NaN stays NaN
    forward, backward, _, _ = _pairs(activation)
    x = np.array([np.nan, 1.0, -2.0])
    y, cache = forward(x)
    assert np.isnan(y[0]) and np.isfinite(y[1:]).all()
    dx = backward(np.ones(3), cache)
    assert np.isnan(dx[0]) and np.isfinite(dx[1:]).all()


def test_chunks_cover_every_element():
    # sizes around the parallel chunk: the last partial chunk and an exact multiple
    chunk = activations.CHUNK
    for n in (chunk - 1, chunk, chunk + 1, 2 * chunk + 5):
        x = np.linspace(-5.0, 5.0, n)
        y, cache = silu_forward(x)
        assert_close(y, silu_twin.silu_forward(x)[0], f"y, n = {n}")
        assert_close(silu_backward(x, cache), silu_twin.silu_backward(x, SiluCache(x)), "dx")
    y, _ = gelu_forward(np.zeros(0))
    assert y.shape == (0,)
    assert isinstance(gelu_forward(np.zeros(2))[1], GeluCache)


# ---- the same kernels as plain Python (NUMBA_DISABLE_JIT=1) -------------------------------

JIT_FREE_SUBSET = ("test_kernel_equals_functional_twin and (shape_7 or shape_3x5x67) or "
                   "test_saturation or test_glu_equals_functional_glu and shape_7 or "
                   "test_out_buffers or test_erf_float64_special or test_exp_nonpositive or "
                   "test_overflow or test_nan_propagates")


def test_kernels_pass_as_plain_python_under_numba_disable_jit():
    """A subset of this file in a child process with NUMBA_DISABLE_JIT=1, where the kernels
    run as ordinary Python (prange = range, np.ldexp for the exponent add)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 34,
                                     "npformer.kernels.activations:_forward_kernel")
