"""FlashAttention in plain NumPy: the tiled online-softmax algorithm, block by block.

This is the readable twin of the numba kernels in :mod:`npformer.kernels.flash_attention`:
the same algorithm, the same tiles, the same cache, written for a reader rather than for
speed. Both compute exactly what :func:`npformer.functional.attention.attention_forward`
computes, ``o = softmax(mask(softcap(scale · q kᵀ))) v``, without ever holding a T × S
matrix: only one (Tq, Sk) tile of scores at a time, and per query row two numbers.

Shapes: q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv) → o (B, H, T, Dv) and the
log-sum-exp of each row (B, H, T), kept as its two parts m and log l (below); query head h
reads kv head h // G with G = H / K.

Forward: the online softmax (Milakov & Gimelshein 2018; Dao et al. 2022)
------------------------------------------------------------------------
For one query row with scores z_1 … z_S (already soft-capped and masked, −inf where masked),

    o = Σ_j exp(z_j) v_j / Σ_j exp(z_j)

Walk the keys in blocks and keep three running quantities for the keys seen so far:

    m  = max_j z_j                   the running maximum (for a safe exp)
    l  = Σ_j exp(z_j − m)            the running normaliser, relative to m
    a  = Σ_j exp(z_j − m) v_j        the running unnormalised output (Dv,), relative to m

A new block with scores z' updates them with m' = max(m, max z'):

    l ← exp(m − m') l + Σ exp(z' − m')
    a ← exp(m − m') a + Σ exp(z' − m') v'
    m ← m'

(multiplying by exp(m − m') re-expresses the old sums relative to the new maximum; every
exponent is ≤ 0, so nothing overflows). After the last block o = a / l, and the row's
log-sum-exp is

    lse = log Σ_j exp(z_j) = m + log l

which is all the backward needs: p_j = exp(z_j − lse) recovers every probability exactly.
The cache keeps its two parts, m and log l, and the backward evaluates p_j = exp((z_j − m) −
log l): when |m| is huge (1e8 in float32, 1e17 in float64) the single number m + log l
rounds log l away — two tied top scores (l = 2) would each get p = 1 and every gradient
would be doubled (issue 14). z_j − m is exact for the row's top scores.

- Masks: a masked score is −inf and contributes exp(−inf) = 0. A row with every key masked
  keeps m = −inf and l = 0: it gets o = 0 and lse = −inf (and p = 0 in the backward, which
  shifts such a row by +inf instead: exp(−inf − inf) = 0 where −inf − (−inf) is NaN). While
  m' = −inf the shift uses 0 instead of m' (exp(−inf − 0) = 0, where −inf − (−inf) is NaN).
- Tiles: a (query block, key block) tile in which no query may see any key (beyond the causal
  diagonal, outside the sliding window, across two documents, or all padding) contributes
  nothing and is skipped; with a window of w keys the work is ~T·w instead of T·S.
- A learned sink (p_j = exp(z_j) / (exp(s_h) + Σ_k exp(z_k)), one logit s_h per query head):
  the sink is an extra key with score s_h and value 0, already seen, so the running state
  of every row of head h starts at m = s_h, l = exp(s_h − s_h) = 1, a = 0 instead of
  m = −inf, l = 0. Then lse = log(exp(s_h) + Σ exp(z_j)) and p_j = exp(z_j − lse) is the
  sink softmax; a fully masked row gets m = s_h, l = 1, o = 0, p = 0. softmax₁
  (p_j = exp(z_j) / (1 + Σ_k exp(z_k))) is s_h = 0. Each head's starting logit is one
  array (H,): −inf (nothing seen, plain softmax), 0 (softmax₁) or the sinks.
  The sink's own probability is p_sink = exp(s_h − lse) = exp((s_h − m) − log l), from the
  cache's two parts, which is all its gradient needs (below).
- Soft-capping c = cap · tanh(s / cap) is applied to each tile's scores before the mask.

Backward: recompute each tile from lse (FlashAttention-2)
---------------------------------------------------------
The reference backward (npformer.functional.attention) needs p (T, S). Here every tile of p
is recomputed, p = exp((z − m) − log l) (0 where masked), and the reference's formulas are applied
tile by tile:

    forward o = p v          →  dv_J += p_IJᵀ do_I,        dp_IJ = do_I v_Jᵀ
    forward p = softmax(z)   →  dz = p ⊙ (dp − δ),  with δ_i = ⟨dp_i, p_i⟩ = Σ_j p_ij (do_i · v_j)
                                = do_i · o_i,  so  δ = rowsum(do ⊙ o)  (B, H, T), computed once
    forward c = cap tanh(s/cap) → ds = dz ⊙ sech²(s / cap)   (only with soft-capping)
    forward s = scale q kᵀ   →  dq_I += scale · ds_IJ k_J,  dk_J += scale · ds_IJᵀ q_I

δ is the same for softmax₁ and the sink: their backward is also p ⊙ (dp − ⟨dp, p⟩) and
o = Σ_j p_j v_j still holds (the extra key has value 0), so no tile changes. The sink logit
gets ∂ℓ/∂s_h = Σ over the rows of head h of −p_sink ⟨dp, p⟩ = −p_sink δ:

    dsinks[h] = − Σ_b Σ_t exp((s_h − m[b, h, t]) − log l[b, h, t]) · δ[b, h, t]

one vectorised line over the cache (a fully masked row has o = 0, so δ = 0 and it adds 0).
Grouped heads: dk and dv of kv head κ sum the tiles of its G query heads; dq of a query
head sums the tiles of every key block.

Clipped softmax, with a fixed or a length-aware γ, has no online form (its clip needs each
row's final normaliser before the values are summed); it stays on the NumPy path
(``attention_impl="numpy"``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_grad, check_int, check_positive
from ..functional.attention import _check_qkv, check_sinks_and_clip_alpha, scores_overflow_error
from ..functional.attention_mask import attention_mask
from ..functional.softmax_variants import check_clip_range, softcap_forward

FLASH_SOFTMAX_VARIANTS = ("softmax", "softmax1", "sink")


class FlashAttentionOptions(NamedTuple):
    scale: float
    causal: bool
    window: Optional[int]  # None: no sliding window
    doc_ids: Optional[np.ndarray]  # (B, S) int, or None
    key_padding_mask: Optional[np.ndarray]  # (B, S) bool, True = padding, or None
    softmax: str  # "softmax" | "softmax1" | "sink"
    softcap: Optional[float]  # None: no soft-capping
    sinks: Optional[np.ndarray] = None  # (H,) the sink logits with softmax="sink", else None

    def initial_logits(self, H: int, dtype) -> np.ndarray:
        """(H,) the score of the extra key every row of head h has already seen: −inf (none,
        softmax), 0 (softmax₁) or the learned sink s_h. The online softmax starts at m = it,
        l = 1 (or l = 0 for −inf)."""
        if self.softmax == "sink":
            return np.ascontiguousarray(self.sinks, dtype=dtype)
        return np.full(H, 0.0 if self.softmax == "softmax1" else -np.inf, dtype=dtype)


class FlashAttentionCache(NamedTuple):
    """Everything the backward needs, and no T × S matrix.

    Each row's log-sum-exp lse = m + log l is kept as its two parts (see the module
    docstring: their sum would round log l away when |m| is huge)."""

    q: np.ndarray  # (B, H, T, D)
    k: np.ndarray  # (B, K, S, D)
    v: np.ndarray  # (B, K, S, Dv)
    o: np.ndarray  # (B, H, T, Dv)
    row_max: np.ndarray  # (B, H, T) m = max_j z_j per query row; −inf for a fully masked row
    log_sum: np.ndarray  # (B, H, T) log l = log Σ_j exp(z_j − m); −inf for a fully masked row
    options: FlashAttentionOptions

    @property
    def lse(self) -> np.ndarray:
        """(B, H, T) log Σ_j exp(z_j) = m + log l per query row; −inf for a fully masked row."""
        return self.row_max + self.log_sum


def prepare_flash_attention(q, k, v, *, causal=False, window=None, doc_ids=None,
                            key_padding_mask=None, scale=None, softmax="softmax",
                            clip_gamma=-0.03, clip_zeta=1.0, softcap=None, sinks=None,
                            clip_alpha=None):
    """Validate the inputs exactly as attention_forward does; returns (q, k, v, options).

    The masks are validated by :func:`attention_mask` on a single query row, (B, 1, 1, S),
    so that no (T, S) mask is ever built; its two checks that involve T are repeated here.
    """
    q, k, v = _check_qkv(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else check_positive(scale, "scale")
    if not isinstance(softmax, str) or softmax not in FLASH_SOFTMAX_VARIANTS + ("clipped",):
        raise ValueError(f"softmax must be one of {sorted(FLASH_SOFTMAX_VARIANTS + ('clipped',))}, "
                         f"got {softmax!r}")
    check_clip_range(clip_gamma, clip_zeta, "clip_gamma", "clip_zeta")
    sinks, _ = check_sinks_and_clip_alpha(q, softmax, sinks, clip_alpha)
    if softmax == "clipped":
        raise ValueError(
            "softmax='clipped' (fixed or length-aware γ) has no online (tiled) form: its clip "
            "needs each row's final normaliser; the flash attention kernels support "
            f"{list(FLASH_SOFTMAX_VARIANTS)}. "
            "Use the NumPy path (attention_impl=\"numpy\") for clipped softmax"
        )
    if softcap is not None:
        softcap = check_positive(softcap, "softcap")
    attention_mask(B, 1, S, causal=causal, window=window, doc_ids=doc_ids,
                   key_padding_mask=key_padding_mask)  # types and shapes; (B, 1, 1, S) only
    if causal and T > S:
        raise ValueError(
            f"causal attention needs T <= S (query i sits at position i + S − T, so a query "
            f"would have no key to see), got T={T}, S={S}"
        )
    if doc_ids is not None and T > S:
        raise ValueError(
            f"doc_ids needs T <= S (self-attention: the queries are the last T of the S key "
            f"positions), got T={T}, S={S}"
        )
    window = None if window is None else check_int(window, "window", 1)
    options = FlashAttentionOptions(float(scale), bool(causal), window, doc_ids,
                                    key_padding_mask, softmax, softcap, sinks)
    return q, k, v, options


def tile_allowed(options: FlashAttentionOptions, b: int, T: int, S: int,
                 rows: slice, cols: slice) -> np.ndarray:
    """The (Tq, Sk) bool block of the attention mask of batch row b: True = query may see key.

    Same rules as npformer.functional.attention_mask, for one tile: query i sits at
    position i + S − T (bottom-right alignment).
    """
    query_pos = np.arange(rows.start, rows.stop)[:, None] + (S - T)  # (Tq, 1)
    key_pos = np.arange(cols.start, cols.stop)[None, :]  # (1, Sk)
    allowed = np.ones((query_pos.shape[0], key_pos.shape[1]), dtype=bool)  # (Tq, Sk)
    if options.causal:
        allowed &= key_pos <= query_pos
    if options.window is not None:
        allowed &= key_pos > query_pos - options.window
    if options.doc_ids is not None:
        docs = options.doc_ids[b]  # (S,)
        allowed &= docs[query_pos] == docs[key_pos]
    if options.key_padding_mask is not None:
        allowed &= ~options.key_padding_mask[b, cols][None, :]
    return allowed


def _tile_scores(q_tile, k_tile, allowed, options):
    """z = mask(softcap(scale · q kᵀ)) for one tile, dz/ds (None without soft-capping), and
    the queries with an allowed score that overflowed the dtype (finite q, k; ±inf or NaN).

    q_tile (Tq, D), k_tile (Sk, D), allowed (Tq, Sk) → z (Tq, Sk), slope (Tq, Sk) or None,
    overflowed (Tq,) bool. Overflow where the mask removes the score is harmless.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = options.scale * (q_tile @ k_tile.T)  # (Tq, Sk) s = scale · q kᵀ
    finite = np.isfinite(s)  # (Tq, Sk)
    overflowed = (~finite & allowed).any(axis=1)  # (Tq,)
    s = np.where(finite, s, 0).astype(s.dtype, copy=False)  # masked or refused by the caller
    slope = None
    if options.softcap is not None:
        s, capped = softcap_forward(s, options.softcap)  # (Tq, Sk) c = cap tanh(s / cap)
        slope = capped.slope  # (Tq, Sk) sech²(s / cap) = dc/ds
    z = np.where(allowed, s, -np.inf).astype(q_tile.dtype, copy=False)  # (Tq, Sk) exact mask
    return z, slope, overflowed


def flash_attention_reference_forward(q, k, v, *, causal=False, window=None, doc_ids=None,
                                      key_padding_mask=None, scale=None, softmax="softmax",
                                      clip_gamma=-0.03, clip_zeta=1.0, softcap=None,
                                      sinks=None, clip_alpha=None, block_q=16, block_k=16):
    """Tiled ``o = softmax(mask(softcap(scale · q kᵀ))) v``; returns ``(o, cache)``.

    Options as :func:`npformer.functional.attention.attention_forward` (except
    softmax="clipped", which has no online form). block_q, block_k: tile size in queries
    and keys.
    """
    q, k, v, options = prepare_flash_attention(
        q, k, v, causal=causal, window=window, doc_ids=doc_ids,
        key_padding_mask=key_padding_mask, scale=scale, softmax=softmax,
        clip_gamma=clip_gamma, clip_zeta=clip_zeta, softcap=softcap, sinks=sinks,
        clip_alpha=clip_alpha)
    block_q = check_int(block_q, "block_q", 1)
    block_k = check_int(block_k, "block_k", 1)
    B, H, T, D = q.shape
    n_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]  # K, S, Dv
    G = H // n_kv
    dtype = q.dtype
    initial = options.initial_logits(H, dtype)  # (H,) −inf, 0 (softmax₁) or the sinks
    o = np.zeros((B, H, T, Dv), dtype=dtype)  # (B, H, T, Dv)
    row_max = np.full((B, H, T), -np.inf, dtype=dtype)  # (B, H, T) m
    log_sum = np.full((B, H, T), -np.inf, dtype=dtype)  # (B, H, T) log l
    overflowed = np.zeros((B, H, T), dtype=bool)  # (B, H, T) rows with an overflowed score
    for b in range(B):
        for h in range(H):
            kv = h // G  # the kv head that query head h reads
            for i0 in range(0, T, block_q):
                rows = slice(i0, min(i0 + block_q, T))
                q_tile = q[b, h, rows]  # (Tq, D)
                Tq = q_tile.shape[0]
                # running state: softmax starts from nothing (m = −inf, l = 0); softmax₁ and
                # the sink from their extra key, already seen (m = s_h, l = exp(0) = 1)
                m = np.full(Tq, initial[h], dtype=dtype)  # (Tq,) max
                l = np.full(Tq, 0.0 if initial[h] == -np.inf else 1.0, dtype=dtype)  # Σ exp(z − m)
                acc = np.zeros((Tq, Dv), dtype=dtype)  # (Tq, Dv) Σ exp(z − m) v
                for j0 in range(0, S, block_k):
                    cols = slice(j0, min(j0 + block_k, S))
                    allowed = tile_allowed(options, b, T, S, rows, cols)  # (Tq, Sk)
                    if not allowed.any():
                        continue  # no query of this block may see any key of that block
                    z, _, over = _tile_scores(q_tile, k[b, kv, cols], allowed, options)
                    overflowed[b, h, rows] |= over  # (Tq,); z (Tq, Sk)
                    m_new = np.maximum(m, z.max(axis=1))  # (Tq,)
                    # (Tq,) the shift m', but 0 while m' = −inf: no −inf − (−inf)
                    shift = np.where(m_new == -np.inf, 0, m_new).astype(dtype)
                    p = np.exp(z - shift[:, None])  # (Tq, Sk) exp(z − m'), 0 where masked
                    rescale = np.exp(m - shift)  # (Tq,) exp(m − m'): old sums relative to m'
                    l = rescale * l + p.sum(axis=1)  # (Tq,)
                    acc = rescale[:, None] * acc + p @ v[b, kv, cols]  # (Tq, Dv)
                    m = m_new
                seen = l > 0  # (Tq,) False only for a fully masked row of plain softmax
                o[b, h, rows][seen] = acc[seen] / l[seen, None]  # (Tq, Dv) o = a / l
                row_max[b, h, rows][seen] = m[seen]  # (Tq,) lse = m + log l, in two parts
                log_sum[b, h, rows][seen] = np.log(l[seen])
    if overflowed.any():  # the same error as the NumPy attention path and the kernels
        first = tuple(int(i) for i in np.argwhere(overflowed)[0])
        raise scores_overflow_error(int(overflowed.sum()), first, dtype)
    return o, FlashAttentionCache(q, k, v, o, row_max, log_sum, options)


def flash_attention_reference_backward(do, cache: FlashAttentionCache, *, block_q=16,
                                       block_k=16):
    """Returns ``(dq, dk, dv)``: (B, H, T, D), (B, K, S, D), (B, K, S, Dv); with sinks
    ``(dq, dk, dv, dsinks)``, dsinks (H,).

    Every tile of p is recomputed from m and log l; dk and dv sum the G query heads of each
    kv head.
    """
    q, k, v, o, row_max, log_sum, options = cache
    block_q = check_int(block_q, "block_q", 1)
    block_k = check_int(block_k, "block_k", 1)
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    G = H // n_kv
    do = check_grad(do, o.shape, q.dtype, "do")
    # δ_i = ⟨dp_i, p_i⟩ = do_i · Σ_j p_ij v_j = do_i · o_i: one number per query row
    delta = np.sum(do * o, axis=-1)  # (B, H, T)
    # p = exp((z − m) − log l); a fully masked row (m = −inf) has z = −inf everywhere: shift
    # it by +inf, so that exp(−inf − inf) = 0 instead of exp(−inf + inf) = NaN
    masked = row_max == -np.inf  # (B, H, T)
    max_shift = np.where(masked, np.inf, row_max)  # (B, H, T)
    log_sum_shift = np.where(masked, 0, log_sum).astype(log_sum.dtype)  # (B, H, T)
    dq = np.zeros_like(q)  # (B, H, T, D)
    dk = np.zeros_like(k)  # (B, K, S, D)
    dv = np.zeros_like(v)  # (B, K, S, Dv)
    for b in range(B):
        for h in range(H):
            kv = h // G
            for j0 in range(0, S, block_k):
                cols = slice(j0, min(j0 + block_k, S))
                k_tile, v_tile = k[b, kv, cols], v[b, kv, cols]  # (Sk, D), (Sk, Dv)
                for i0 in range(0, T, block_q):
                    rows = slice(i0, min(i0 + block_q, T))
                    allowed = tile_allowed(options, b, T, S, rows, cols)  # (Tq, Sk)
                    if not allowed.any():
                        continue
                    q_tile, do_tile = q[b, h, rows], do[b, h, rows]  # (Tq, D), (Tq, Dv)
                    z, slope, _ = _tile_scores(q_tile, k_tile, allowed, options)  # (Tq, Sk)
                    p = np.exp((z - max_shift[b, h, rows, None])
                               - log_sum_shift[b, h, rows, None])  # (Tq, Sk) probabilities
                    # forward: o = p v, so dv = pᵀ do and dp = do vᵀ
                    dv[b, kv, cols] += p.T @ do_tile  # (Sk, Dv)
                    dp = do_tile @ v_tile.T  # (Tq, Sk)
                    # forward: p = softmax(z), so dz = p ⊙ (dp − δ)  (0 where masked: p = 0)
                    ds = p * (dp - delta[b, h, rows, None])  # (Tq, Sk)
                    # forward: c = cap tanh(s / cap), so ds = dc ⊙ sech²(s / cap)
                    if slope is not None:
                        ds = ds * slope
                    # forward: s = scale · q kᵀ, so dq = scale · ds k and dk = scale · dsᵀ q
                    dq[b, h, rows] += options.scale * (ds @ k_tile)  # (Tq, D)
                    dk[b, kv, cols] += options.scale * (ds.T @ q_tile)  # (Sk, D)
    if options.sinks is not None:
        return dq, dk, dv, sink_gradient(options.sinks, row_max, log_sum, delta)
    return dq, dk, dv


def sink_gradient(sinks, row_max, log_sum, delta):
    """dsinks (H,) = − Σ_b Σ_t p_sink[b, h, t] δ[b, h, t], p_sink = exp((s_h − m) − log l).

    sinks (H,); row_max, log_sum, delta (B, H, T). With a sink every row has m ≥ s_h and
    l ≥ 1 (finite), so the exponent is ≤ 0: p_sink ∈ [0, 1], no overflow.
    """
    p_sink = np.exp((sinks[None, :, None] - row_max) - log_sum)  # (B, H, T)
    return -np.sum(p_sink * delta, axis=(0, 2))  # (H,)
