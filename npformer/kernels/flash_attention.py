"""FlashAttention-style fused attention on the CPU: numba kernels, forward and backward.

    o, cache = flash_attention_forward(q, k, v, causal=..., window=..., doc_ids=..., ...)
    dq, dk, dv = flash_attention_backward(do, cache)     # (dq, dk, dv, dsinks) with sinks

Same arguments and results as :func:`npformer.functional.attention.attention_forward` /
``attention_backward`` (softmax, softmax₁ and the learned sink; clipped softmax, fixed or
length-aware → ValueError, use the NumPy path: its clip needs each row's final normaliser
before the values are summed), but memory linear in the sequence length: the cache holds q, k, v, o and the per-row
log-sum-exp as its two parts m and log l (B, H, T), never a T × S matrix. The algorithm
and its derivation are in the readable twin, :mod:`npformer.kernels.flash_attention_reference`;
this file is that algorithm arranged for speed, and tests/test_flash_attention.py holds the
two together.

How the time is spent, and what this file does about it
-------------------------------------------------------
- Tile products. Every (query block, key block) tile does two (forward) or five (backward)
  small matrix products. They go through ``np.dot`` on C-contiguous tiles inside ``@njit``,
  which numba lowers to SciPy's BLAS (``scipy.linalg.cython_blas``); issue 7 measured that
  about 3× faster than row-update loops and ~1.7× faster than a hand-written register-blocked
  product, so SciPy is a dependency of the kernels. A product with a transposed right
  operand (q kᵀ on row-major tiles) ran about 2× slower than the plain or transposed-left
  kinds on 64-wide tiles here, so every kernel works on key-major tiles zᵀ = k qᵀ (qᵀ
  copied once per query block; the backward transposes q and do once, before its kernels,
  :func:`_transpose_blocks`). The backward must compute its scores by the forward's very
  call: m and log l were made from those bits, and q kᵀ is the same sum in another order
  (issue 14: one unit of rounding of a huge score shifted exp(z − lse) by e⁻¹⁰⁰).
- Accumulating products. A product that is summed over tiles (the forward's a += p v, the
  backward's dv += pᵀ do, dk += dsᵀ q, dq += ds k) calls SciPy's ?gemm directly with
  beta = 1 (:func:`_gemm_accumulate`) instead of ``np.dot`` into a temporary plus an add:
  the backward became ~20% faster (T = 2048: 92 → 75 ms; T = 4096: 360 → 292 ms, medians of
  10 interleaved runs).
- Single-threaded BLAS. The kernels are already parallel (``numba.prange``); a multithreaded
  BLAS inside each of those threads oversubscribes the two cores (issue 7 measured 4.5×
  slower, and OpenBLAS floods stderr with "Detect OpenMP Loop" warnings). Every kernel call
  therefore runs under a threadpoolctl limit of one BLAS thread, restored afterwards
  (:func:`_one_blas_thread`).
- exp. numba has no vectorised exp here (no SVML: each ``math.exp`` is a scalar libm call,
  5–10× slower per element than a vector loop), and the online softmax evaluates one exp per
  score, twice (forward and backward). :func:`_exp_tile` is a vectorisable exp: Cody–Waite
  range reduction x = n ln2 + r with |r| ≤ ln2/2, a Taylor polynomial for e^r (degree 13 in
  float64, 7 in float32: truncation below each dtype's rounding), and 2ⁿ put into the
  exponent bits by an integer add on the polynomial's bits (a bitcast inside the loop,
  :func:`_times_power_of_two`; it replaced a second pass over an integer view of the tile:
  3–5% faster forward and backward, bitwise the same results). Arguments below
  ``floor`` (−708 in float64, −87 in float32, where e^x reaches the smallest normal number)
  give exactly 0, which is also how a masked score (−inf) gets probability 0. The scale is
  not folded into it: scale · q·k is rounded first (:func:`_finish_scores`), so that the
  row maximum gives exactly exp(0) whatever the size of the scores (a fused
  exp(scale · q·k − m) made large rows all zero, issue 14). LLVM vectorises the exp
  8 floats wide (256-bit, its preference on AVX-512 CPUs): ~0.37 ns per float32 here (a
  figure from before issue 14 found that the float32 exp was silently running in float64,
  its ``exp_scale`` typed float64; not re-measured since it runs in float32).
  Allowing 512-bit vectors (NUMBA_CPU_FEATURES = the host's features + ",-prefer-256-bit")
  gave 0.24–0.37 ns, and forward + backward ~5% faster before the bitcast above; but the
  setting is process-wide (every numba function of the program), so it is left to the user.
- Skipped tiles. :func:`_tile_kinds` classifies each (b, query block, key block) tile as
  skip (no query may see any key: beyond the causal diagonal, outside the window, across
  documents, all padding), full (every pair allowed: no per-element mask) or partial. A
  window of w keys costs ~T·w. Document ids are compared by their range per block, so tiles
  across packed documents (ids that increase along the row) are skipped; arbitrary ids are
  still exact, only skipped less.
- Parallelism without races. Forward: one work item per (b, query head, query block); items
  are interleaved first block/last block so that the static split of ``prange`` gives both
  threads the same causal work. Backward, two schedules:
    * by kv head (enough B·K items for the threads): an item owns one (b, kv head), loops over
      key blocks, the G query heads of the group and the query blocks; it is the only writer
      of dk, dv of its kv head and of dq of its G query heads — one pass, 5 products per tile;
    * two passes (few B·K items, e.g. one sequence with multi-query attention): pass 1 items
      are (b, kv head, key block) and write dk, dv; pass 2 items are (b, query head, query
      block) and write dq. Each output has one writer; the cost is recomputing p and dp once
      more (7 products per tile instead of 5).
- In context. OpenBLAS's worker threads keep spinning for 0.1–1 s after a multithreaded
  NumPy matmul; a kernel started right after one ran 1.5–2.4× slower here (not after a
  1-thread matmul, nor a second later). Limiting BLAS threads during the kernel does not stop
  workers that are already spinning; benchmarks/attention.py reports both figures.
- float32 inputs are computed in float32 (BLAS sgemm, float32 exp); results equal the
  float64 NumPy reference to ~1e-6 relative. float64 inputs are computed in float64.

``NUMBA_DISABLE_JIT=1`` runs the same code as Python (numpy's dot, ``prange`` = ``range``):
slow, same results.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot binds to this BLAS; load it first
from numba import njit, prange
from numba.core.extending import get_cython_function_address
from threadpoolctl import ThreadpoolController

from .._validate import check_grad
from ..functional.attention import scores_overflow_error
from ._exp import _exp_constants, _mantissa_bits, _times_power_of_two
from .flash_attention_reference import (
    FLASH_SOFTMAX_VARIANTS,
    FlashAttentionCache,
    FlashAttentionOptions,
    prepare_flash_attention,
    sink_gradient,
)

__all__ = ["flash_attention_forward", "flash_attention_backward", "FLASH_SOFTMAX_VARIANTS",
           "FlashAttentionCache", "FlashAttentionOptions"]

BLOCK_Q = 64  # queries per tile
BLOCK_K = 64  # keys per tile

_SKIP, _FULL, _PARTIAL = 0, 1, 2  # tile kinds: nothing allowed / everything / check each pair


# ---- the BLAS thread limit ---------------------------------------------------------------

_BLAS_LIBRARIES = None  # threadpoolctl's controllers of the loaded BLAS libraries


@contextlib.contextmanager
def _one_blas_thread():
    """Context manager: every loaded BLAS (numpy's and SciPy's OpenBLAS) runs one thread.

    Why: the kernels call BLAS from inside numba's prange threads; a multithreaded BLAS in
    each of them oversubscribes the cores (issue 7 measured 4.5× slower, plus "Detect OpenMP
    Loop" warnings). The libraries are listed once (that takes milliseconds); then limiting
    and restoring is a get and a set per library, a few microseconds — threadpoolctl's own
    ``limit()`` re-reads every library's info on each call (~20 µs, as much as a T = 1
    decode step's kernel).
    """
    global _BLAS_LIBRARIES
    if _BLAS_LIBRARIES is None:
        _BLAS_LIBRARIES = ThreadpoolController().select(user_api="blas").lib_controllers
    saved = [(library, library.get_num_threads()) for library in _BLAS_LIBRARIES]
    try:
        for library, threads in saved:
            if threads != 1:
                library.set_num_threads(1)
        yield
    finally:
        for library, threads in saved:
            if threads != 1:
                library.set_num_threads(threads)


# ---- accumulating matrix products: BLAS gemm with beta = 1 -------------------------------

_GEMM_TYPE = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))  # Fortran: every argument by pointer


@functools.lru_cache(maxsize=None)
def _blas_gemm(dtype):
    """SciPy's BLAS ?gemm (the library numba's np.dot uses), as a function pointer that the
    kernels receive as an argument: passed in rather than read from a global, it keeps the
    kernels cacheable (``cache=True``), and it also works as plain ctypes under
    ``NUMBA_DISABLE_JIT=1``."""
    name = "sgemm" if dtype == np.float32 else "dgemm"
    return _GEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", name))


# ---- tile helpers (called inside the parallel kernels) ---------------------------------


@njit(cache=True)
def _tile_kinds(B, T, S, block_q, block_k, causal, window, doc_ids, has_doc, key_pad, has_pad):
    """(B, nQ, nK) int8: _SKIP, _FULL or _PARTIAL for every (b, query block, key block).

    Query i sits at position i + S − T. Conservative in one direction only: _SKIP and _FULL
    are exact claims, anything unsure is _PARTIAL (checked element by element).
    """
    offset = S - T
    n_qb = (T + block_q - 1) // block_q
    n_kb = (S + block_k - 1) // block_k
    kinds = np.empty((B, n_qb, n_kb), dtype=np.int8)
    for b in range(B):
        for qb in range(n_qb):
            q_lo = qb * block_q + offset  # first and last query position of the block
            q_hi = min(T, (qb + 1) * block_q) - 1 + offset
            dq_lo = 0
            dq_hi = 0
            if has_doc:
                dq_lo = doc_ids[b, q_lo]
                dq_hi = doc_ids[b, q_lo]
                for pos in range(q_lo, q_hi + 1):
                    dq_lo = min(dq_lo, doc_ids[b, pos])
                    dq_hi = max(dq_hi, doc_ids[b, pos])
            for kb in range(n_kb):
                k_lo = kb * block_k
                k_hi = min(S, (kb + 1) * block_k) - 1
                none = False  # provably no allowed pair
                full = True  # provably every pair allowed
                if causal:
                    if k_lo > q_hi:
                        none = True
                    if k_hi > q_lo:
                        full = False
                if window > 0:
                    if k_hi <= q_lo - window:
                        none = True
                    if k_lo <= q_hi - window:
                        full = False
                if has_doc and not none:
                    dk_lo = doc_ids[b, k_lo]
                    dk_hi = doc_ids[b, k_lo]
                    for pos in range(k_lo, k_hi + 1):
                        dk_lo = min(dk_lo, doc_ids[b, pos])
                        dk_hi = max(dk_hi, doc_ids[b, pos])
                    if dk_hi < dq_lo or dk_lo > dq_hi:
                        none = True
                    if not (dq_lo == dq_hi and dk_lo == dk_hi and dq_lo == dk_lo):
                        full = False
                if has_pad and not none:
                    n_pad = 0
                    for pos in range(k_lo, k_hi + 1):
                        if key_pad[b, pos]:
                            n_pad += 1
                    if n_pad == k_hi - k_lo + 1:
                        none = True
                    if n_pad > 0:
                        full = False
                kinds[b, qb, kb] = _SKIP if none else (_FULL if full else _PARTIAL)
    return kinds


@njit(cache=True)
def _zigzag(r, n):
    """r-th block of n in the order 0, n−1, 1, n−2, …: equal causal work in each half."""
    return r // 2 if r % 2 == 0 else n - 1 - r // 2


@njit(cache=True)
def _rows(flat, first, n, width):
    """Rows first … first + n − 1 of a flat array read as (·, width), as an (n, width) view.

    The kernels take every tensor flat (one compiled signature for any shape); tiles of q,
    k, v, do and of the gradients, and the tile-sized scratch, are cut out of them this way.
    """
    return flat[first * width:(first + n) * width].reshape((n, width))


@njit(cache=True)
def _mask_tile(z, key_major, b, i0, j0, offset, causal, window, doc_ids, has_doc, key_pad,
               has_pad):
    """−inf where query i0 + i may not see key j0 + j (attention_mask's rules).

    z is (Tq, Sk), or (Sk, Tq) when key_major. Causal and window allow one run of keys per
    query, j0 + lo ≤ key < j0 + hi; only inside it are documents and padding looked up.
    """
    n_queries = z.shape[1] if key_major else z.shape[0]
    n_keys = z.shape[0] if key_major else z.shape[1]
    for i in range(n_queries):
        qpos = i0 + i + offset
        lo = 0
        hi = n_keys
        if causal:  # key ≤ qpos
            hi = max(0, min(n_keys, qpos - j0 + 1))
        if window > 0:  # key > qpos − window
            lo = min(n_keys, max(0, qpos - window + 1 - j0))
        hi = max(hi, lo)
        for j in range(n_keys):
            masked = j < lo or j >= hi
            if not masked and (has_doc or has_pad):
                kpos = j0 + j
                masked = ((has_doc and doc_ids[b, kpos] != doc_ids[b, qpos])
                          or (has_pad and key_pad[b, kpos]))
            if masked:
                if key_major:
                    z[j, i] = -np.inf
                else:
                    z[i, j] = -np.inf


@njit(cache=True)
def _flag_overflowed_queries(z, scale, kind, b, i0, j0, offset, causal, window, doc_ids,
                             has_doc, key_pad, has_pad, probe, overflow):
    """overflow[c] = True where query c of the key-major tile of products z (Sk, Tq) has a
    score scale · z[a, c] that is ±inf or NaN at a key the mask allows (finite q and k can
    overflow the dtype). probe (Tq,): scratch.

    Cheap first: probe[c] = Σ_a (scale · z[a, c]) · 0 is 0, or NaN if any term is ±inf or
    NaN (one multiply-add per score; without fast-math x · 0 is not folded to 0). Only a
    tile with a NaN probe is looked at entry by entry, with the mask.
    """
    zero = scale - scale
    for c in range(z.shape[1]):
        probe[c] = zero
    for a in range(z.shape[0]):
        for c in range(z.shape[1]):
            probe[c] += (scale * z[a, c]) * zero
    suspect = False
    for c in range(z.shape[1]):
        if probe[c] != probe[c]:
            suspect = True
    if not suspect:
        return
    allowed = np.ones_like(z)  # (Sk, Tq) 1 where allowed, −inf where masked
    if kind == _PARTIAL:
        _mask_tile(allowed, True, b, i0, j0, offset, causal, window, doc_ids, has_doc, key_pad,
                   has_pad)
    for a in range(z.shape[0]):
        for c in range(z.shape[1]):
            if allowed[a, c] == 1 and not abs(scale * z[a, c]) < np.inf:
                overflow[c] = True


@njit(cache=True)  # no fast-math: each scale · q·k is rounded on its own, never fused
def _finish_scores(z, slope, params, key_major, kind, b, i0, j0, offset, causal, window,
                   doc_ids, has_doc, key_pad, has_pad):
    """Turn a tile of products q·k into scores z, in place: what the exp then shifts.

    Without soft-capping z = scale · q·k; with it z = cap tanh(scale · q·k / cap) and slope
    = sech²(scale · q·k / cap). Then masked entries of a _PARTIAL tile become −inf.
    params = [scale, cap] in the tile dtype (cap = 0: no soft-capping).

    Why the scale is applied here, in a pass of its own, and not inside the exp as one fused
    multiply-add exp(scale · q·k − m): the row maximum m is a rounded score, while the
    fused form subtracts it from the exact product. Their difference is up to half a unit
    of rounding of the score — 0 for a power-of-two scale, but with scale = 1/√D for D = 3,
    5, 80, … and |score| near 1e30 (float64) or 3e9 (float32) it is below the exp's floor,
    so every key of the row got probability 0 and the row was taken for fully masked
    (issue 14: zeros, no error). Rounded first, the top score gives exactly exp(0) = 1, and
    every exp argument is the NumPy reference's z − m.
    """
    scale = params[0]
    cap = params[1]
    if cap > 0:
        for a in range(z.shape[0]):
            for c in range(z.shape[1]):
                u = scale * z[a, c] / cap  # s / cap
                e = math.exp(-2.0 * abs(u))  # exp(−2|u|) ∈ (0, 1]
                slope[a, c] = 4.0 * e / ((1.0 + e) * (1.0 + e))  # sech²(u), no cancellation
                z[a, c] = cap * math.tanh(u)  # c = cap tanh(s / cap)
    else:
        for a in range(z.shape[0]):
            for c in range(z.shape[1]):
                z[a, c] = scale * z[a, c]  # s = scale · q·k
    if kind == _PARTIAL:
        _mask_tile(z, key_major, b, i0, j0, offset, causal, window, doc_ids, has_doc, key_pad,
                   has_pad)


@njit(cache=True)
def _column_max(z, out):
    """out[c] = max_a z[a, c] for z (A, C): vectorised along the contiguous axis."""
    for c in range(z.shape[1]):
        out[c] = z[0, c]
    for a in range(1, z.shape[0]):
        for c in range(z.shape[1]):
            out[c] = max(out[c], z[a, c])


@njit(cache=True)
def _column_sum(p, out):
    """out[c] = Σ_a p[a, c] for p (A, C)."""
    for c in range(p.shape[1]):
        out[c] = 0.0
    for a in range(p.shape[0]):
        for c in range(p.shape[1]):
            out[c] += p[a, c]


@njit(cache=True, fastmath={"contract"})  # fused multiply-adds only; no reassociation
def _exp_tile(z, shift, shift_low, p, consts, mantissa_bits):
    """p[a, c] = exp((z[a, c] − shift[c]) − shift_low[c]); 0 below ``floor``.

    z, p (A, C) key-major tiles, c the query: shift is the row max m, shift_low 0 in the
    forward and log l in the backward (subtracted one after the other: m + log l rounds
    log l away when |m| is huge).
    exp(x) = 2ⁿ e^r with n = round(x / ln 2), r = x − n ln 2 ∈ [−ln2/2, ln2/2]:
    e^r by its Taylor polynomial (Horner), 2ⁿ by adding n to the exponent field
    (:func:`_times_power_of_two`; e^r ∈ [0.7, 1.5] and x > floor keep both normal). The
    polynomial's degree fits the precision: the first omitted term, (ln2/2)^(d+1) / (d+1)!,
    is 5e-9 for d = 7 (float32, whose rounding is 6e-8) and 4e-18 for d = 13 (float64).
    """
    log2e = consts[0]
    ln2_hi = consts[1]
    ln2_lo = consts[2]
    floor = consts[3]
    half = consts[4]
    c0, c1, c2, c3, c4 = consts[5], consts[6], consts[7], consts[8], consts[9]
    c5, c6, c7, c8, c9 = consts[10], consts[11], consts[12], consts[13], consts[14]
    c10, c11, c12, c13 = consts[15], consts[16], consts[17], consts[18]
    zero = half - half
    if mantissa_bits == 23:  # float32: degree 7
        for a in range(z.shape[0]):
            for c in range(z.shape[1]):
                x = (z[a, c] - shift[c]) - shift_low[c]
                inside = x > floor  # False for −inf (masked) and for negligible values
                x = x if inside else floor
                n = np.floor(x * log2e + half)
                r = (x - n * ln2_hi) - n * ln2_lo
                poly = (((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r
                        + c0)
                p[a, c] = _times_power_of_two(poly, n) if inside else zero
    else:  # float64: degree 13
        for a in range(z.shape[0]):
            for c in range(z.shape[1]):
                x = (z[a, c] - shift[c]) - shift_low[c]
                inside = x > floor
                x = x if inside else floor
                n = np.floor(x * log2e + half)
                r = (x - n * ln2_hi) - n * ln2_lo
                poly = (((((((((((((c13 * r + c12) * r + c11) * r + c10) * r + c9) * r + c8) * r
                            + c7) * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r
                        + c0)
                p[a, c] = _times_power_of_two(poly, n) if inside else zero


@njit(cache=True)
def _ds_tile(p, dp, delta_rows, delta_cols, slope, params):
    """dp ← scale · p ⊙ (dp − δ) [⊙ slope]: the score gradient, times scale, in place.

    forward p = softmax(z): dz = p ⊙ (dp − δ), δ = rowsum(do ⊙ o) per query (delta_rows[a]
    + delta_cols[c], one of them zeros); forward c = cap tanh(s / cap): ds = dz ⊙ slope;
    forward s = scale q·k: scale goes with ds into dq and dk.
    """
    scale = params[0]
    if params[1] > 0:
        for a in range(p.shape[0]):
            for c in range(p.shape[1]):
                dp[a, c] = scale * (p[a, c] * (dp[a, c] - (delta_rows[a] + delta_cols[c]))
                                    ) * slope[a, c]
    else:
        for a in range(p.shape[0]):
            d = delta_rows[a]
            for c in range(p.shape[1]):
                dp[a, c] = scale * (p[a, c] * (dp[a, c] - (d + delta_cols[c])))


@njit(cache=True)
def _transpose_into(tile, out):
    """out (C, A) = tileᵀ for tile (A, C)."""
    for a in range(tile.shape[0]):
        for c in range(tile.shape[1]):
            out[c, a] = tile[a, c]


@njit(cache=True)
def _block_t(blocks_t, first, n, width):
    """The tile (width, n) = (rows first … first + n − 1 of a (·, width) array)ᵀ, as a view
    into the output of :func:`_transpose_blocks`."""
    return blocks_t[first * width:(first + n) * width].reshape((width, n))


@njit(cache=True, parallel=True)
def _transpose_blocks(x, n_sequences, T, width, block_q, out):
    """out: every query block of x (n_sequences·T rows of width) transposed in place of its
    rows, so that _block_t reads it as a C-contiguous (width, rows) tile. The backward
    reads qᵀ and doᵀ of each query block once per key block; transposed once here, they
    are not copied again per tile (that copy cost the backward ~15%)."""
    n_qb = (T + block_q - 1) // block_q
    for item in prange(n_sequences * n_qb):
        first = (item // n_qb) * T + (item % n_qb) * block_q
        rows = min(block_q, T - (item % n_qb) * block_q)
        _transpose_into(_rows(x, first, rows, width), _block_t(out, first, rows, width))


@njit(cache=True)
def _gemm_accumulate(gemm, a, a_transposed, b, b_transposed, c):
    """c += op(a) op(b), with op(x) = xᵀ when flagged; 2-D arrays with unit inner stride.

    ``np.dot`` can only overwrite its output, so accumulating a tile's product (dv += pᵀ do,
    dk += dsᵀ q, dq += ds k, and the forward's a += p v) took a product into a temporary
    plus an add pass; ?gemm with beta = 1 adds in place and skips both (OpenBLAS does no
    pass over c for beta = 1). BLAS is column-major, where a row-major (r, c) array reads as
    its transpose, so the call computes cᵀ += op(b)ᵀ op(a)ᵀ.
    """
    M = a.shape[1] if a_transposed else a.shape[0]
    K = a.shape[0] if a_transposed else a.shape[1]
    N = b.shape[0] if b_transposed else b.shape[1]
    flags = np.empty(2, dtype=np.uint8)
    flags[0] = 84 if b_transposed else 78  # 'T' or 'N'
    flags[1] = 84 if a_transposed else 78
    ints = np.empty(6, dtype=np.int32)  # N, M, K, ldb, lda, ldc
    ints[0] = N
    ints[1] = M
    ints[2] = K
    ints[3] = b.strides[0] // b.itemsize
    ints[4] = a.strides[0] // a.itemsize
    ints[5] = c.strides[0] // c.itemsize
    alpha_beta = np.ones(2, dtype=c.dtype)
    gemm(flags[0:].ctypes, flags[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
         alpha_beta[0:].ctypes, b.ctypes, ints[3:].ctypes, a.ctypes, ints[4:].ctypes,
         alpha_beta[1:].ctypes, c.ctypes, ints[5:].ctypes)


# ---- forward -----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _forward_kernel(q, k, v, dims, params, initial_logits, causal, window, doc_ids, has_doc,
                    key_pad, has_pad, kinds, block_q, block_k, consts,
                    mantissa_bits, gemm, check_overflow, o, row_max, log_sum):
    """The online-softmax forward. q, k, v, o, row_max, log_sum: flat C-ordered views of
    (B, H, T, D), (B, K, S, D), (B, K, S, Dv), (B, H, T, Dv), (B, H, T), (B, H, T); dims =
    (B, H, K, T, S, D, Dv). One work item per (b, query head, query block).
    initial_logits (H,): the score of the extra key each row of head h has already seen,
    −inf for plain softmax (m = −inf, l = 0), 0 for softmax₁, s_h for a learned sink
    (m = s_h, l = 1): one compiled signature for the three.

    Tiles are key-major, zᵀ = k qᵀ (Sk, Tq): with qᵀ transposed once per item both products
    (k qᵀ and pᵀᵀ v) are plain or transposed-left BLAS calls, the fast kinds (a transposed
    right operand, q kᵀ, measured about 2× slower on 64-wide tiles).
    """
    B, H, n_kv, T, S, D, Dv = dims
    G = H // n_kv
    offset = S - T
    n_qb = (T + block_q - 1) // block_q
    n_kb = (S + block_k - 1) // block_k
    dtype = q.dtype
    for item in prange(B * H * n_qb):
        bh = item // n_qb
        qb = _zigzag(item % n_qb, n_qb)
        b = bh // H
        h = bh % H
        kv = h // G
        i0 = qb * block_q
        rows = min(block_q, T - i0)
        q_t = np.empty((D, rows), dtype=dtype)  # (D, Tq) qᵀ
        _transpose_into(_rows(q, bh * T + i0, rows, D), q_t)
        z_flat = np.empty(block_k * rows, dtype=dtype)
        p_flat = np.empty(block_k * rows, dtype=dtype)
        slope_flat = np.empty(block_k * rows, dtype=dtype)
        no_shift = np.zeros(rows, dtype=dtype)
        acc = np.zeros((rows, Dv), dtype=dtype)  # (Tq, Dv) Σ exp(z − m) v
        m = np.empty(rows, dtype=dtype)  # (Tq,) running max
        l = np.empty(rows, dtype=dtype)  # (Tq,) running Σ exp(z − m)
        tile_max = np.empty(rows, dtype=dtype)
        shift = np.empty(rows, dtype=dtype)
        tile_sum = np.empty(rows, dtype=dtype)
        overflow = np.zeros(rows, dtype=np.bool_)  # (Tq,) a score was ±inf or NaN
        probe = np.empty(rows, dtype=dtype)  # (Tq,) scratch of _flag_overflowed_queries
        initial = initial_logits[h]  # −inf, or the extra key's score (value 0), already seen
        for i in range(rows):
            m[i] = initial
            l[i] = 1.0 if initial > -np.inf else 0.0
        for kb in range(n_kb):
            kind = kinds[b, qb, kb]
            if kind == _SKIP:
                continue
            j0 = kb * block_k
            cols = min(block_k, S - j0)
            k_tile = _rows(k, (b * n_kv + kv) * S + j0, cols, D)  # (Sk, D)
            v_tile = _rows(v, (b * n_kv + kv) * S + j0, cols, Dv)  # (Sk, Dv)
            z_t = _rows(z_flat, 0, cols, rows)  # (Sk, Tq)
            p_t = _rows(p_flat, 0, cols, rows)  # (Sk, Tq)
            slope_t = _rows(slope_flat, 0, cols, rows)
            np.dot(k_tile, q_t, z_t)  # (Sk, Tq) zᵀ = k qᵀ
            if check_overflow:  # only when the inputs are large enough (_scores_may_overflow)
                _flag_overflowed_queries(z_t, params[0], kind, b, i0, j0, offset, causal,
                                         window, doc_ids, has_doc, key_pad, has_pad, probe,
                                         overflow)
            _finish_scores(z_t, slope_t, params, True, kind, b, i0, j0, offset, causal,
                           window, doc_ids, has_doc, key_pad, has_pad)
            _column_max(z_t, tile_max)  # (Tq,) max over this tile's keys
            for i in range(rows):
                tile_max[i] = max(m[i], tile_max[i])  # m' = max(m, max z')
                shift[i] = tile_max[i] if tile_max[i] > -np.inf else 0.0  # no −inf − (−inf)
            _exp_tile(z_t, shift, no_shift, p_t, consts, mantissa_bits)  # exp(z − m')
            _column_sum(p_t, tile_sum)  # (Tq,) Σ exp(z' − m')
            for i in range(rows):
                if tile_max[i] > m[i]:  # the max grew (else exp(m − m') = 1: nothing to do)
                    rescale = math.exp(m[i] - shift[i])  # exp(m − m'): 0 while m = −inf
                    l[i] *= rescale  # l ← exp(m − m') l …
                    for e in range(Dv):
                        acc[i, e] *= rescale  # a ← exp(m − m') a …
                l[i] += tile_sum[i]  # … + Σ exp(z' − m')
                m[i] = tile_max[i]
            _gemm_accumulate(gemm, p_t, True, v_tile, False, acc)  # … + p' v'   (Tq, Dv)
        o_rows = _rows(o, bh * T + i0, rows, Dv)  # (Tq, Dv)
        for i in range(rows):
            if l[i] > 0:
                inverse = 1.0 / l[i]
                for e in range(Dv):
                    o_rows[i, e] = acc[i, e] * inverse  # o = a / l
                row_max[bh * T + i0 + i] = m[i]  # lse = m + log l, kept in two parts
                log_sum[bh * T + i0 + i] = math.log(l[i])
            else:  # every key masked: o = 0 (already zero), p = 0 in the backward
                row_max[bh * T + i0 + i] = -np.inf
                log_sum[bh * T + i0 + i] = -np.inf
            if overflow[i]:  # NaN: the caller raises, as the NumPy path does
                row_max[bh * T + i0 + i] = np.nan


# ---- backward ----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _delta_kernel(do, o, n_rows, Dv, delta):
    """delta[r] = Σ_e do[r, e] o[r, e] for the flat (B·H·T, Dv) rows: δ = rowsum(do ⊙ o)."""
    for r in prange(n_rows):
        total = 0.0
        for e in range(Dv):
            total += do[r * Dv + e] * o[r * Dv + e]
        delta[r] = total


@njit(cache=True)
def _row_shifts(row_max, log_sum, start, rows, shift, shift_low):
    """shift[i], shift_low[i] = m, log l of row start + i: p = exp((z − m) − log l); a fully
    masked row (m = −inf) gets +inf and 0, so that p = exp(−inf − inf) = 0, not NaN."""
    for i in range(rows):
        m = row_max[start + i]
        masked = not m > -np.inf
        shift[i] = np.inf if masked else m
        shift_low[i] = 0.0 if masked else log_sum[start + i]


@njit(cache=True)
def _key_block_gradients(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta, dims,
                         params, causal, window, doc_ids, has_doc, key_pad, has_pad, kinds, block_q,
                         block_k, consts, mantissa_bits, gemm, b, kv, kb, dk, dv, dq, with_dq):
    """dk, dv of key block kb of kv head kv in batch row b: the sum over the G query heads
    of the group and over every query block, added into dk, dv (zeroed by the caller, the
    only writer of those rows). With with_dq, each tile's dq is also added to dq (the caller
    guarantees no other thread writes those rows).

    Key-major tiles zᵀ = k qᵀ (Sk, Tq), computed by the very call the forward makes (same
    operands, same shapes), so that the scores are bitwise the forward's: p = exp(z − lse)
    must use the z that lse was made from. q kᵀ is the same sum in another order in BLAS,
    and with scores near 1e9 (float32) one unit of their rounding is ~100: exp(z − lse) of
    the row's top key came out ~e⁻¹⁰⁰ instead of 1 and dv was 0 (issue 14). qᵀ and doᵀ
    come transposed per query block (q_blocks_t, do_blocks_t: _transpose_blocks). Flat
    arrays as in _forward_kernel.
    """
    B, H, n_kv, T, S, D, Dv = dims
    G = H // n_kv
    n_qb = (T + block_q - 1) // block_q
    offset = S - T
    dtype = q.dtype
    j0 = kb * block_k
    cols = min(block_k, S - j0)
    first_key = (b * n_kv + kv) * S + j0
    k_tile = _rows(k, first_key, cols, D)  # (Sk, D)
    v_tile = _rows(v, first_key, cols, Dv)  # (Sk, Dv)
    dk_rows = _rows(dk, first_key, cols, D)  # (Sk, D) Σ over heads and query blocks
    dv_rows = _rows(dv, first_key, cols, Dv)  # (Sk, Dv)
    size = cols * block_q
    z_flat = np.empty(size, dtype=dtype)
    p_flat = np.empty(size, dtype=dtype)
    ds_flat = np.empty(size, dtype=dtype)
    slope_flat = np.empty(size, dtype=dtype)
    no_shift = np.zeros(cols, dtype=dtype)
    max_cols = np.empty(block_q, dtype=dtype)
    log_sum_cols = np.empty(block_q, dtype=dtype)
    for g in range(G):
        bh = b * H + kv * G + g  # query head kv·G + g reads this kv head
        for qb in range(n_qb):
            kind = kinds[b, qb, kb]
            if kind == _SKIP:
                continue
            i0 = qb * block_q
            rows = min(block_q, T - i0)
            q_tile = _rows(q, bh * T + i0, rows, D)  # (Tq, D)
            do_tile = _rows(do, bh * T + i0, rows, Dv)  # (Tq, Dv)
            q_t = _block_t(q_blocks_t, bh * T + i0, rows, D)  # (D, Tq) qᵀ
            do_t = _block_t(do_blocks_t, bh * T + i0, rows, Dv)  # (Dv, Tq) doᵀ
            max_q = max_cols[:rows]
            log_sum_q = log_sum_cols[:rows]
            _row_shifts(row_max, log_sum, bh * T + i0, rows, max_q, log_sum_q)
            z_t = _rows(z_flat, 0, cols, rows)  # (Sk, Tq)
            p_t = _rows(p_flat, 0, cols, rows)
            ds_t = _rows(ds_flat, 0, cols, rows)
            slope_t = _rows(slope_flat, 0, cols, rows)
            np.dot(k_tile, q_t, z_t)  # (Sk, Tq) zᵀ = k qᵀ, as in the forward
            _finish_scores(z_t, slope_t, params, True, kind, b, i0, j0, offset, causal,
                           window, doc_ids, has_doc, key_pad, has_pad)
            # pᵀ = exp((zᵀ − m) − log l): the probabilities, recomputed
            _exp_tile(z_t, max_q, log_sum_q, p_t, consts, mantissa_bits)
            np.dot(v_tile, do_t, ds_t)  # forward o = p v, so dpᵀ = v doᵀ   (Sk, Tq)
            _ds_tile(p_t, ds_t, no_shift, delta[bh * T + i0:bh * T + i0 + rows], slope_t,
                     params)  # scale dsᵀ
            _gemm_accumulate(gemm, p_t, False, do_tile, False, dv_rows)  # forward o = p v,
            # so dv += pᵀ do   (Sk, Dv); forward s = scale q kᵀ: dk += scale dsᵀ q   (Sk, D)
            _gemm_accumulate(gemm, ds_t, False, q_tile, False, dk_rows)
            if with_dq:  # and dq += scale ds k   (Tq, D), straight into this item's rows
                _gemm_accumulate(gemm, ds_t, True, k_tile, False, _rows(dq, bh * T + i0, rows, D))


@njit(cache=True, parallel=True)
def _backward_by_kv_head(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta, dims,
                         params, causal, window, doc_ids, has_doc, key_pad, has_pad, kinds, block_q,
                         block_k, consts, mantissa_bits, gemm, dq, dk, dv):
    """One pass; one work item per (b, kv head): the only writer of dk, dv of that kv head
    and of dq of its G query heads. dq must be zeroed."""
    B, H, n_kv, T, S, D, Dv = dims
    n_kb = (S + block_k - 1) // block_k
    for item in prange(B * n_kv):
        b = item // n_kv
        kv = item % n_kv
        for kb in range(n_kb):
            _key_block_gradients(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta,
                                 dims, params, causal, window, doc_ids, has_doc, key_pad, has_pad,
                                 kinds, block_q, block_k, consts, mantissa_bits, gemm, b, kv, kb,
                                 dk, dv, dq, True)


@njit(cache=True, parallel=True)
def _backward_dk_dv(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta, dims, params,
                    causal, window, doc_ids, has_doc, key_pad, has_pad, kinds, block_q, block_k,
                    consts, mantissa_bits, gemm, dk, dv):
    """Two-pass backward, pass 1: one item per (b, kv head, key block) writes its dk, dv
    (zeroed)."""
    B, H, n_kv, T, S, D, Dv = dims
    n_kb = (S + block_k - 1) // block_k
    for item in prange(B * n_kv * n_kb):
        b_kv = item // n_kb
        kb = _zigzag(item % n_kb, n_kb)
        _key_block_gradients(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta, dims,
                             params, causal, window, doc_ids, has_doc, key_pad, has_pad, kinds,
                             block_q, block_k, consts, mantissa_bits, gemm, b_kv // n_kv, b_kv %
                             n_kv, kb, dk, dv, dk, False)


@njit(cache=True, parallel=True)
def _backward_dq(q, k, v, do, q_blocks_t, do_blocks_t, row_max, log_sum, delta, dims, params,
                 causal, window, doc_ids, has_doc, key_pad, has_pad, kinds, block_q, block_k,
                 consts, mantissa_bits, gemm, dq):
    """Two-pass backward, pass 2: one item per (b, query head, query block) writes its dq
    (zeroed).

    Key-major tiles zᵀ = k qᵀ (Sk, Tq) as in the forward (qᵀ, doᵀ: _transpose_blocks).
    """
    B, H, n_kv, T, S, D, Dv = dims
    G = H // n_kv
    offset = S - T
    n_qb = (T + block_q - 1) // block_q
    n_kb = (S + block_k - 1) // block_k
    dtype = q.dtype
    for item in prange(B * H * n_qb):
        bh = item // n_qb
        qb = _zigzag(item % n_qb, n_qb)
        b = bh // H
        kv = (bh % H) // G
        i0 = qb * block_q
        rows = min(block_q, T - i0)
        q_t = _block_t(q_blocks_t, bh * T + i0, rows, D)  # (D, Tq) qᵀ
        do_t = _block_t(do_blocks_t, bh * T + i0, rows, Dv)  # (Dv, Tq) doᵀ
        size = block_k * rows
        z_flat = np.empty(size, dtype=dtype)
        p_flat = np.empty(size, dtype=dtype)
        ds_flat = np.empty(size, dtype=dtype)
        slope_flat = np.empty(size, dtype=dtype)
        dq_rows = _rows(dq, bh * T + i0, rows, D)  # (Tq, D) Σ over key blocks
        no_shift = np.zeros(block_k, dtype=dtype)
        max_cols = np.empty(rows, dtype=dtype)
        log_sum_cols = np.empty(rows, dtype=dtype)
        _row_shifts(row_max, log_sum, bh * T + i0, rows, max_cols, log_sum_cols)
        delta_cols = delta[bh * T + i0:bh * T + i0 + rows]
        for kb in range(n_kb):
            kind = kinds[b, qb, kb]
            if kind == _SKIP:
                continue
            j0 = kb * block_k
            cols = min(block_k, S - j0)
            k_tile = _rows(k, (b * n_kv + kv) * S + j0, cols, D)  # (Sk, D)
            v_tile = _rows(v, (b * n_kv + kv) * S + j0, cols, Dv)  # (Sk, Dv)
            z_t = _rows(z_flat, 0, cols, rows)  # (Sk, Tq)
            p_t = _rows(p_flat, 0, cols, rows)
            ds_t = _rows(ds_flat, 0, cols, rows)
            slope_t = _rows(slope_flat, 0, cols, rows)
            np.dot(k_tile, q_t, z_t)  # (Sk, Tq) zᵀ = k qᵀ
            _finish_scores(z_t, slope_t, params, True, kind, b, i0, j0, offset, causal,
                           window, doc_ids, has_doc, key_pad, has_pad)
            _exp_tile(z_t, max_cols, log_sum_cols, p_t, consts,
                      mantissa_bits)  # pᵀ = exp((zᵀ − m) − log l)
            np.dot(v_tile, do_t, ds_t)  # dpᵀ = v doᵀ   (Sk, Tq)
            _ds_tile(p_t, ds_t, no_shift, delta_cols, slope_t, params)  # scale dsᵀ
            _gemm_accumulate(gemm, ds_t, True, k_tile, False, dq_rows)  # dq += scale ds k


# ---- the public pair ----------------------------------------------------------------------


def _mask_arrays(options: FlashAttentionOptions, B: int):
    """doc_ids (B, S) int64 and key padding (B, S) bool for the kernels; (1, 1) dummies when
    absent (one compiled signature for every mask combination)."""
    doc_ids = (np.zeros((1, 1), dtype=np.int64) if options.doc_ids is None
               else np.ascontiguousarray(options.doc_ids, dtype=np.int64))
    key_pad = (np.zeros((1, 1), dtype=np.bool_) if options.key_padding_mask is None
               else np.ascontiguousarray(options.key_padding_mask, dtype=np.bool_))
    return (doc_ids, options.doc_ids is not None, key_pad,
            options.key_padding_mask is not None)


def _kernel_arguments(q, k, v, options, block_q, block_k):
    """The arguments every kernel shares: dims, params, mask description and exp constants."""
    B, H, T, D = q.shape
    n_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = q.dtype
    dims = (B, H, n_kv, T, S, D, Dv)
    params = np.array([options.scale, options.softcap or 0.0], dtype=dtype)  # [scale, cap]
    window = 0 if options.window is None else options.window
    doc_ids, has_doc, key_pad, has_pad = _mask_arrays(options, B)
    kinds = _tile_kinds(B, T, S, block_q, block_k, options.causal, window, doc_ids, has_doc,
                        key_pad, has_pad)
    mask = (options.causal, window, doc_ids, has_doc, key_pad, has_pad, kinds)
    dtype_args = (_exp_constants(dtype), _mantissa_bits(dtype),
                  _blas_gemm(dtype))
    return dims, params, mask, dtype_args


def _scores_may_overflow(q, k, scale: float) -> bool:
    """False when no score can overflow the dtype, so the forward may skip its check.

    Each score scale · Σ_d q_d k_d, and each partial sum of it, is at most scale · D ·
    max|q| · max|k| in size (plus rounding, for which a factor 2 is spared). For ordinary
    inputs this bound is far below the largest float, and costs two passes over q and k.
    """
    biggest = [max(float(x.max()), -float(x.min())) for x in (q, k)]
    bound = scale * q.shape[-1] * biggest[0] * biggest[1]  # in float64
    return not bound < float(np.finfo(q.dtype).max) / 2


def _raise_for_marked_rows(row_max):
    """ValueError if the forward marked a query row (m = NaN) with an allowed score scale ·
    q·k that is ±inf or NaN: finite q and k whose products overflow the dtype. The NumPy
    path refuses the same rows with the same error. The backward recomputes the same
    scores, so it needs no check of its own."""
    bad = np.isnan(row_max)  # (B, H, T)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise scores_overflow_error(int(bad.sum()), first, row_max.dtype)


def _flash_forward(q, k, v, options: FlashAttentionOptions, block_q: int, block_k: int):
    """The forward for validated inputs and given tile sizes; returns (o, cache)."""
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    B, H, T, D = q.shape
    Dv = v.shape[3]
    dims, params, mask, dtype_args = _kernel_arguments(q, k, v, options, block_q, block_k)
    causal, window, doc_ids, has_doc, key_pad, has_pad, kinds = mask
    o = np.zeros((B, H, T, Dv), dtype=q.dtype)  # (B, H, T, Dv)
    row_max = np.empty((B, H, T), dtype=q.dtype)  # (B, H, T) m
    log_sum = np.empty((B, H, T), dtype=q.dtype)  # (B, H, T) log l
    with _one_blas_thread():
        _forward_kernel(q.reshape(-1), k.reshape(-1), v.reshape(-1), dims, params,
                        options.initial_logits(H, q.dtype), causal, window, doc_ids, has_doc,
                        key_pad, has_pad, kinds, block_q, block_k, *dtype_args,
                        _scores_may_overflow(q, k, options.scale), o.reshape(-1),
                        row_max.reshape(-1), log_sum.reshape(-1))
    _raise_for_marked_rows(row_max)
    return o, FlashAttentionCache(q, k, v, o, row_max, log_sum, options)


def _use_one_pass(B: int, n_kv: int, n_threads: int) -> bool:
    """The one-pass backward (items = B·K) when they keep every thread busy to within 25%."""
    items = B * n_kv
    if items < n_threads:
        return False
    rounds = -(-items // n_threads)  # ceil: items per thread of the busiest thread
    return rounds * n_threads <= 1.25 * items


def _flash_backward(do, cache: FlashAttentionCache, block_q: int, block_k: int,
                    schedule: str = "auto"):
    """The backward with given tile sizes; schedule "auto" | "by_kv_head" | "two_pass".
    Returns (dq, dk, dv), or (dq, dk, dv, dsinks) when the forward had sinks."""
    q, k, v, o, row_max, log_sum, options = cache
    do = np.ascontiguousarray(check_grad(do, o.shape, q.dtype, "do"))
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    dims, params, mask, dtype_args = _kernel_arguments(q, k, v, options, block_q, block_k)
    causal, window, doc_ids, has_doc, key_pad, has_pad, kinds = mask
    if schedule == "auto":
        schedule = "by_kv_head" if _use_one_pass(B, n_kv, numba.get_num_threads()) else "two_pass"
    if schedule not in ("by_kv_head", "two_pass"):
        raise ValueError(f"schedule must be 'auto', 'by_kv_head' or 'two_pass', got {schedule!r}")
    q_blocks_t = np.empty(q.size, dtype=q.dtype)  # every query block of q, transposed
    do_blocks_t = np.empty(do.size, dtype=q.dtype)  # and of do
    flat = (q.reshape(-1), k.reshape(-1), v.reshape(-1), do.reshape(-1), q_blocks_t,
            do_blocks_t, row_max.reshape(-1), log_sum.reshape(-1))
    delta = np.empty(B * H * T, dtype=q.dtype)  # (B·H·T,) δ = rowsum(do ⊙ o)
    dq = np.zeros_like(q)  # (B, H, T, D)
    dk = np.zeros_like(k)  # (B, K, S, D)
    dv = np.zeros_like(v)  # (B, K, S, Dv)
    shared = (dims, params, causal, window, doc_ids, has_doc, key_pad, has_pad, kinds,
              block_q, block_k, *dtype_args)
    with _one_blas_thread():
        _delta_kernel(do.reshape(-1), o.reshape(-1), B * H * T, o.shape[3], delta)
        _transpose_blocks(q.reshape(-1), B * H, T, D, block_q, q_blocks_t)
        _transpose_blocks(do.reshape(-1), B * H, T, do.shape[3], block_q, do_blocks_t)
        if schedule == "by_kv_head":
            _backward_by_kv_head(*flat, delta, *shared, dq.reshape(-1), dk.reshape(-1),
                                 dv.reshape(-1))
        else:
            _backward_dk_dv(*flat, delta, *shared, dk.reshape(-1), dv.reshape(-1))
            _backward_dq(*flat, delta, *shared, dq.reshape(-1))
    if options.sinks is not None:  # the tiles need no change; the sink logit's gradient:
        # dsinks[h] = −Σ_{b,t} p_sink δ with p_sink = exp((s_h − m) − log l)
        return dq, dk, dv, sink_gradient(options.sinks, row_max, log_sum, delta.reshape(B, H, T))
    return dq, dk, dv


def flash_attention_forward(q, k, v, *, causal=False, window=None, doc_ids=None,
                            key_padding_mask=None, scale=None, softmax="softmax",
                            clip_gamma=-0.03, clip_zeta=1.0, softcap=None, sinks=None,
                            clip_alpha=None):
    """Fused ``o = softmax(mask(softcap(scale · q kᵀ))) v``; returns ``(o, cache)``.

    q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv), float32 or float64 → o (B, H, T, Dv).
    Options exactly as :func:`npformer.functional.attention.attention_forward`;
    softmax ∈ FLASH_SOFTMAX_VARIANTS ("sink" with sinks (H,); "clipped", with or without
    clip_alpha, raises: use attention_impl="numpy").
    The cache holds q, k, v, o, the row max and log-sum (B, H, T) and the options — no
    T × S matrix.
    """
    q, k, v, options = prepare_flash_attention(
        q, k, v, causal=causal, window=window, doc_ids=doc_ids,
        key_padding_mask=key_padding_mask, scale=scale, softmax=softmax,
        clip_gamma=clip_gamma, clip_zeta=clip_zeta, softcap=softcap, sinks=sinks,
        clip_alpha=clip_alpha)
    return _flash_forward(q, k, v, options, BLOCK_Q, BLOCK_K)


def flash_attention_backward(do, cache: FlashAttentionCache):
    """Returns ``(dq, dk, dv)``: (B, H, T, D), (B, K, S, D), (B, K, S, Dv); with sinks
    ``(dq, dk, dv, dsinks)``, dsinks (H,).

    dk and dv sum the G = H / K query heads that share each kv head; dsinks[h] sums over
    the batch and the queries of head h.
    """
    if not isinstance(cache, FlashAttentionCache):
        raise ValueError(f"cache must be the FlashAttentionCache returned by "
                         f"flash_attention_forward, got {type(cache).__name__}")
    return _flash_backward(do, cache, BLOCK_Q, BLOCK_K)
