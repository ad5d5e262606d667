"""The residual add + dropout kernel (npformer/kernels/residual_dropout.py) against the
model's reference, ``x + functional.dropout.dropout_forward(b, p, rng)[0]``, and dropout's
backward kernel against ``functional.dropout.dropout_backward``.

The masks must be bitwise the functional's for the same generator state (the fused and the
reference model then drop the same units), and the generator must be left in the same
state; y and dx within the kernel tolerance (DESIGN.md: 1e-12 float64, 1e-5 float32,
relative to max(max |reference|, 1)). Also: p = 0, p = 1 and eval (nothing drawn), four
bit generators, odd and 1-row shapes, ±1e4 offsets, non-contiguous inputs, caches fed
across, out= (in place on x, on b, on dy), overflow and bad input. Shapes are small so that
a subset also runs under NUMBA_DISABLE_JIT=1.
"""

import numpy as np

from helpers import assert_subset_passes_without_jit
import pytest

from npformer._validate import NonFiniteError
from npformer.functional import dropout as functional
from npformer.kernels import residual_dropout as kernel

KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md
SHAPES = [(1, 1), (1, 7), (5, 3), (2, 3, 7), (3, 130), (40, 500)]  # (40, 500): 2 chunks


def assert_matches(actual, expected, what):
    """max |actual − expected| ≤ tol · max(max |expected|, 1), no NaN, same shape/dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    tol = KERNEL_TOL[expected.dtype]
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} · {scale:.3g}"


def _pair(rng, shape, dtype, offset=0.0):
    x = (rng.standard_normal(shape) * 1.3 + 0.2 + offset).astype(dtype)
    b = (rng.standard_normal(shape) * 0.9 - 0.3 - offset).astype(dtype)
    return x, b


def _reference(x, b, p, rng, training=True):
    """The model's ``x + drop(branch)`` (models/blocks.py)."""
    dropped, cache = functional.dropout_forward(b, p, rng, training)
    return x + dropped, cache


def _same_state(first: np.random.Generator, second: np.random.Generator) -> bool:
    """The bit generators' states are equal (dicts of ints, strings and arrays)."""
    def equal(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        return np.array_equal(a, b)
    return equal(first.bit_generator.state, second.bit_generator.state)


def _check_against_reference(x, b, p, seed, training=True, bit_generator=np.random.PCG64,
                             what=""):
    rng_kernel = np.random.Generator(bit_generator(seed))
    rng_reference = np.random.Generator(bit_generator(seed))
    y, cache = kernel.residual_dropout_forward(x, b, p, rng_kernel, training)
    y_ref, cache_ref = _reference(x, b, p, rng_reference, training)
    assert_matches(y, y_ref, f"y {what}")
    assert type(cache) is functional.DropoutCache
    assert cache[1:] == cache_ref[1:], f"scale, shape, dtype {what}"
    if cache_ref.mask is None:
        assert cache.mask is None, what
    else:
        assert cache.mask.dtype == np.bool_ and cache.mask.shape == cache_ref.mask.shape
        np.testing.assert_array_equal(cache.mask, cache_ref.mask, err_msg=f"mask {what}")
    # the generators were left in the same state: their next draws agree
    np.testing.assert_array_equal(rng_kernel.random(4), rng_reference.random(4))
    assert _same_state(rng_kernel, rng_reference)
    return cache, cache_ref


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_reference_with_the_same_masks(shape, p, dtype):
    """y = x + dropout(b), bitwise the functional's masks; both backwards on both caches."""
    rng = np.random.default_rng(sum(shape))
    x, b = _pair(rng, shape, dtype)
    cache, cache_ref = _check_against_reference(x, b, p, seed=len(shape) * 31 + int(10 * p),
                                                what=f"{shape} p={p}")
    dy = (rng.standard_normal(shape) * 1.1 + 0.4).astype(dtype)
    dx_ref = functional.dropout_backward(dy, cache_ref)
    assert_matches(kernel.dropout_backward(dy, cache), dx_ref, "dx")
    assert_matches(kernel.dropout_backward(dy, cache_ref), dx_ref,
                   "dx, kernel backward of the functional cache")
    assert_matches(functional.dropout_backward(dy, cache), dx_ref,
                   "dx, functional backward of the kernel cache")


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937,
                                           np.random.Philox, np.random.SFC64],
                         ids=lambda g: g.__name__)
def test_every_bit_generator_gives_the_same_masks(bit_generator):
    rng = np.random.default_rng(1)
    x, b = _pair(rng, (7, 33), np.float32)
    _check_against_reference(x, b, 0.3, seed=12, bit_generator=bit_generator,
                             what=bit_generator.__name__)


def test_a_generator_used_before_gives_the_same_masks():
    """Generators partway through their stream (and a buffered 32-bit draw): the kernel
    takes its uniforms from wherever the stream is, like the functional."""
    x, b = _pair(np.random.default_rng(2), (9, 11), np.float64)
    rng_kernel, rng_reference = np.random.default_rng(77), np.random.default_rng(77)
    for rng in (rng_kernel, rng_reference):
        rng.random(13)
        rng.integers(0, 10, size=3, dtype=np.uint32)  # leaves a buffered half word
    for _ in range(3):  # three calls in a row, as a model's blocks make them
        _, cache = kernel.residual_dropout_forward(x, b, 0.25, rng_kernel)
        _, cache_ref = _reference(x, b, 0.25, rng_reference)
        np.testing.assert_array_equal(cache.mask, cache_ref.mask)
    assert _same_state(rng_kernel, rng_reference)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, False), (0.0, False)],
                         ids=["p0", "eval", "p0-eval"])
def test_identity_dropout_is_a_plain_add(p, training, dtype):
    """p = 0 or eval: y = x + b, mask None, scale 1, nothing drawn."""
    x, b = _pair(np.random.default_rng(3), (6, 35), dtype)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    y, cache = kernel.residual_dropout_forward(x, b, p, rng, training)
    assert rng.bit_generator.state == state  # nothing drawn
    assert_matches(y, x + b, "y")
    assert cache == functional.DropoutCache(None, 1.0, x.shape, x.dtype)
    dy = x * 0.5 - 1.0
    dx = kernel.dropout_backward(dy, cache)
    np.testing.assert_array_equal(dx, dy)
    assert dx is not dy  # a copy, as the functional's
    _check_against_reference(x, b, p, seed=5, training=training)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_p_one_drops_everything(dtype):
    """p = 1: y = x, mask all False, scale 0, nothing drawn, dx = 0 (no 1/0 formed)."""
    x, b = _pair(np.random.default_rng(4), (5, 9), dtype)
    rng = np.random.default_rng(6)
    state = rng.bit_generator.state
    y, cache = kernel.residual_dropout_forward(x, b, 1.0, rng)
    assert rng.bit_generator.state == state
    np.testing.assert_array_equal(y, x)
    assert not cache.mask.any() and cache.scale == 0.0
    np.testing.assert_array_equal(kernel.dropout_backward(x, cache), np.zeros_like(x))
    _check_against_reference(x, b, 1.0, seed=6)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)], ids=["0-d", "empty", "empty-3d"])
def test_scalar_and_empty_shapes(shape):
    """A 0-d array and empty arrays, as the functional takes them (p = 0, 0.5, 1)."""
    x, b = np.full(shape, 1.5), np.full(shape, -2.25)
    for p in (0.0, 0.5, 1.0):
        cache, cache_ref = _check_against_reference(x, b, p, seed=4, what=f"{shape} p={p}")
        dy = np.full(shape, 0.75)
        np.testing.assert_array_equal(kernel.dropout_backward(dy, cache),
                                      functional.dropout_backward(dy, cache_ref))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_offsets(dtype):
    """x around +1e4 and b around −1e4 (the sum cancels), p = 0.2 and p = 0."""
    rng = np.random.default_rng(7)
    for offset in (1e4, -1e4):
        x, b = _pair(rng, (16, 37), dtype, offset=offset)
        for p in (0.2, 0.0):
            _check_against_reference(x, b, p, seed=9, what=f"offset {offset} p={p}")


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_non_contiguous_inputs(p):
    """Transposed and strided x, b, dy: read in C order of their shape, like the functional
    (rng.random(b.shape) is in C order whatever b's strides)."""
    rng = np.random.default_rng(10)
    x_wide, b_wide = _pair(rng, (12, 2 * 9), np.float64)
    x, b = x_wide[:, ::2], b_wide.T.copy().T[:, 1::2]
    assert not x.flags.c_contiguous and not b.flags.c_contiguous
    cache, cache_ref = _check_against_reference(x, b, p, seed=3)
    dy = np.asfortranarray(rng.standard_normal((12, 9)))
    assert_matches(kernel.dropout_backward(dy, cache), functional.dropout_backward(dy, cache_ref),
                   "dx of a Fortran-ordered dy")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.1, True), (0.1, False), (1.0, True)],
                         ids=["p0", "p0.1", "eval", "p1"])
def test_out_in_place(p, training, dtype):
    """out=x: the residual stream updated in place; out=b; out=dy in the backward."""
    shape = (40, 500)  # two parallel chunks
    for target in ("x", "b"):
        x, b = _pair(np.random.default_rng(11), shape, dtype)
        y_ref, cache_ref = _reference(x, b, p, np.random.default_rng(12), training)
        out = x if target == "x" else b
        y, cache = kernel.residual_dropout_forward(x, b, p, np.random.default_rng(12),
                                                   training, out=out)
        assert y is out
        assert_matches(out, y_ref, f"y into {target}")
        if cache_ref.mask is not None:
            np.testing.assert_array_equal(cache.mask, cache_ref.mask)
    dy = (np.random.default_rng(13).standard_normal(shape) + 0.2).astype(dtype)
    dx_ref = functional.dropout_backward(dy, cache_ref)
    dx = kernel.dropout_backward(dy, cache_ref, out=dy)
    assert dx is dy
    assert_matches(dy, dx_ref, "dx into dy")
    separate = np.empty(shape, dtype=dtype)
    assert kernel.dropout_backward(dx_ref * 0 + 1, cache, out=separate) is separate


def test_bad_out_is_refused():
    x, b = _pair(np.random.default_rng(14), (4, 6), np.float64)
    rng = np.random.default_rng(0)
    memory = np.zeros(25)
    x_shifted, out_shifted = memory[:24].reshape(4, 6), memory[1:].reshape(4, 6)
    x_shifted[...] = x
    with pytest.raises(ValueError, match="overlaps x without being x"):  # one element off
        kernel.residual_dropout_forward(x_shifted, b, 0.1, rng, out=out_shifted)
    with pytest.raises(ValueError, match="overlaps b without being b"):
        kernel.residual_dropout_forward(b, x_shifted, 0.1, rng, out=out_shifted)
    with pytest.raises(ValueError, match="out must have x's shape"):
        kernel.residual_dropout_forward(x, b, 0.1, rng, out=np.empty((4, 5)))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.residual_dropout_forward(x, b, 0.1, rng, out=np.empty((6, 4)).T)
    _, cache = kernel.residual_dropout_forward(x, b, 0.1, rng)
    with pytest.raises(ValueError, match="out must have dy's shape"):
        kernel.dropout_backward(x, cache, out=np.empty((4, 6), dtype=np.float32))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_overflow_of_finite_inputs_is_an_error(p):
    """x + b/(1 − p) beyond float32's range from finite x and b: NonFiniteError, where the
    model's ``x + b`` would give inf silently; the backward's dy/(1 − p) likewise."""
    x = np.full((3, 5), 1e38, dtype=np.float32)
    x[1, 2] = 3e38
    b = np.full((3, 5), 3e38, dtype=np.float32)  # kept entries: 3e38 · 2 alone overflows
    with pytest.raises(NonFiniteError, match="overflows float32"):
        kernel.residual_dropout_forward(x, b, p, np.random.default_rng(1))
    _, cache = kernel.residual_dropout_forward(x * 0, b * 1e-9, 0.5, np.random.default_rng(1))
    with pytest.raises(NonFiniteError, match="dropout's backward .* overflows float32"):
        kernel.dropout_backward(b, cache)  # 3e38 · 2 where kept


def test_nan_and_inf_inputs_propagate():
    """No isfinite pass: NaN or inf in the inputs comes out, without an error."""
    x, b = _pair(np.random.default_rng(15), (4, 6), np.float64)
    x[0, 0], b[1, 1] = np.nan, np.inf
    y, _ = kernel.residual_dropout_forward(x, b, 0.0, np.random.default_rng(0))
    assert np.isnan(y[0, 0]) and y[1, 1] == np.inf
    assert np.isfinite(np.delete(y.reshape(-1), [0, 7])).all()


def test_bad_input_is_refused():
    x, b = _pair(np.random.default_rng(16), (4, 6), np.float64)
    rng = np.random.default_rng(0)
    _, cache = kernel.residual_dropout_forward(x, b, 0.1, rng)
    cases = [
        (lambda: kernel.residual_dropout_forward([1.0], b, 0.1, rng), "x must be a numpy"),
        (lambda: kernel.residual_dropout_forward(x, b.astype(np.float32), 0.1, rng),
         "b \\(the branch output\\) must have x's shape .* and dtype"),
        (lambda: kernel.residual_dropout_forward(x, b[:, :5], 0.1, rng), "must have x's shape"),
        (lambda: kernel.residual_dropout_forward(x.astype(int), b, 0.1, rng), "float32 or"),
        (lambda: kernel.residual_dropout_forward(x, b, 1.5, rng), "p must lie in"),
        (lambda: kernel.residual_dropout_forward(x, b, 0.1, 42), "rng must be a numpy"),
        (lambda: kernel.residual_dropout_forward(x, b, 0.1, rng, "yes"), "training must be"),
        (lambda: kernel.dropout_backward(b[:, :5], cache), "dy must have shape"),
        (lambda: kernel.dropout_backward(b.astype(np.float32), cache), "dy has dtype float32"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---- the same kernels as plain Python (NUMBA_DISABLE_JIT=1) -------------------------------

JIT_FREE_SUBSET = ("test_matches_reference_with_the_same_masks and float32 and not 500 or "
                   "test_every_bit_generator or test_identity or test_p_one or "
                   "test_out_in_place or test_overflow")


def test_kernels_pass_as_plain_python_under_numba_disable_jit():
    """A subset of this file (masks and values in float32 on the small shapes, four bit
    generators, p = 0 / eval / p = 1, in place, overflow) in a child process with
    NUMBA_DISABLE_JIT=1, where the kernels run as ordinary Python (prange = range)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 37,
                                     "npformer.kernels.residual_dropout:_residual_dropout_kernel")
