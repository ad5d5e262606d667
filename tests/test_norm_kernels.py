"""The fused LayerNorm / RMSNorm kernels (npformer/kernels/norms.py) against their functional
twins (npformer/functional/layernorm.py, rmsnorm.py).

Every output and gradient (y, the cached x̂ and 1/σ, dx, dweight, dbias) within the kernel
tolerance of DESIGN.md (float64 1e-12, float32 1e-5, relative to max(max|expected|, 1)) on
odd widths, 1-row, 1-D and 3-D inputs, ±1e4 offsets; overflow of finite inputs is an error;
the caches are interchangeable; out= / dx_out= buffers. Shapes are small so that a subset
also runs under NUMBA_DISABLE_JIT=1 (the last test).
"""

import numpy as np
import pytest

from helpers import assert_close, assert_subset_passes_without_jit
from npformer._validate import NonFiniteError
from npformer.functional import layernorm as functional_ln
from npformer.functional import rmsnorm as functional_rms
from npformer.functional.layernorm import LayerNormCache
from npformer.functional.rmsnorm import RMSNormCache
from npformer.kernels import norms

KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md
DTYPES = [np.float64, np.float32]
ODD_WIDTHS = [1, 3, 127, 129, 385]  # C: 1, below, around and beyond the vector widths
LN_AFFINE = ["none", "weight", "bias", "weight+bias"]


def assert_kernel_matches(actual, expected, dtype, what):
    """max |actual − expected| ≤ tol · max(max |expected|, 1), actual in dtype, finite."""
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype} != {np.dtype(dtype)}"
    tol = KERNEL_TOL[np.dtype(dtype)]
    scale = max(float(np.max(np.abs(np.asarray(expected, np.float64)), initial=0.0)), 1.0)
    assert_close(actual, expected, dtype, what, rtol=0.0, atol=tol * scale)


def _inputs(rng, shape, dtype, offset=0.0):
    """x (shape), weight, bias (C,), dy (shape): unusual values, not zeros or ones."""
    channels = shape[-1]
    x = (rng.standard_normal(shape) * 1.3 + 0.4 + offset).astype(dtype)
    weight = (1.0 + 0.5 * rng.standard_normal(channels)).astype(dtype)
    bias = (0.3 * rng.standard_normal(channels) - 0.1).astype(dtype)
    dy = (rng.standard_normal(shape) * 0.7 - 0.2).astype(dtype)
    return x, weight, bias, dy


def _ln_args(weight, bias, affine):
    return (weight if "weight" in affine else None, bias if "bias" in affine else None)


def check_layernorm(x, weight, bias, dy, eps=1e-5, expected_dtype=None):
    """Kernel forward + backward against the functional pair on the same inputs (or, with
    expected_dtype, on the inputs cast to that dtype: an accuracy check)."""
    dtype = x.dtype
    cast = (lambda a: a) if expected_dtype is None else (
        lambda a: None if a is None else a.astype(expected_dtype))
    y, cache = norms.layernorm_forward(x, weight, bias, eps)
    y_ref, cache_ref = functional_ln.layernorm_forward(cast(x), cast(weight), cast(bias), eps)
    assert isinstance(cache, LayerNormCache)
    assert cache.rstd.shape == cache_ref.rstd.shape and cache.has_bias == (bias is not None)
    assert (cache.weight is None) == (weight is None)
    grads = norms.layernorm_backward(dy, cache)
    grads_ref = functional_ln.layernorm_backward(cast(dy), cache_ref)
    assert_kernel_matches(y, y_ref, dtype, "y")
    assert_kernel_matches(cache.xhat, cache_ref.xhat, dtype, "xhat")
    assert_kernel_matches(cache.rstd, cache_ref.rstd, dtype, "rstd")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_kernel_matches(got, want, dtype, name)


def check_rmsnorm(x, weight, dy, eps=1e-6, expected_dtype=None):
    dtype = x.dtype
    cast = (lambda a: a) if expected_dtype is None else (
        lambda a: None if a is None else a.astype(expected_dtype))
    y, cache = norms.rmsnorm_forward(x, weight, eps)
    y_ref, cache_ref = functional_rms.rmsnorm_forward(cast(x), cast(weight), eps)
    assert isinstance(cache, RMSNormCache)
    assert cache.rstd.shape == cache_ref.rstd.shape and (cache.weight is None) == (weight is None)
    grads = norms.rmsnorm_backward(dy, cache)
    grads_ref = functional_rms.rmsnorm_backward(cast(dy), cache_ref)
    assert_kernel_matches(y, y_ref, dtype, "y")
    assert_kernel_matches(cache.xhat, cache_ref.xhat, dtype, "xhat")
    assert_kernel_matches(cache.rstd, cache_ref.rstd, dtype, "rstd")
    for name, got, want in zip(("dx", "dweight"), grads, grads_ref):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_kernel_matches(got, want, dtype, name)


# ---- equal to the functional twin --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", ODD_WIDTHS)
@pytest.mark.parametrize("affine", LN_AFFINE)
def test_layernorm_matches_functional(dtype, channels, affine):
    x, weight, bias, dy = _inputs(np.random.default_rng(channels), (5, channels), dtype)
    check_layernorm(x, *_ln_args(weight, bias, affine), dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", ODD_WIDTHS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_rmsnorm_matches_functional(dtype, channels, with_weight):
    x, weight, _, dy = _inputs(np.random.default_rng(channels + 1), (5, channels), dtype)
    check_rmsnorm(x, weight if with_weight else None, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(129,), (1, 385), (2, 3, 127), (3, 333, 129), (40, 3)],
                         ids=["1-D", "1-row", "3-D", "999-rows", "40-rows"])
def test_row_layouts(dtype, shape):
    # 1-D and 1-row inputs; 3-D leading dims; 999 and 40 rows: several rows per backward
    # chunk (min(N, 32) chunks, unequal sizes), so the summed partial dweight/dbias must
    # equal the functional's sums over all rows
    x, weight, bias, dy = _inputs(np.random.default_rng(len(shape) + shape[0]), shape, dtype)
    check_layernorm(x, weight, bias, dy)
    check_rmsnorm(x, weight, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_eps_is_passed_through(dtype, eps):
    x, weight, bias, dy = _inputs(np.random.default_rng(7), (4, 129), dtype)
    x *= 0.1  # the variance comparable to eps, so a lost eps shows
    check_layernorm(x, weight, bias, dy, eps=eps)
    check_rmsnorm(x, weight, dy, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_and_zero_rows(dtype):
    # variance 0 (LayerNorm) / mean square 0 (RMSNorm): σ = √eps, x̂ = 0, finite gradients
    x, weight, bias, dy = _inputs(np.random.default_rng(3), (3, 129), dtype)
    x[0] = 2.5
    x[1] = 0.0
    check_layernorm(x, weight, bias, dy)
    check_rmsnorm(x, weight, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("channels", [3, 129, 385])
def test_large_offsets(dtype, offset, channels):
    # 1e4 + O(1) noise: the case the second centring pass exists for (in float32, μ itself is
    # rounded to ~5e-4 there). Against the twin in the same dtype, and the float32 kernel
    # also against the float64 twin of the same float32 inputs (accuracy, not only agreement)
    x, weight, bias, dy = _inputs(np.random.default_rng(channels), (6, channels), dtype, offset)
    check_layernorm(x, weight, bias, dy)
    check_rmsnorm(x, weight, dy)
    if dtype == np.float32:
        check_layernorm(x, weight, bias, dy, expected_dtype=np.float64)
        check_rmsnorm(x, weight, dy, expected_dtype=np.float64)


def test_result_does_not_depend_on_the_thread_count():
    # the per-chunk partial sums depend on N only: 1 or 2 threads give the same bits
    import numba

    x, weight, bias, dy = _inputs(np.random.default_rng(11), (300, 129), np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            y, cache = norms.layernorm_forward(x, weight, bias)
            results.append((y,) + norms.layernorm_backward(dy, cache))
            y, cache = norms.rmsnorm_forward(x, weight)
            results[-1] += (y,) + norms.rmsnorm_backward(dy, cache)
    finally:
        numba.set_num_threads(before)
    for one, many in zip(*results):
        np.testing.assert_array_equal(one, many)


# ---- overflow of finite inputs: an error, never zeros ------------------------------------

def test_layernorm_variance_overflow_is_refused():
    # float32 values near 1e20: the variance (~5e39) is beyond float32; the functional
    # refuses with this message, the kernel must too (1/√inf would give all-zero outputs)
    x = np.array([[1e20, -1e20, 3e19, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    with pytest.raises(NonFiniteError, match=r"layernorm: the variance of x overflows float32 "
                                             r"in 1 row\(s\) \(largest \|x\| is 1e\+20\)"):
        norms.layernorm_forward(x)
    with pytest.raises(NonFiniteError, match="the variance of x overflows float32 in 1 row"):
        functional_ln.layernorm_forward(x)
    # float64: (x − μ)² overflows near 1e160; and a sum that overflows (mixed ±1.7e308) too
    rows = np.array([[1e160, -1e160, 3.0], [1.0, 2.0, 3.0], [1.7e308, -1.7e308, 1.7e308]])
    with pytest.raises(NonFiniteError, match="layernorm: the variance of x overflows float64 "
                                             r"in 2 row\(s\)"):
        norms.layernorm_forward(rows.reshape(1, 3, 3))
    # 1e18 (variance 1e36) still fits float32: the right answer, as the float64 twin gives
    x = np.array([[1e18, -1e18, 3e17, 0.0]], np.float32)
    check_layernorm(x, None, None, np.ones_like(x), expected_dtype=np.float64)


def test_rmsnorm_mean_square_overflow_is_refused():
    x = np.array([[1e20, -1e20, 3e19, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    with pytest.raises(NonFiniteError, match=r"rmsnorm: the mean of x² overflows float32 in 1 "
                                             r"row\(s\)"):
        norms.rmsnorm_forward(x, np.ones(4, np.float32))
    with pytest.raises(NonFiniteError, match=r"overflows float64 in 1 row\(s\)"):
        norms.rmsnorm_forward(np.array([[1e160, 2.0], [3.0, 4.0]]))
    x = np.array([[1e18, -1e18, 3e17, 0.0]], np.float32)
    check_rmsnorm(x, None, np.ones_like(x), expected_dtype=np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_propagates_as_nan_in_its_row_only(bad):
    # the kernels do no isfinite pass (the model validates once per step): a NaN/inf row
    # gives NaN in that row, is not reported as an overflow, and other rows stay right
    x, weight, bias, _ = _inputs(np.random.default_rng(5), (3, 129), np.float64)
    x[1, 7] = bad
    for forward, args, twin in ((norms.layernorm_forward, (weight, bias),
                                 functional_ln.layernorm_forward),
                                (norms.rmsnorm_forward, (weight,), functional_rms.rmsnorm_forward)):
        with np.errstate(invalid="ignore", over="ignore"):
            y, _ = forward(x, *args)
        assert np.isnan(y[1]).any() and not np.isfinite(y[1]).all()
        clean = np.delete(x, 1, axis=0)
        assert_kernel_matches(np.delete(y, 1, axis=0), twin(clean, *args)[0], np.float64, "rows")


# ---- caches are interchangeable --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", LN_AFFINE)
def test_layernorm_caches_cross_feed(dtype, affine):
    x, weight, bias, dy = _inputs(np.random.default_rng(13), (2, 3, 127), dtype)
    args = _ln_args(weight, bias, affine)
    _, kernel_cache = norms.layernorm_forward(x, *args)
    _, functional_cache = functional_ln.layernorm_forward(x, *args)
    expected = functional_ln.layernorm_backward(dy, functional_cache)
    for got in (functional_ln.layernorm_backward(dy, kernel_cache),
                norms.layernorm_backward(dy, functional_cache)):
        for name, a, b in zip(("dx", "dweight", "dbias"), got, expected):
            assert (a is None) == (b is None), name
            if b is not None:
                assert_kernel_matches(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [False, True])
def test_rmsnorm_caches_cross_feed(dtype, with_weight):
    x, weight, _, dy = _inputs(np.random.default_rng(17), (2, 3, 127), dtype)
    weight = weight if with_weight else None
    _, kernel_cache = norms.rmsnorm_forward(x, weight)
    _, functional_cache = functional_rms.rmsnorm_forward(x, weight)
    expected = functional_rms.rmsnorm_backward(dy, functional_cache)
    for got in (functional_rms.rmsnorm_backward(dy, kernel_cache),
                norms.rmsnorm_backward(dy, functional_cache)):
        for name, a, b in zip(("dx", "dweight"), got, expected):
            assert (a is None) == (b is None), name
            if b is not None:
                assert_kernel_matches(a, b, dtype, name)


def test_output_is_not_the_cache_and_input_may_be_a_view():
    # without an affine part y must still be its own array (a caller may scale it in place);
    # a non-contiguous x (a transposed view) gives the same numbers as its contiguous copy
    x, _, _, dy = _inputs(np.random.default_rng(19), (129, 6), np.float64)
    view = x.T  # (6, 129), not C-contiguous
    y, cache = norms.layernorm_forward(view)
    assert not np.shares_memory(y, cache.xhat)
    expected = norms.layernorm_backward(dy.T.copy(), cache)[0]
    y[...] = 0.0
    np.testing.assert_array_equal(norms.layernorm_backward(dy.T.copy(), cache)[0], expected)
    check_layernorm(view, None, None, dy.T)
    y, cache = norms.rmsnorm_forward(view)
    assert not np.shares_memory(y, cache.xhat)
    check_rmsnorm(view, None, dy.T)


# ---- out= and dx_out= -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffers_are_filled_and_returned(dtype):
    x, weight, bias, dy = _inputs(np.random.default_rng(23), (2, 3, 129), dtype)
    for forward, backward, args in ((norms.layernorm_forward, norms.layernorm_backward,
                                     (weight, bias)),
                                    (norms.rmsnorm_forward, norms.rmsnorm_backward, (weight,))):
        y_expected, cache = forward(x, *args)
        grads_expected = backward(dy, cache)
        out = np.full_like(x, np.nan)  # every entry must be written
        dx_out = np.full_like(x, np.nan)
        for _ in range(2):  # a reused workspace gives the same result again
            y, cache = forward(x, *args, out=out)
            assert y is out
            np.testing.assert_array_equal(y, y_expected)  # same code, same inputs: same bits
            grads = backward(dy, cache, dx_out=dx_out)
            assert grads[0] is dx_out
            for got, want in zip(grads, grads_expected):
                np.testing.assert_array_equal(got, want)


def test_bad_out_buffers_are_refused():
    x, weight, bias, dy = _inputs(np.random.default_rng(29), (4, 6), np.float32)
    _, cache = norms.layernorm_forward(x, weight, bias)
    cases = [
        (dict(out=np.empty((4, 5), np.float32)), r"out must have shape \(4, 6\)"),
        (dict(out=np.empty((4, 6), np.float64)), "out has dtype float64 but the result has "
                                                 "dtype float32"),
        (dict(out=np.empty((6, 4), np.float32).T), "out must be C-contiguous"),
        (dict(out=x), "out shares memory with x"),
        (dict(out=[0.0] * 24), "out must be a numpy.ndarray, got list"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            norms.layernorm_forward(x, weight, bias, **kwargs)
        with pytest.raises(ValueError, match=message):
            norms.rmsnorm_forward(x, weight, **kwargs)
    with pytest.raises(ValueError, match="dx_out shares memory with dy"):
        norms.layernorm_backward(dy, cache, dx_out=dy)
    with pytest.raises(ValueError, match="dx_out shares memory with the cached xhat"):
        norms.layernorm_backward(dy, cache, dx_out=cache.xhat)
    _, cache = norms.rmsnorm_forward(x, weight)
    with pytest.raises(ValueError, match=r"dx_out must have shape \(4, 6\)"):
        norms.rmsnorm_backward(dy, cache, dx_out=np.empty(24, np.float32))


def test_bad_inputs_get_the_functional_errors():
    x = np.ones((2, 3))
    for forward in (norms.layernorm_forward, norms.rmsnorm_forward):
        with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
            forward(x, np.ones(4))
        with pytest.raises(ValueError, match="floating-point"):
            forward(np.ones((2, 3), dtype=np.int32))
        with pytest.raises(ValueError, match="must be a numpy.ndarray, got list"):
            forward([[1.0, 2.0]])
        with pytest.raises(ValueError, match="share one dtype"):
            forward(x.astype(np.float32), np.ones(3))
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            forward(x, None, eps=0.0)
        with pytest.raises(ValueError, match="at least 1 dimension"):
            forward(np.array(1.0))
        with pytest.raises(ValueError, match="at least one channel"):
            forward(np.ones((2, 0)))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        norms.layernorm_forward(x, np.ones(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match="share one dtype"):
        norms.layernorm_forward(x, None, np.ones(3, dtype=np.float32))
    for forward, backward in ((norms.layernorm_forward, norms.layernorm_backward),
                              (norms.rmsnorm_forward, norms.rmsnorm_backward)):
        _, cache = forward(x, np.ones(3))
        with pytest.raises(ValueError, match=r"dy must have shape \(2, 3\)"):
            backward(np.ones((2, 4)), cache)
        with pytest.raises(ValueError, match="dy has dtype float32 but the forward output has "
                                             "dtype float64"):
            backward(np.ones((2, 3), dtype=np.float32), cache)


# ---- the same kernels as plain Python (NUMBA_DISABLE_JIT=1) -------------------------------

# the whole file but this test: ~5 s as plain Python (the shapes are small)
JIT_FREE_SUBSET = "not test_kernels_pass_as_plain_python_under_numba_disable_jit"


def test_kernels_pass_as_plain_python_under_numba_disable_jit():
    """Every other test of this file in a child process with NUMBA_DISABLE_JIT=1, where the
    kernels run as ordinary Python (prange = range, no fastmath, bounds-checked indexing:
    it found a partial-sum row taken out of bounds that the compiled code never used)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 110,
                                     "npformer.kernels.norms:_layernorm_forward_kernel")
