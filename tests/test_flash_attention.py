"""Fused attention kernels (numba) and their NumPy twin against the attention reference:
every mask and softmax variant, both dtypes, both backward schedules, odd shapes (T and S
not multiples of the tile, T = 1, windows wider than T, single-token documents, fully padded
rows), tile classification, the cache's contents, registry checks and bad input.

Tolerances (DESIGN.md, kernel vs NumPy reference): max |kernel − reference| ≤ tol · max(max
|reference|, 1) with tol = 1e-12 in float64 and 1e-5 in float32, for o, dq, dk and dv: relative
to the largest entry, absolute on a tensor that is analytically zero (a window of 1 gives p ≡ 1
and dq = dk = 0, which the reference gets exactly and the kernel to ~1e-16).
Shapes are small so that the suite also runs under NUMBA_DISABLE_JIT=1.
"""

import numpy as np
import pytest

from helpers import assert_gradcheck_passes, assert_subset_passes_without_jit
from npformer.functional.attention import attention_backward, attention_forward
from npformer.functional.attention_mask import attention_mask
from npformer.gradcheck import run_checks
from npformer.kernels.flash_attention import (
    BLOCK_K,
    BLOCK_Q,
    FLASH_SOFTMAX_VARIANTS,
    FlashAttentionCache,
    _flash_backward,
    _flash_forward,
    _tile_kinds,
    flash_attention_backward,
    flash_attention_forward,
)
from npformer.kernels.flash_attention_reference import (
    flash_attention_reference_backward,
    flash_attention_reference_forward,
    prepare_flash_attention,
)

KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md
CHECKS = ["kernel_causal", "kernel_window", "kernel_document", "kernel_gqa", "kernel_cross",
          "kernel_softmax1", "kernel_softcap"]


def _qkv(rng, B, H, K, T, S, D, Dv, dtype=np.float64, spread=1.0):
    q = ((rng.standard_normal((B, H, T, D)) * 1.2 + 0.3) * spread).astype(dtype)
    k = (rng.standard_normal((B, K, S, D)) * 0.8 - 0.4).astype(dtype)
    v = (rng.standard_normal((B, K, S, Dv)) * 1.5 + 0.6).astype(dtype)
    return q, k, v


def assert_matches(actual, expected, dtype, what):
    """max |actual − expected| ≤ tol · max(max |expected|, 1), no NaN; returns the rel. error."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    tol = KERNEL_TOL[np.dtype(dtype)]
    assert err <= tol * max(scale, 1.0), (
        f"{what}: max abs err {err:.3e} > {tol:g} · max({scale:.3e}, 1)")
    return err / scale if scale else err


def reference(q, k, v, do, **kwargs):
    """attention_forward / attention_backward: (o, dq, dk, dv) in the inputs' dtype."""
    o, cache = attention_forward(q, k, v, **kwargs)
    return (o,) + attention_backward(do, cache)


def run_kernel(q, k, v, do, block_q, block_k, schedule="auto", **kwargs):
    q, k, v, options = prepare_flash_attention(q, k, v, **kwargs)
    o, cache = _flash_forward(q, k, v, options, block_q, block_k)
    return (o,) + _flash_backward(do, cache, block_q, block_k, schedule)


def run_twin(q, k, v, do, block_q, block_k, **kwargs):
    o, cache = flash_attention_reference_forward(q, k, v, block_q=block_q, block_k=block_k,
                                                 **kwargs)
    return (o,) + flash_attention_reference_backward(do, cache, block_q=block_k,
                                                     block_k=block_q)  # other tiles: allowed


def compare_all(dtype, B, H, K, T, S, D, Dv, kwargs, seed, block_q=4, block_k=3,
                schedules=("by_kv_head", "two_pass"), twin=True):
    """Kernel (each schedule) and twin against the reference, o and all three gradients."""
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D, Dv, dtype, spread=1.4)
    do = (rng.standard_normal((B, H, T, Dv)) * 1.1 - 0.2).astype(dtype)
    expected = reference(q, k, v, do, **kwargs)
    names = ("o", "dq", "dk", "dv")
    worst = 0.0
    for schedule in schedules:
        got = run_kernel(q, k, v, do, block_q, block_k, schedule, **kwargs)
        for name, a, b in zip(names, got, expected):
            worst = max(worst, assert_matches(a, b, dtype, f"kernel ({schedule}) {name}"))
    if twin:
        got = run_twin(q, k, v, do, block_q, block_k, **kwargs)
        for name, a, b in zip(names, got, expected):
            assert_matches(a, b, dtype, f"twin {name}")
    return expected, worst


DOCS = np.array([[2, 2, 9, 9, 9, 4, 4, 4, 4, 1, 1, 1, 7],  # a single-token document at the end
                 [1, 1, 1, 1, 3, 5, 5, 5, 5, 5, 5, 6, 6]])  # (B=2, S=13)
SHUFFLED_DOCS = np.array([[3, 1, 3, 3, 1, 2, 1, 3, 2, 2, 1, 3, 3],  # ids that interleave:
                          [0, 4, 4, 0, 0, 4, 9, 0, 4, 4, 0, 0, 9]])  # equality, not runs
PADDING = np.zeros((2, 13), dtype=bool)
PADDING[0, [3, 11, 12]] = True
PADDING[1, 0] = True
ALL_PADDED = PADDING.copy()
ALL_PADDED[1, :] = True  # batch row 1 attends to nothing: o = 0, dq = 0

MASK_CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(causal=True, window=3),
    "window_wider_than_T": dict(causal=True, window=40),
    "window_1": dict(causal=True, window=1),
    "documents": dict(doc_ids=DOCS),
    "documents_causal": dict(causal=True, doc_ids=DOCS),
    "packed_documents": dict(causal=True, doc_ids=np.sort(DOCS, axis=1)),
    "shuffled_documents": dict(causal=True, doc_ids=SHUFFLED_DOCS),
    "padding": dict(key_padding_mask=PADDING),
    "all_padded_row": dict(causal=True, key_padding_mask=ALL_PADDED),
    "everything": dict(causal=True, window=5, doc_ids=DOCS, key_padding_mask=PADDING),
}
VARIANTS = {
    "softmax": dict(),
    "softmax1": dict(softmax="softmax1"),
    "softcap": dict(softcap=1.3, scale=0.9),
    "softmax1_softcap": dict(softmax="softmax1", softcap=0.8),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask", MASK_CASES)
def test_every_mask_and_variant(mask, variant, dtype):
    # T = 13 = S (self-attention) and T = 9 < S (bottom-right: the last 9 positions);
    # 4 × 3 tiles: edge tiles of 1 query and 1 key; GQA with G = 3
    kwargs = {**MASK_CASES[mask], **VARIANTS[variant]}
    for T, seed in ((13, 1), (9, 2)):
        compare_all(dtype, 2, 6, 2, T, 13, 5, 3, kwargs, seed)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows_are_zero_not_nan(dtype):
    (o, dq, dk, dv), _ = compare_all(dtype, 2, 4, 2, 13, 13, 3, 3,
                                     dict(key_padding_mask=ALL_PADDED), seed=3)
    got = run_kernel(*_qkv(np.random.default_rng(3), 2, 4, 2, 13, 13, 3, 3, dtype, 1.4),
                     (np.random.default_rng(4).standard_normal((2, 4, 13, 3))).astype(dtype),
                     4, 3, key_padding_mask=ALL_PADDED)
    for name, x in zip(("o", "dq", "dk", "dv"), got):
        assert np.all(np.isfinite(x)), name
        np.testing.assert_array_equal(x[1], 0.0, err_msg=name)  # the fully padded batch row
    # and through the public API with its default tiles
    q, k, v = _qkv(np.random.default_rng(5), 2, 4, 2, 13, 13, 3, 3, dtype)
    o, cache = flash_attention_forward(q, k, v, key_padding_mask=ALL_PADDED)
    assert np.all(cache.lse[1] == -np.inf) and np.all(np.isfinite(cache.lse[0]))
    dq, dk, dv = flash_attention_backward(np.ones_like(o), cache)
    for x in (o[1], dq[1], dk[1], dv[1]):
        np.testing.assert_array_equal(x, 0.0)


# (B, H, K, T, S, D, Dv, kwargs, block_q, block_k): odd sizes against odd tiles
SHAPE_CASES = [
    (1, 1, 1, 1, 1, 1, 1, dict(), 4, 3),  # the smallest attention
    (2, 4, 2, 1, 17, 3, 5, dict(causal=True), 4, 3),  # one decoding step (T = 1)
    (1, 8, 1, 1, 20, 4, 4, dict(causal=True, window=6), 4, 4),  # decode, MQA, window
    (2, 3, 3, 7, 19, 2, 3, dict(), 5, 4),  # cross-attention S ≠ T, neither a tile multiple
    (1, 2, 2, 19, 7, 3, 2, dict(key_padding_mask=np.arange(7)[None] > 4), 4, 5),  # T > S
    (2, 6, 3, 11, 11, 9, 1, dict(causal=True, window=2), 3, 7),  # head sizes 9 and 1
    (1, 4, 1, 23, 23, 3, 3, dict(causal=True), 1, 1),  # 1 × 1 tiles
    (1, 4, 4, 23, 23, 3, 3, dict(causal=True), 64, 64),  # one tile covers everything
    (3, 2, 1, 10, 12, 4, 4, dict(causal=True, doc_ids=np.arange(36).reshape(3, 12) // 1),
     4, 3),  # every document a single token: each query sees only itself
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(SHAPE_CASES)))
def test_odd_shapes(case, dtype):
    B, H, K, T, S, D, Dv, kwargs, block_q, block_k = SHAPE_CASES[case]
    compare_all(dtype, B, H, K, T, S, D, Dv, kwargs, seed=20 + case, block_q=block_q,
                block_k=block_k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_shapes_with_default_tiles(dtype):
    # the public API (default tiles, automatic schedule) on shapes that cross a tile edge
    rng = np.random.default_rng(40)
    for trial in range(4):
        B, K = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        H = K * int(rng.integers(1, 4))
        S = int(rng.integers(BLOCK_K - 5, 2 * BLOCK_K + 7))
        T = int(rng.integers(1, S + 1))
        D, Dv = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        kwargs = [dict(causal=True), dict(causal=True, window=int(rng.integers(1, 2 * BLOCK_Q))),
                  dict(softmax="softmax1", causal=True), dict()][trial]
        q, k, v = _qkv(rng, B, H, K, T, S, D, Dv, dtype, spread=1.3)
        do = rng.standard_normal((B, H, T, Dv)).astype(dtype)
        expected = reference(q, k, v, do, **kwargs)
        o, cache = flash_attention_forward(q, k, v, **kwargs)
        got = (o,) + flash_attention_backward(do, cache)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
            assert_matches(a, b, dtype, f"trial {trial} {(B, H, K, T, S, D, Dv)} {name}")


def test_float32_is_accurate_against_float64():
    # float32 kernel against the float64 reference of the same inputs: its own error only
    rng = np.random.default_rng(41)
    q, k, v = _qkv(rng, 2, 4, 2, 70, 70, 16, 16, np.float32, spread=1.5)
    do = rng.standard_normal((2, 4, 70, 16)).astype(np.float32)
    kwargs = dict(causal=True, softcap=3.0)
    expected = reference(*(x.astype(np.float64) for x in (q, k, v, do)), **kwargs)
    o, cache = flash_attention_forward(q, k, v, **kwargs)
    got = (o,) + flash_attention_backward(do, cache)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_matches(a, b, np.float32, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exponent_field_add_equals_ldexp(dtype):
    # the compiled _times_power_of_two (integer add on the exponent bits) against np.ldexp,
    # bit for bit, over the range _exp_tile uses: e^r in [0.7, 1.5), n from floor to the top
    import numba

    from npformer.kernels.flash_attention import _times_power_of_two

    compiled = numba.njit(lambda x, n: _times_power_of_two(x, n))
    rng = np.random.default_rng(47)
    lowest, highest = (-125, 127) if dtype == np.float32 else (-1021, 1023)
    for x, n in zip(rng.uniform(0.7, 1.5, 400).astype(dtype),
                    rng.integers(lowest, highest + 1, 400).astype(dtype)):
        expected = np.ldexp(x, int(n))
        assert dtype(compiled(x, n)).tobytes() == expected.tobytes(), (x, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_tile_against_numpy_exp(dtype):
    # the vectorisable exp of the online softmax against a correctly rounded one: within 1
    # float32 / 2 float64 units of rounding (measured 0.56 and 1.0; without its last Taylor
    # term the float32 one is 1.6); −inf and arguments below the floor → 0. The reference is
    # np.exp in long double (x87 expl, ~1e-19 relative), not in float64: numpy's float64
    # exp is a different SIMD routine on AVX-512 and AVX2 CPUs, and its own last-bit error
    # would count against the kernel's 2 units on one CPU and not on the other.
    # z on a grid of 1/256 and the shifts on 1/8, so that x = (z − shift) − shift_low is
    # exact in both dtypes and only the exp itself is measured
    from npformer.kernels.flash_attention import _exp_constants, _exp_tile, _mantissa_bits

    rng = np.random.default_rng(48)
    z = (0.75 * rng.integers(-6400, 800, (37, 29)) / 64).astype(dtype)  # (keys, queries)
    z[0, :5] = [-np.inf, -1e30, 0.0, -115.875, 15.75]
    shift = (rng.integers(-8, 9, 29) / 8).astype(dtype)  # (queries,) the row max m
    shift_low = (rng.integers(0, 9, 29) / 8).astype(dtype)  # (queries,) log l
    p = np.empty_like(z)
    _exp_tile(z, shift, shift_low, p, _exp_constants(np.dtype(dtype)), _mantissa_bits(dtype))
    x = (z.astype(np.longdouble) - shift) - shift_low  # what the kernel exponentiates
    floor = -87.0 if dtype == np.float32 else -708.0
    with np.errstate(under="ignore"):
        expected = np.where(x > floor, np.exp(x), 0.0)
    assert p[0, 0] == 0.0 and p[0, 1] == 0.0 and np.all((p == 0) == (expected == 0))
    ulp = np.finfo(dtype).eps
    inside = expected > 0
    relative = np.abs(p[inside] - expected[inside]) / expected[inside]
    assert relative.max() <= (1 if dtype == np.float32 else 2) * ulp, relative.max()


def test_schedules_agree_and_auto_picks_both():
    from npformer.kernels.flash_attention import _use_one_pass
    assert _use_one_pass(1, 8, 2) and _use_one_pass(4, 4, 2) and _use_one_pass(5, 1, 2)
    assert not _use_one_pass(1, 1, 2) and not _use_one_pass(1, 3, 2)  # 3 items: 2 + 1
    rng = np.random.default_rng(42)
    q, k, v = _qkv(rng, 1, 6, 3, 15, 15, 4, 4)
    do = rng.standard_normal((1, 6, 15, 4))
    one = run_kernel(q, k, v, do, 4, 3, "by_kv_head", causal=True)
    two = run_kernel(q, k, v, do, 4, 3, "two_pass", causal=True)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_inputs_untouched_and_non_contiguous_inputs():
    rng = np.random.default_rng(43)
    q0, k0, v0 = _qkv(rng, 2, 4, 2, 9, 9, 3, 3)
    q = np.ascontiguousarray(q0.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # strided view
    k, v = k0[..., ::1], v0.copy()
    before = [x.copy() for x in (q, k, v)]
    do = rng.standard_normal((2, 4, 9, 3))
    expected = reference(q0, k0, v0, do, causal=True)
    o, cache = flash_attention_forward(q, k, v, causal=True)
    got = (o,) + flash_attention_backward(do, cache)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_matches(a, b, np.float64, name)
    for x, y in zip((q, k, v), before):
        np.testing.assert_array_equal(x, y)


def test_cache_holds_no_score_matrix():
    B, H, K, T, S, D, Dv = 2, 4, 2, 33, 37, 5, 3
    q, k, v = _qkv(np.random.default_rng(44), B, H, K, T, S, D, Dv)
    doc_ids = np.repeat(np.arange(2)[None], B, 0).repeat([20, 17], axis=1)
    o, cache = flash_attention_forward(q, k, v, causal=True, doc_ids=doc_ids)
    assert isinstance(cache, FlashAttentionCache)
    assert cache.lse.shape == (B, H, T) and cache.o.shape == (B, H, T, Dv)
    arrays = [x for x in cache if isinstance(x, np.ndarray)]
    arrays += [x for x in cache.options if isinstance(x, np.ndarray)]
    for x in arrays:  # q, k, v, o, lse, doc_ids: nothing with both a T and an S axis
        assert x.size <= max(q.size, k.size, v.size), x.shape
        assert not (T in x.shape and S in x.shape), x.shape


def _brute_force_kinds(B, T, S, block_q, block_k, **mask):
    allowed = attention_mask(B, T, S, **mask)[:, 0]  # (B, T, S)
    n_qb, n_kb = -(-T // block_q), -(-S // block_k)
    tiles = np.empty((B, n_qb, n_kb, 2), dtype=bool)  # (any allowed, all allowed)
    for qb in range(n_qb):
        for kb in range(n_kb):
            block = allowed[:, qb * block_q:(qb + 1) * block_q, kb * block_k:(kb + 1) * block_k]
            tiles[:, qb, kb] = np.stack([block.any(axis=(1, 2)), block.all(axis=(1, 2))], -1)
    return tiles


EXACT_SKIPPING = ("none", "causal", "window", "window_wider_than_T", "window_1",
                  "packed_documents", "padding")


@pytest.mark.parametrize("mask", MASK_CASES)
def test_tile_classification_is_exact_where_it_claims(mask):
    # _SKIP (0) only where nothing is allowed, _FULL (1) only where everything is; and no
    # tile without an allowed pair is left unskipped (for packed, increasing document ids)
    kwargs = MASK_CASES[mask]
    for T, block_q, block_k in ((13, 4, 3), (9, 2, 5), (13, 1, 1)):
        S = 13
        doc_ids = kwargs.get("doc_ids")
        pad = kwargs.get("key_padding_mask")
        kinds = _tile_kinds(2, T, S, block_q, block_k, kwargs.get("causal", False),
                            kwargs.get("window") or 0,
                            np.zeros((1, 1), np.int64) if doc_ids is None else doc_ids,
                            doc_ids is not None,
                            np.zeros((1, 1), bool) if pad is None else pad, pad is not None)
        truth = _brute_force_kinds(2, T, S, block_q, block_k, **kwargs)
        assert not np.any((kinds == 0) & truth[..., 0]), "a skipped tile has an allowed pair"
        assert not np.any((kinds == 1) & ~truth[..., 1]), "a 'full' tile has a masked pair"
        # exact skipping for each mask on its own (causal and window together: the band), with
        # ids that increase along each row (packed documents); other ids are compared by their
        # range per block, and masks combined with padding by their parts: correct, but they
        # may compute a tile that turns out empty
        if mask in EXACT_SKIPPING:
            assert np.array_equal(kinds == 0, ~truth[..., 0]), "a tile could have been skipped"
        if block_q == block_k == 1:
            assert np.array_equal(kinds == 1, truth[..., 1])


def test_window_work_grows_as_T_times_w():
    # the tiles a window-256 layer computes at T = 4096: about T·w / (tile area), not T²/2
    T, w = 4096, 256
    none = np.zeros((1, 1), np.int64), False, np.zeros((1, 1), bool), False
    window = _tile_kinds(1, T, T, BLOCK_Q, BLOCK_K, True, w, *none)
    causal = _tile_kinds(1, T, T, BLOCK_Q, BLOCK_K, True, 0, *none)
    computed_window = int(np.count_nonzero(window))
    computed_causal = int(np.count_nonzero(causal))
    band_tiles = (T // BLOCK_Q) * (w // BLOCK_K + 1)  # w / BLOCK_K full tiles + the diagonal
    assert computed_window <= band_tiles
    assert computed_causal >= 6 * computed_window  # 2080 tiles against 310 (64-wide tiles)


def test_documents_skip_tiles_across_documents():
    T = 512
    doc_ids = (np.arange(T) // 128)[None]  # four documents of 128 tokens
    kinds = _tile_kinds(1, T, T, 64, 64, True, 0, doc_ids, True, np.zeros((1, 1), bool), False)
    assert np.count_nonzero(kinds) == 4 * 3  # per document: 2 diagonal tiles + 1 below


@pytest.mark.parametrize("name", CHECKS)
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


def test_softmax_variants_listed():
    assert FLASH_SOFTMAX_VARIANTS == ("softmax", "softmax1", "sink")


# ---- bad input -------------------------------------------------------------------------------


def _good():
    return _qkv(np.random.default_rng(50), 2, 4, 2, 5, 7, 3, 3)


@pytest.mark.parametrize("forward", [flash_attention_forward, flash_attention_reference_forward])
def test_clipped_softmax_points_to_the_numpy_path(forward):
    q, k, v = _good()
    with pytest.raises(ValueError, match='attention_impl="numpy"'):
        forward(q, k, v, softmax="clipped")


BAD_CASES = [
    (lambda q, k, v: (q, k, v, dict(softmax="softmax2")), "softmax must be one of"),
    (lambda q, k, v: (q[:, :3], k, v, dict()), "divisible by n_kv_heads"),
    (lambda q, k, v: (q, k[..., :2], v, dict()), "head size D"),
    (lambda q, k, v: (q, k, v[:, :, :4], dict()), "kv heads and length"),
    (lambda q, k, v: (q[0], k, v, dict()), "must be 4-D"),
    (lambda q, k, v: (q.astype(np.float32), k, v, dict()), "dtype"),
    (lambda q, k, v: (q.astype(np.int64), k, v, dict()), "floating-point"),
    (lambda q, k, v: (q * np.nan, k, v, dict()), "NaN"),
    (lambda q, k, v: (q, k, v, dict(window=2)), "needs causal=True"),
    (lambda q, k, v: (q, k, v, dict(causal=True, window=0)), "window must be an integer >= 1"),
    (lambda q, k, v: (q, k, v, dict(causal=1)), "causal must be True or False"),
    (lambda q, k, v: (q, k[:, :, :4], v[:, :, :4], dict(causal=True)),
     "causal attention needs T <= S"),
    (lambda q, k, v: (q, k[:, :, :4], v[:, :, :4], dict(doc_ids=np.zeros((2, 4), int))),
     "doc_ids needs T <= S"),
    (lambda q, k, v: (q, k, v, dict(doc_ids=np.zeros((2, 6), int))), "doc_ids must have shape"),
    (lambda q, k, v: (q, k, v, dict(doc_ids=np.zeros((2, 7)))), "integer array"),
    (lambda q, k, v: (q, k, v, dict(key_padding_mask=np.zeros((2, 7), int))), "bool"),
    (lambda q, k, v: (q, k, v, dict(key_padding_mask=np.zeros((1, 7), bool))), "must have shape"),
    (lambda q, k, v: (q, k, v, dict(scale=0.0)), "scale must be a finite number > 0"),
    (lambda q, k, v: (q, k, v, dict(softcap=-1.0)), "softcap must be a finite number > 0"),
    (lambda q, k, v: (q, k, v, dict(clip_gamma=0.5)), "clip_gamma must be <= 0"),
]


@pytest.mark.parametrize("forward", [flash_attention_forward, flash_attention_reference_forward])
@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_bad_input(case, forward):
    make, message = BAD_CASES[case]
    q, k, v, kwargs = make(*_good())
    with pytest.raises(ValueError, match=message):
        forward(q, k, v, **kwargs)


def test_bad_gradient_and_cache():
    q, k, v = _good()
    o, cache = flash_attention_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match="do must have shape"):
        flash_attention_backward(o[:, :, :3], cache)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_backward(o.astype(np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        flash_attention_backward(o * np.nan, cache)
    _, reference_cache = attention_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match="FlashAttentionCache"):
        flash_attention_backward(o, reference_cache)


@pytest.mark.parametrize("forward", [flash_attention_forward, attention_forward,
                                     flash_attention_reference_forward],
                         ids=["numba", "numpy", "twin"])  # the twin returned zeros (issue 14)
@pytest.mark.parametrize("sign", [1, -1], ids=["inf", "nan"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_scores_that_overflow_are_refused_on_both_paths(forward, sign, softcap):
    # finite float32 q, k whose products overflow where the mask allows them: ±inf scores,
    # or NaN where +inf and −inf terms meet. Both paths raise the same error instead of
    # answering (the kernel used to return zeros), with or without soft-capping
    q = np.full((1, 2, 5, 4), 1e20, dtype=np.float32)
    k = np.full((1, 2, 5, 4), 1e20, dtype=np.float32)
    k[..., 1::2] *= sign
    v = np.ones((1, 2, 5, 4), dtype=np.float32)
    for causal in (True, False):  # a partial tile (checked with its mask) and a full one
        with pytest.raises(ValueError, match=r"overflow float32 \(±inf or NaN\) in 10 query"):
            forward(q, k, v, causal=causal, softcap=softcap)
    k[0, 1, 3] = -1e20  # −inf scores only where key 3 of head 1 meets queries 3 and 4
    k[0, 0] = 0.0
    k[0, 1, :3] = 0.0
    k[0, 1, 4] = 0.0
    where = r"in 2 query row\(s\) \(first: batch 0, head 1, query 3\)"
    with pytest.raises(ValueError, match=where):
        forward(q, k, v, causal=True, softcap=softcap)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_overflow_where_masked_is_not_an_error(softcap):
    # a score that the mask removes may overflow (query 0 and key 3 are huge, and causal
    # attention never pairs them); the kernel still equals the reference. The other scores
    # are moderate (the other queries and key 0 are zero): a well-conditioned comparison
    rng = np.random.default_rng(49)
    q = np.zeros((1, 1, 4, 4), dtype=np.float32)
    k, v = (rng.uniform(-1.0, 1.0, (1, 1, 4, 4)).astype(np.float32) for _ in range(2))
    q[0, 0, 0] = 1e20
    k[0, 0, 0] = 0.0
    k[0, 0, 3] = 1e20
    do = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    expected = reference(q, k, v, do, causal=True, softcap=softcap)
    o, cache = flash_attention_forward(q, k, v, causal=True, softcap=softcap)
    got = (o,) + flash_attention_backward(do, cache)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_matches(a, b, np.float32, name)


@pytest.mark.parametrize("D", [5, 80])  # scale = 1/√D inexact (a power of two hid it)
def test_huge_finite_scores_are_not_taken_for_masked_rows(D):
    # issue 14: exp(scale · q·k − m) as one fused multiply-add subtracted the rounded row max
    # m from the exact product; with scores near 1e30 the difference (half a unit of
    # rounding, ~1e14) is below the exp's floor, so every key got p = 0 and the row came out
    # as fully masked: o = 0, no error. Each query here sees one key far above the others
    rng = np.random.default_rng(60 + D)
    q = rng.uniform(0.5, 1.0, (1, 2, 9, D)) * 1e15
    k = rng.uniform(0.5, 1.0, (1, 2, 9, D)) * 1e15
    k[0, :, ::2] *= 0.5  # no ties
    v = rng.standard_normal((1, 2, 9, 3))
    do = rng.standard_normal((1, 2, 9, 3))
    for options in (dict(causal=True), dict(softmax="softmax1")):
        o, cache = flash_attention_forward(q, k, v, **options)
        o_twin, cache_twin = flash_attention_reference_forward(q, k, v, **options)
        assert np.all(np.isfinite(cache.lse)) and not np.any(np.all(o == 0, axis=-1))
        got = (o,) + flash_attention_backward(do, cache)
        expected = (o_twin,) + flash_attention_reference_backward(do, cache_twin)
        for name, a, b in zip(("o", "dv"), got[::3], expected[::3]):  # p is one-hot here:
            assert_matches(a, b, np.float64, name)  # o and dv are well-conditioned


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tied_huge_scores_share_their_probability_in_the_backward(dtype):
    # two keys with the same huge score (1e12) and every other key far below: p = ½, ½.
    # The backward recomputes p = exp(z − lse); as one number lse = m + log 2 rounds log 2
    # away at this size, which gave p = 1, 1 and doubled dv, dk and dq in the kernels and in
    # their twin (issue 14); the cache now keeps m and log l apart
    D = 3  # scale = 1/√3 inexact; with it the backward's scores must also be the forward's
    q = np.zeros((1, 1, 1, D), dtype=dtype)
    q[..., 0] = 1e6
    k = np.zeros((1, 1, 5, D), dtype=dtype)
    k[0, 0, :, 0] = [2e6, -1e6, 2e6, 0.5e6, 1.0]  # keys 0 and 2 tie
    v = np.arange(15, dtype=dtype).reshape(1, 1, 5, 3)
    do = np.ones((1, 1, 1, 3), dtype=dtype)
    p = np.array([0.5, 0.0, 0.5, 0.0, 0.0])
    for forward, backward in ((flash_attention_forward, flash_attention_backward),
                              (flash_attention_reference_forward,
                               flash_attention_reference_backward)):
        o, cache = forward(q, k, v)
        dq, dk, dv = backward(do, cache)
        assert_matches(o[0, 0], (p @ v[0, 0].astype(np.float64))[None], dtype, "o")
        assert_matches(dv[0, 0], p[:, None] * do[0, 0].astype(np.float64), dtype, "dv")


def test_blas_runs_one_thread_inside_the_kernels_and_is_restored():
    """Inside the kernel calls every loaded BLAS is limited to one thread (the kernels call it
    from prange threads); afterwards each library has its own setting back, also after an
    error inside the block."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from npformer.kernels.flash_attention import _one_blas_thread

    def blas_threads():
        return {info["filepath"]: info["num_threads"] for info in threadpool_info()
                if info["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and set(before.values()) == {2}
        with _one_blas_thread():
            assert set(blas_threads().values()) == {1}
        assert blas_threads() == before
        with pytest.raises(RuntimeError):
            with _one_blas_thread():
                raise RuntimeError("inside")
        assert blas_threads() == before


# ---- the same kernels as plain Python (NUMBA_DISABLE_JIT=1) -------------------------------

JIT_FREE_SUBSET = ("test_every_mask_and_variant and float32 or test_odd_shapes or "
                   "test_schedules_agree or test_fully_masked or test_registered_check_passes")


def test_kernels_pass_as_plain_python_under_numba_disable_jit():
    """A subset of this file (every mask × variant in float32, odd shapes, both schedules,
    fully masked rows, the seven registry checks) in a child process with
    NUMBA_DISABLE_JIT=1, where the kernels run as ordinary Python (numpy's dot for the tile
    products, ctypes for the accumulating gemm, prange = range)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 76,
                                     "npformer.kernels.flash_attention:_forward_kernel")
