"""The RoPE kernel (npformer/kernels/rope.py) against its functional twin (functional/rope.py).

Tolerance (DESIGN.md, kernel vs NumPy reference): max |kernel − reference| ≤ tol · max(max
|reference|, 1), tol = 1e-12 in float64 and 1e-5 in float32, for y and dx. Covered: both
layouts, odd head sizes (D = 2, 6, 34, 7: not multiples of the vector width), partial
rotary, positions None / (T,) / (B, T) / (1, T), the three input layouts (C-contiguous,
attention's heads-inner view, arbitrary strides), 2-D/3-D/5-D inputs, caches fed across
(kernel forward → functional backward and back), out= (in place, heads-inner output),
the cos/sin table cache (keyed on the positions' content), overflow and bad input.
Shapes are small so that a subset also runs under NUMBA_DISABLE_JIT=1.
"""

import numpy as np

from helpers import assert_subset_passes_without_jit
import pytest

from npformer._validate import NonFiniteError
from npformer.functional import rope as functional
from npformer.kernels import rope as kernel

KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md


def assert_matches(actual, expected, what):
    """max |actual − expected| ≤ tol · max(max |expected|, 1), no NaN, same shape/dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    tol = KERNEL_TOL[expected.dtype]
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} · {scale:.3g}"


def _input(rng, B, H, T, D, dtype, kind, offset=0.0):
    """x (B, H, T, D) laid out as ``kind``: "contiguous"; "heads_inner", the view that
    nn/attention.py's _split_heads makes, x.reshape(B, T, H, D).transpose(0, 2, 1, 3);
    "strided": every other channel of a wider array (read through a copy)."""
    values = (rng.standard_normal((B, T, H, D)) * 1.7 - 0.4 + offset).astype(dtype)
    if kind == "contiguous":
        return np.ascontiguousarray(values.transpose(0, 2, 1, 3))
    if kind == "heads_inner":
        x = values.reshape(B, T, H * D).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        assert not x.flags.c_contiguous
        return x
    wide = np.zeros((B, H, T, 2 * D), dtype=dtype)
    wide[..., ::2] = values.transpose(0, 2, 1, 3)
    return wide[..., ::2]


def _positions(rng, kind, B, T):
    if kind == "none":
        return None
    if kind == "T":
        return rng.integers(0, 50, size=T)
    if kind == "BT":  # packed documents: positions restart
        return rng.integers(0, 3000, size=(B, T))
    return rng.integers(0, 50, size=(1, T))  # "1T": one row for every batch entry


HEAD_SIZES = [(2, None), (6, None), (6, 4), (34, None), (34, 10), (7, 4)]  # (D, rotary_dim)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("head_size, rotary_dim", HEAD_SIZES)
def test_matches_functional(dtype, layout, head_size, rotary_dim):
    """y and dx equal the functional's for every position kind and input layout; each
    backward accepts the other forward's cache; the caches hold the same tables."""
    rng = np.random.default_rng(head_size * 7 + (rotary_dim or 0))
    B, H, T = 2, 3, 5
    options = dict(theta=500000.0 if layout == "half" else 10000.0, rotary_dim=rotary_dim,
                   layout=layout)
    for positions_kind in ("none", "T", "BT", "1T"):
        for input_kind in ("contiguous", "heads_inner", "strided"):
            what = f"{positions_kind}, {input_kind}"
            x = _input(rng, B, H, T, head_size, dtype, input_kind)
            positions = _positions(rng, positions_kind, B, T)
            x_before = x.copy()
            y, cache = kernel.rope_forward(x, positions, **options)
            y_ref, cache_ref = functional.rope_forward(x, positions, **options)
            np.testing.assert_array_equal(x, x_before)  # the input is not touched
            assert_matches(y, y_ref, f"y ({what})")
            assert type(cache) is functional.RopeCache
            assert cache[2:] == cache_ref[2:]
            np.testing.assert_array_equal(cache.cos, cache_ref.cos)
            np.testing.assert_array_equal(cache.sin, cache_ref.sin)

            dy = _input(rng, B, H, T, head_size, dtype, input_kind)
            dx_ref = functional.rope_backward(dy, cache_ref)
            assert_matches(kernel.rope_backward(dy, cache), dx_ref, f"dx ({what})")
            assert_matches(kernel.rope_backward(dy, cache_ref), dx_ref,
                           f"dx, kernel backward of the functional cache ({what})")
            assert_matches(functional.rope_backward(dy, cache), dx_ref,
                           f"dx, functional backward of the kernel cache ({what})")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, positions", [
    ((5, 6), None),
    ((5, 6), np.array([9, 3, 0, 4, 4])),
    ((2, 5, 8), np.array([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]])),
    ((1, 1, 1, 2), None),  # one row, one pair
    ((2, 3, 2, 4, 6), np.array([[2, 3, 4, 0], [1, 1, 1, 1]])),
], ids=["2d", "2d-T", "3d-BT", "one-row", "5d-BT"])
def test_other_ranks(shape, positions, dtype):
    """x (T, D), (B, T, D) and (B, A, H, T, D) as the functional takes them."""
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 2.0 + 0.3).astype(dtype)
    for layout in ("half", "interleaved"):
        y, cache = kernel.rope_forward(x, positions, layout=layout)
        y_ref, cache_ref = functional.rope_forward(x, positions, layout=layout)
        assert_matches(y, y_ref, f"y {shape} {layout}")
        dy = (rng.standard_normal(shape) - 0.5).astype(dtype)
        assert_matches(kernel.rope_backward(dy, cache_ref),
                       functional.rope_backward(dy, cache), f"dx {shape} {layout}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_offsets_and_positions(dtype):
    """Values around ±1e4 and positions up to 10⁶ (long-wavelength angles, theta 500000)."""
    rng = np.random.default_rng(11)
    for offset in (1e4, -1e4):
        x = _input(rng, 2, 2, 6, 8, dtype, "heads_inner", offset=offset)
        positions = rng.integers(0, 10**6, size=(2, 6))
        for layout in ("half", "interleaved"):
            options = dict(theta=500000.0, rotary_dim=6, layout=layout)
            y, cache = kernel.rope_forward(x, positions, **options)
            y_ref, cache_ref = functional.rope_forward(x, positions, **options)
            assert_matches(y, y_ref, f"y offset {offset} {layout}")
            assert_matches(kernel.rope_backward(x, cache), functional.rope_backward(x, cache_ref),
                           f"dx offset {offset} {layout}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("input_kind", ["contiguous", "heads_inner"])
def test_in_place(dtype, input_kind):
    """out=x rotates x itself (forward) and out=dy the gradient (backward); the rotated
    values equal the functional's, pass-through channels stay."""
    rng = np.random.default_rng(5)
    for layout in ("half", "interleaved"):
        x = _input(rng, 2, 3, 4, 6, dtype, input_kind)
        y_ref, cache_ref = functional.rope_forward(x, None, rotary_dim=4, layout=layout)
        y, cache = kernel.rope_forward(x, None, rotary_dim=4, layout=layout, out=x)
        assert y is x
        assert_matches(x, y_ref, f"in-place y {layout}")
        dy = _input(rng, 2, 3, 4, 6, dtype, input_kind)
        dx_ref = functional.rope_backward(dy, cache_ref)
        dx = kernel.rope_backward(dy, cache, out=dy)
        assert dx is dy
        assert_matches(dy, dx_ref, f"in-place dx {layout}")


def test_out_heads_inner_gives_merge_ready_gradient():
    """out= a heads-inner view: dx lands in (B, T, H, D) memory, so attention's head merge
    dx.transpose(0, 2, 1, 3).reshape(B, T, H·D) is a view, not a copy."""
    rng = np.random.default_rng(8)
    B, H, T, D = 2, 3, 5, 6
    x = _input(rng, B, H, T, D, np.float64, "heads_inner")
    _, cache = kernel.rope_forward(x, None, layout="half")
    dy = _input(rng, B, H, T, D, np.float64, "contiguous")
    merged = np.empty((B, T, H * D))
    out = merged.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D) view
    dx = kernel.rope_backward(dy, cache, out=out)
    assert dx is out
    assert_matches(merged.reshape(B, T, H, D).transpose(0, 2, 1, 3),
                   functional.rope_backward(dy, cache), "dx through out")
    assert np.shares_memory(dx.transpose(0, 2, 1, 3).reshape(B, T, H * D), merged)


def test_bad_out_is_refused():
    rng = np.random.default_rng(9)
    x = _input(rng, 2, 3, 4, 6, np.float64, "contiguous")
    with pytest.raises(ValueError, match="overlaps x without being x"):
        kernel.rope_forward(x, None, out=x[:, ::-1])  # the heads in reverse: not in place
    with pytest.raises(ValueError, match="shape"):
        kernel.rope_forward(x, None, out=np.empty((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="dtype"):
        kernel.rope_forward(x, None, out=np.empty(x.shape, dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.rope_forward(x, None, out=np.empty((2, 3, 4, 12))[..., ::2])


def test_tables_are_keyed_on_the_positions_content():
    """The cos/sin cache: the same array object refilled with other positions, a new array
    with other content, another theta, rotary_dim or dtype: never a stale table."""
    rng = np.random.default_rng(3)
    x = _input(rng, 2, 2, 5, 8, np.float64, "contiguous")
    positions = np.array([0, 1, 2, 3, 4])

    def check(positions, what, **options):
        y, cache = kernel.rope_forward(x.astype(options.pop("dtype", np.float64)), positions,
                                       **options)
        y_ref, _ = functional.rope_forward(x.astype(y.dtype), positions, **options)
        assert_matches(y, y_ref, what)
        return cache

    first = check(positions, "positions 0..4")
    positions[:] = [7, 7, 1, 0, 9]  # same object, same shape, new content
    check(positions, "refilled positions")
    check(np.array([[3, 4, 5, 6, 7], [0, 0, 0, 0, 0]]), "(B, T) positions")
    check(positions.astype(np.int32), "int32 positions")
    check(positions, "theta 500000", theta=500000.0)
    check(positions, "rotary_dim 4", rotary_dim=4)
    check(positions, "float32", dtype=np.float32)
    again = check(np.array([0, 1, 2, 3, 4]), "positions 0..4 again")
    assert again.cos is first.cos  # a hit: computed once
    assert not again.cos.flags.writeable  # shared tables cannot be changed by a caller
    for start in range(kernel._TABLE_CACHE_SIZE + 5):  # more distinct positions than kept
        check(np.arange(start, start + 5), f"positions from {start}")
    assert len(kernel._tables) == kernel._TABLE_CACHE_SIZE  # bounded


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_overflow_of_finite_input_is_an_error(layout):
    """A pair (a, b) = (3e38, −3e38) in float32 at position 1 (pair 0's angle: 1 rad):
    a' = a cos 1 − b sin 1 ≈ 4.1e38 (forward), b' = b cos 1 − a sin 1 ≈ −4.1e38 (backward),
    beyond float32's largest (3.4e38). The functional returns ±inf there, silently; the
    kernel raises NonFiniteError."""
    x = np.zeros((1, 1, 2, 2), dtype=np.float32)
    x[0, 0, 1] = [3e38, -3e38]
    options = dict(position_ids=np.array([0, 1]), layout=layout)
    with np.errstate(over="ignore"):
        y_ref, cache = functional.rope_forward(x, **options)
    assert not np.isfinite(y_ref).all()  # the silent inf this kernel refuses
    with pytest.raises(NonFiniteError, match="rope of finite x overflows float32"):
        kernel.rope_forward(x, **options)
    with pytest.raises(NonFiniteError, match="rope of finite dy overflows float32"):
        kernel.rope_backward(x, cache)


def test_nan_input_propagates():
    """No isfinite pass: a NaN in x gives NaN in its own pair, no error, the rest exact."""
    rng = np.random.default_rng(4)
    x = _input(rng, 1, 2, 3, 4, np.float64, "contiguous")
    x[0, 1, 2, 0] = np.nan
    y, _ = kernel.rope_forward(x, None)
    y_ref, _ = functional.rope_forward(np.nan_to_num(x), None)
    assert np.isnan(y[0, 1, 2, [0, 2]]).all()
    finite = np.ones(y.shape, dtype=bool)
    finite[0, 1, 2, [0, 2]] = False
    np.testing.assert_allclose(y[finite], y_ref[finite], rtol=1e-12)


def test_bad_input_is_refused():
    x = np.zeros((2, 3, 4, 6))
    _, cache = kernel.rope_forward(x, None)
    cases = [
        (lambda: kernel.rope_forward([[1.0, 2.0]], None), "x must be a numpy.ndarray"),
        (lambda: kernel.rope_forward(x.astype(np.int64), None), "float32 or float64"),
        (lambda: kernel.rope_forward(np.zeros(6), None), "at least 2 dimension"),
        (lambda: kernel.rope_forward(x, None, rotary_dim=3), "rotary_dim must be an even"),
        (lambda: kernel.rope_forward(x, None, rotary_dim=8), "rotary_dim must be an even"),
        (lambda: kernel.rope_forward(x, None, layout="neox"), "layout must be 'half'"),
        (lambda: kernel.rope_forward(x, None, theta=0.0), "theta"),
        (lambda: kernel.rope_forward(x, np.arange(5)), "position_ids must have shape"),
        (lambda: kernel.rope_forward(x, np.array([0, 1, -2, 3])), "must be >= 0"),
        (lambda: kernel.rope_backward(np.zeros((2, 3, 4, 5)), cache), "dy must have shape"),
        (lambda: kernel.rope_backward(x.astype(np.float32), cache), "dy has dtype float32"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", [
    dict(n_kv_heads=2, rope_layout="half", rope_theta=500000.0),
    dict(n_kv_heads=4, rope_layout="interleaved", rotary_dim=2),
], ids=["gqa-half", "mha-interleaved-partial"])
def test_attention_module_with_the_kernel(options, dtype):
    """nn/attention.py's own calls (q and k split into heads-inner views, (B, T) positions)
    with this kernel (layer_impl="numba") in place of the functional pair ("numpy"): the
    same output and gradients."""
    from npformer.functional import rope as functional_rope
    from npformer.nn import attention as attention_module

    def run(layer_impl):
        rng = np.random.default_rng(21)
        mha = attention_module.MultiHeadAttention(16, 4, rope=True, rng=rng, dtype=dtype,
                                                  layer_impl=layer_impl, **options)
        expected = kernel if layer_impl == "numba" else functional_rope
        assert mha.rope_pair == (expected.rope_forward, expected.rope_backward)
        x = rng.standard_normal((2, 5, 16)).astype(dtype)
        positions = np.array([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
        y, cache = mha.forward(x, position_ids=positions)
        mha.zero_grad()
        dx = mha.backward(np.cos(y * 3.0), cache)
        return [y, dx] + [g.copy() for _, g in mha.named_gradients()]

    reference = run("numpy")
    fused = run("numba")
    for index, (actual, expected) in enumerate(zip(fused, reference)):
        assert_matches(actual, expected, f"output {index} (y, dx, then the gradients)")


# ---- the same kernel as plain Python (NUMBA_DISABLE_JIT=1) --------------------------------

JIT_FREE_SUBSET = ("test_matches_functional and float32 or test_other_ranks or test_in_place "
                   "or test_overflow")


def test_kernel_passes_as_plain_python_under_numba_disable_jit():
    """A subset of this file (every layout, head size, position kind and input layout in
    float32; other ranks; in place; overflow) in a child process with NUMBA_DISABLE_JIT=1,
    where the kernel runs as ordinary Python (prange = range)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 28,
                                     "npformer.kernels.rope:_rotate_kernel")
