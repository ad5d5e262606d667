"""Scaled dot-product attention, the NumPy reference: ``o = softmax(scale · q kᵀ + mask) v``.

The readable version: it materialises every score (B, H, T, S). The fused numba kernels
(npformer.kernels) compute the same thing block by block and are tested against this file.

Shapes: q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv)  →  o (B, H, T, Dv), with B batch,
T queries, S keys, H query heads, K key/value heads, D head dim (`head_dim`; Dv the value head dim,
usually D).

Head sharing
------------
Each of the K key/value heads serves a group of G = H / K consecutive query heads: query
head h reads kv head h // G.

- K = H: multi-head attention (2017), G = 1;
- K = 1: multi-query attention (Shazeer 2019, PaLM), one kv head for all;
- 1 < K < H: grouped-query attention (Ainslie et al. 2023, Llama 2 70B).

The code never copies k and v H / K times: q is viewed as (B, K, G, T, D) and each kv head
is multiplied with its G query heads at once.

Forward, for one (batch, query head) pair
-----------------------------------------
    s = scale · q kᵀ                       (T, S)   scale = 1/√D by default (GPT-Neo: 1)
    c = cap · tanh(s / cap)                (T, S)   soft-capping, only if softcap is set (Gemma 2)
    z = s, or c,  with −inf where masked   (T, S)
    P = softmax(z) along S                 (T, S)   or softmax₁ / sink / clipped softmax
    o = P v                                (T, Dv)

The variants of the softmax line (npformer.functional.softmax_variants):

- softmax="softmax1":  P[t, j] = exp(z[t, j]) / (1 + Σ_k exp(z[t, k]))
- softmax="sink", a learned logit per query head, sinks (H,) (gpt-oss):
      P[t, j] = exp(z[t, j]) / (exp(s_h) + Σ_k exp(z[t, k])),   s_h = sinks[h]
  every row of head h shares s_h (softmax₁ is s_h = 0); the sink has no value, so o = P v
  still holds with Σ_j P[t, j] = 1 − p_sink[t] < 1.
- softmax="clipped":   P = clip((ζ − γ) softmax(z) + γ, 0, 1) with a fixed γ = clip_gamma,
  or, with clip_alpha α, the length-aware γ_t = −α / n_t, n_t the number of keys row t may
  see after every mask (causal: t + 1; a window, documents and padding count too). A row
  with no key (n_t = 0) has softmax(z) = 0 and so P = 0 for any γ ≤ 0 (γ_t = −α is used).

Masks are exact: a masked score is −inf, its probability P exactly 0 (see
npformer.functional.attention_mask for causal, window, document and padding masks, and
the "bottom-right" causal alignment when T < S: query i sits at position i + S − T, as
when decoding with a KV cache). A query row with every key masked gets P = 0, so o = 0 and
every gradient through it is 0 — not the NaN of 0/0 that a naive softmax gives.

Backward
--------
Given do = ∂ℓ/∂o (T, Dv), walk the forward lines in reverse.

1. o = P v. Each o[t, e] = Σ_j P[t, j] v[j, e], so

       dP = do vᵀ        (T, S)     ∂ℓ/∂P[t, j] = Σ_e do[t, e] v[j, e]
       dv = Pᵀ do        (S, Dv)    ∂ℓ/∂v[j, e] = Σ_t P[t, j] do[t, e]

2. P = softmax(z), row by row: the vector-Jacobian product of npformer.functional.softmax,

       dz = P ⊙ (dP − delta),    delta = ⟨dP, P⟩_row            (T, S), delta (T, 1)

   (softmax₁ and the sink have the same form; clipped softmax first zeroes dP where it
   clipped and multiplies by ζ − γ_t, see npformer.functional.softmax_variants). Masked
   entries have P = 0, so dz = 0 there; a fully masked row has dz = 0 everywhere.
   The sink logit: ∂P[t, j]/∂s_h = −P[t, j] p_sink[t], so each row gives
   −p_sink[t] ⟨dP, P⟩_row = −p_sink[t] delta[t], and s_h, shared by the rows of every batch
   entry and query of head h, receives their sum:

       dsinks[h] = − Σ_b Σ_t p_sink[b, h, t] · delta[b, h, t]         (H,)

   (per QUERY head: the G heads of a kv group each have their own sink).
   For softmax, softmax₁ and the sink (o = P v with these P) the row sum is also

       delta[t] = Σ_j P[t, j] Σ_e do[t, e] v[j, e] = Σ_e do[t, e] o[t, e] = rowsum(do ⊙ o)

   which is how FlashAttention gets δ without the (T, S) matrix dP
   (npformer.kernels.flash_attention); this file forms dP and takes ⟨dP, P⟩ directly.

3. z = where(allowed, c, −inf): the mask is a constant, so dc = dz where allowed, 0 elsewhere.

4. c = cap · tanh(s / cap), only with soft-capping: dc/ds = 1 − tanh²(s / cap), so

       ds = dc ⊙ (1 − tanh²(s / cap))

   (a saturated score, |s| ≫ cap, passes almost no gradient).

5. s = scale · q kᵀ, i.e. s[t, j] = scale Σ_d q[t, d] k[j, d]:

       dq = scale · ds k         (T, D)
       dk = scale · dsᵀ q        (S, D)

Head sharing in the backward: a kv head was used by the G query heads of its group, so its
gradient is the sum of the G contributions (the multivariate chain rule: a variable used
several times receives the sum of the gradients of every use):

       dk[b, κ] = Σ_{g < G} scale · ds[b, κG + g]ᵀ q[b, κG + g]
       dv[b, κ] = Σ_{g < G} P[b, κG + g]ᵀ do[b, κG + g]

Computed as (B, K, G, T, S) products and an explicit sum over the G axis, so dk and dv
come out (B, K, S, ·) — never a silently broadcast (B, H, S, ·).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from .._validate import (NonFiniteError, check_float, check_grad, check_positive,
                         check_same_dtype)
from .attention_mask import attention_mask
from .softmax import softmax_backward, softmax_forward
from .softmax_variants import (
    check_clip_range,
    clipped_softmax_backward,
    clipped_softmax_forward,
    sink_softmax_backward,
    sink_softmax_forward,
    softcap_backward,
    softcap_forward,
    softmax1_backward,
    softmax1_forward,
)

SOFTMAX_VARIANTS = {
    # name: (forward, backward); each normalises along the last axis (S) and accepts -inf
    "softmax": (softmax_forward, softmax_backward),
    "softmax1": (softmax1_forward, softmax1_backward),  # "off by one" (Evan Miller 2023)
    "clipped": (clipped_softmax_forward, clipped_softmax_backward),  # Bondarenko et al. 2023
    "sink": (sink_softmax_forward, sink_softmax_backward),  # learned per-head sink (gpt-oss)
}


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, K, G, T, D) the queries, grouped by their kv head
    k: np.ndarray  # (B, K, S, D)
    v: np.ndarray  # (B, K, S, Dv)
    P: np.ndarray  # (B, K, G, T, S) the attention probabilities
    scale: float
    softcap: object  # SoftcapCache, or None without soft-capping
    allowed: Optional[np.ndarray]  # (B, 1, 1, T, S) bool, True = attended; None: no mask
    softmax: str  # the variant's name
    softmax_cache: object  # that variant's cache
    has_sinks: bool = False  # softmax="sink": the backward also returns dsinks (H,)


def scores_overflow_error(n_rows: int, first: tuple, dtype) -> NonFiniteError:
    """The error of both attention paths (this one and the numba kernels) when finite q and k
    give a score scale · q·k that is ±inf or NaN where the mask allows it."""
    b, h, t = first
    return NonFiniteError(
        f"attention scores scale · q·k overflow {np.dtype(dtype)} (±inf or NaN) in {n_rows} "
        f"query row(s) (first: batch {b}, head {h}, query {t}); scale q and k down or compute "
        "in float64")


def _refuse_overflowed_scores(s, allowed):
    """s (B, K, G, T, S) raw scores; ValueError if one is not finite where allowed (B, 1, 1, T,
    S) or None (all) lets it count. Non-finite scores at masked places are harmless: they
    become 0 here, and the mask replaces them with −inf."""
    finite = np.isfinite(s)  # (B, K, G, T, S)
    if finite.all():
        return s
    overflowed = ~finite if allowed is None else ~finite & allowed
    if overflowed.any():
        rows = overflowed.any(axis=-1)  # (B, K, G, T)
        b, kv, g, t = (int(i) for i in np.argwhere(rows)[0])
        raise scores_overflow_error(int(rows.sum()), (b, kv * s.shape[2] + g, t), s.dtype)
    return np.where(finite, s, 0).astype(s.dtype, copy=False)


def _check_qkv(q, k, v):
    """q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv), one dtype, H divisible by K."""
    q = check_float(q, "q")
    k = check_float(k, "k")
    v = check_float(v, "v")
    check_same_dtype(q, "q", k=k, v=v)
    layouts = (("q", q, "(B, H, T, D)"), ("k", k, "(B, K, S, D)"), ("v", v, "(B, K, S, Dv)"))
    for name, x, layout in layouts:
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {x.shape}")
        if 0 in x.shape:
            raise ValueError(f"{name} must have no empty axis {layout}, got shape {x.shape}")
    B, H, T, head_dim = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must share the batch size B (axis 0), got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have the head size D = q.shape[3] = {head_dim} (axis 3), got k "
                         f"{k.shape}; scores are dot products of a query and a key")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the kv heads and length of k (axes 1, 2: K, S), got "
                         f"k {k.shape}, v {v.shape}")
    n_kv_heads = k.shape[1]
    if H % n_kv_heads:
        raise ValueError(
            f"n_heads H = q.shape[1] = {H} must be divisible by n_kv_heads K = k.shape[1] = "
            f"{n_kv_heads} (each kv head serves H / K query heads); valid n_kv_heads for H = {H}: "
            f"{[d for d in range(1, H + 1) if H % d == 0]}"
        )
    return q, k, v


def check_sinks_and_clip_alpha(q, softmax, sinks, clip_alpha):
    """The sink logits and the length-aware clip of both attention paths: sinks (H,) finite,
    q's dtype, given exactly when softmax="sink"; clip_alpha None or a finite number > 0,
    only with softmax="clipped". Returns ``(sinks, clip_alpha)`` (clip_alpha as a float)."""
    if softmax == "sink":
        if sinks is None:
            raise ValueError("softmax='sink' needs sinks, one logit per query head: an array "
                             f"of shape (H,) = ({q.shape[1]},)")
        sinks = check_float(sinks, "sinks")
        check_same_dtype(q, "q", sinks=sinks)
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks must have shape (H,) = ({q.shape[1]},), one logit per query "
                             f"head (H = q.shape[1]), got shape {sinks.shape}")
    elif sinks is not None:
        raise ValueError(f"sinks are only used with softmax='sink', got softmax={softmax!r}; "
                         "pass sinks=None or softmax='sink'")
    if clip_alpha is not None:
        if softmax != "clipped":
            raise ValueError(f"clip_alpha (the length-aware γ = −clip_alpha / n of clipped "
                             f"softmax) needs softmax='clipped', got softmax={softmax!r}; pass "
                             "clip_alpha=None")
        clip_alpha = check_positive(clip_alpha, "clip_alpha")
    return sinks, clip_alpha


def _check_attention_inputs(q, k, v, scale, softmax, clip_gamma, clip_zeta, softcap, sinks,
                            clip_alpha):
    """The one check of :func:`attention_forward` (the mask's arguments are checked by
    :func:`~npformer.functional.attention_mask.attention_mask` as it builds the mask).

    Returns ``(q, k, v, scale, clip_gamma, clip_zeta, softcap, sinks, clip_alpha)`` with
    scale = 1/√D when None.
    """
    q, k, v = _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else check_positive(scale, "scale")
    if not isinstance(softmax, str) or softmax not in SOFTMAX_VARIANTS:
        raise ValueError(f"softmax must be one of {sorted(SOFTMAX_VARIANTS)}, got {softmax!r}")
    clip_gamma, clip_zeta = check_clip_range(clip_gamma, clip_zeta, "clip_gamma", "clip_zeta")
    if softcap is not None:
        softcap = check_positive(softcap, "softcap")
    sinks, clip_alpha = check_sinks_and_clip_alpha(q, softmax, sinks, clip_alpha)
    return q, k, v, scale, clip_gamma, clip_zeta, softcap, sinks, clip_alpha


def length_aware_gamma(clip_alpha: float, allowed, S: int, dtype):
    """Clipped softmax's γ_t = −clip_alpha / n_t per query row, n_t the keys row t may see.

    allowed (B, 1, 1, T, S) bool or None (every row sees all S keys) → γ (B, 1, 1, T, 1) in
    dtype, or the number −clip_alpha / S. A row with n_t = 0 gets −clip_alpha (any γ ≤ 0
    gives such a row P = 0)."""
    if allowed is None:
        return -clip_alpha / S
    n_keys = allowed.sum(axis=-1, keepdims=True)  # (B, 1, 1, T, 1)
    return (-clip_alpha / np.maximum(n_keys, 1)).astype(dtype)


def _allowed_keys(B: int, T: int, S: int, causal, window, doc_ids, key_padding_mask):
    """The mask as (B, 1, 1, T, S) bool (True = attended), broadcasting over K and G; None
    when no mask is asked for (every query sees every key)."""
    if (causal is False and window is None and doc_ids is None
            and key_padding_mask is None):
        return None
    allowed = attention_mask(B, T, S, causal=causal, window=window, doc_ids=doc_ids,
                             key_padding_mask=key_padding_mask)  # (B, 1, T, S), validates them
    return allowed[:, :, None]  # (B, 1, 1, T, S)


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    doc_ids: Optional[np.ndarray] = None,
    key_padding_mask: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    softmax: str = "softmax",
    clip_gamma: float = -0.03,
    clip_zeta: float = 1.0,
    softcap: Optional[float] = None,
    sinks: Optional[np.ndarray] = None,
    clip_alpha: Optional[float] = None,
):
    """``o = softmax(mask(softcap(scale · q kᵀ))) v`` with shared kv heads.

    q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv)  →  o (B, H, T, Dv); H divisible by K,
    query head h uses kv head h // G with G = H / K.
    causal, window, doc_ids (B, S), key_padding_mask (B, S): see
    :func:`npformer.functional.attention_mask.attention_mask` (bottom-right alignment).
    scale: None → 1/√D. softmax: "softmax" | "softmax1" | "sink" (with sinks (H,), one
    logit per query head, required then and refused otherwise) | "clipped" (with
    clip_gamma <= 0, clip_zeta >= 1; clip_alpha > 0 replaces clip_gamma by the length-aware
    γ_t = −clip_alpha / n_t, n_t the keys query t may see after every mask).
    softcap: None, or cap > 0 for ``cap · tanh(s / cap)`` before the mask (the sink logit is
    not capped).
    A score scale · q·k that overflows the dtype (±inf or NaN from finite q and k) where the
    mask allows it raises ValueError, here and in the numba kernels; masked ones do not count.
    """
    q, k, v, scale, clip_gamma, clip_zeta, softcap, sinks, clip_alpha = _check_attention_inputs(
        q, k, v, scale, softmax, clip_gamma, clip_zeta, softcap, sinks, clip_alpha)
    B, H, T, head_dim = q.shape
    K, S, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    G = H // K  # query heads per kv head
    allowed = _allowed_keys(B, T, S, causal, window, doc_ids, key_padding_mask)  # or None

    qg = q.reshape(B, K, G, T, head_dim)  # (B, K, G, T, D) query head h = κ·G + g
    kt = np.swapaxes(k, -1, -2)[:, :, None]  # (B, K, 1, D, S) one kv head for its G query heads
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        s = scale * (qg @ kt)  # (B, K, G, T, S) s = scale · q kᵀ
    s = _refuse_overflowed_scores(s, allowed)  # (B, K, G, T, S)
    # (B, K, G, T, S) c = cap tanh(s / cap) with soft-capping, else c = s
    c, softcap_cache = (s, None) if softcap is None else softcap_forward(s, softcap)
    # (B, K, G, T, S) z = c where allowed, exactly −inf where masked
    z = c if allowed is None else np.where(allowed, c, -np.inf).astype(q.dtype, copy=False)
    forward, _ = SOFTMAX_VARIANTS[softmax]
    extra = ()  # the variant's other arguments
    if softmax == "clipped":  # γ (a number, or (B, 1, 1, T, 1) length-aware) and ζ
        gamma = clip_gamma if clip_alpha is None else length_aware_gamma(clip_alpha, allowed,
                                                                         S, q.dtype)
        extra = (gamma, clip_zeta)
    elif softmax == "sink":  # (1, K, G, 1, 1): query head h = κ·G + g uses sinks[h]
        extra = (sinks.reshape(1, K, G, 1, 1),)
    P, softmax_cache = forward(z, *extra)  # (B, K, G, T, S) P = softmax(z), rows over S keys
    o = P @ v[:, :, None]  # (B, K, G, T, Dv) o = P v
    o = o.reshape(B, H, T, head_dim_v)  # (B, H, T, Dv)
    cache = AttentionCache(qg, k, v, P, scale, softcap_cache, allowed, softmax, softmax_cache,
                           sinks is not None)
    return o, cache


def attention_backward(do: np.ndarray, cache: AttentionCache):
    """Returns ``(dq, dk, dv)``: (B, H, T, D), (B, K, S, D), (B, K, S, Dv); with sinks
    (softmax="sink") ``(dq, dk, dv, dsinks)``, dsinks (H,).

    dk and dv sum the gradients of the G = H / K query heads that share each kv head;
    dsinks[h] sums over the batch and the queries of head h.
    """
    qg, k, v, P, scale, softcap_cache, allowed, softmax, softmax_cache, has_sinks = cache
    B, K, G, T, head_dim = qg.shape
    H, head_dim_v = K * G, v.shape[3]
    do = check_grad(do, (B, H, T, head_dim_v), qg.dtype, "do")  # (B, H, T, Dv)
    dog = do.reshape(B, K, G, T, head_dim_v)  # (B, K, G, T, Dv) grouped like q

    # forward: o = P v, so dP = do vᵀ and dv = Pᵀ do (summed over the G heads of each group)
    dP = dog @ np.swapaxes(v, -1, -2)[:, :, None]  # (B, K, G, T, S)
    dv = (np.swapaxes(P, -1, -2) @ dog).sum(axis=2)  # (B, K, G, S, Dv) → (B, K, S, Dv)

    # forward: P = softmax(z) (or a variant), so dz = P ⊙ (dP − ⟨dP, P⟩_row) (see its
    # backward); for softmax ⟨dP, P⟩_row = rowsum(do ⊙ o) = delta, FlashAttention's δ
    _, backward = SOFTMAX_VARIANTS[softmax]
    dz = backward(dP, softmax_cache)  # (B, K, G, T, S)
    if has_sinks:  # forward: P = sink_softmax(z, s): also ds = −p_sink ⟨dP, P⟩ per row
        dz, dsink_rows = dz  # (B, K, G, T, S), (B, K, G, T, 1)
        dsinks = dsink_rows.sum(axis=(0, 3, 4)).reshape(H)  # (K, G) → (H,): Σ over b, t

    # forward: z = where(allowed, c, −inf), so dc = dz where allowed, 0 where masked
    dc = dz if allowed is None else np.where(allowed, dz, 0).astype(qg.dtype, copy=False)

    # forward: c = cap tanh(s / cap), so ds = dc ⊙ (1 − tanh²(s / cap)); without it c = s
    ds = dc if softcap_cache is None else softcap_backward(dc, softcap_cache)  # (B, K, G, T, S)

    # forward: s = scale · q kᵀ, so dq = scale · ds k and dk = scale · dsᵀ q (summed over G)
    dq = scale * (ds @ k[:, :, None])  # (B, K, G, T, D)
    dk = scale * (np.swapaxes(ds, -1, -2) @ qg).sum(axis=2)  # (B, K, G, S, D) → (B, K, S, D)
    if has_sinks:
        return dq.reshape(B, H, T, head_dim), dk, dv, dsinks
    return dq.reshape(B, H, T, head_dim), dk, dv
