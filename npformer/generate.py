"""Autoregressive sampling from a :class:`~npformer.models.DecoderLM`, with or without the KV cache.

One step: take the logits of the last position, divide by the temperature, keep the k largest
(top-k), renormalise with softmax and draw the next token from a seeded generator:

    p = softmax(top_k(z_T / τ))          τ = 0 means greedy: argmax z_T

With the KV cache (:class:`npformer.nn.attention.KVCache`) the prompt is run once and every
later step feeds one token, attending over the cached keys and values; without it every step
re-runs the whole context. Both see exactly the same context at every step, so they draw the
same tokens (a test checks it) — the cache only saves the recomputation.

Context policy when the context reaches ``max_seq_len``: the oldest half is dropped and the
cache is refilled from the rest (both modes do the same, so they stay identical). A prompt
longer than ``max_seq_len`` is cropped to its last ``max_seq_len`` tokens, as GPT-2's
generation does; a model with ``max_seq_len = 1`` keeps the last token as its context.

Temperature: ``softmax(z / τ)`` equals ``softmax((z − max z) / τ)``; the second form never
overflows (every entry is ≤ 0, the largest exactly 0), so a τ as small as 1e-300 gives the
greedy limit instead of inf − inf = NaN. Logits that are NaN or infinite (a checkpoint whose
weights are broken) raise a ``NonFiniteError`` naming the step, not a draw from NaN.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ._validate import NonFiniteError, check_int
from .functional.softmax import softmax_forward


def next_token_distribution(logits: np.ndarray, temperature: float, top_k: Optional[int]) -> np.ndarray:
    """logits (V,) → probabilities (V,) after temperature and top-k (float64)."""
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny τ sends the non-maximal entries to -inf: p = 0
        z = (z - z.max()) / temperature  # ≤ 0 everywhere, 0 at the maximum: no overflow
    if top_k is not None and top_k < z.shape[0]:
        kth_largest = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth_largest, -np.inf, z)  # ties at the k-th value are all kept
    p, _ = softmax_forward(z)
    return p


def draw(z: np.ndarray, temperature: float, top_k: Optional[int], rng: np.random.Generator) -> int:
    """The next token from the last position's logits z (V,): argmax at τ = 0, else a draw."""
    if not np.isfinite(z).all():
        raise NonFiniteError(
            f"the model's logits contain {int((~np.isfinite(z)).sum())} NaN or infinite "
            f"value(s) of {z.shape[0]}: its weights are broken (a diverged or damaged "
            "checkpoint); nothing can be sampled from it")
    if temperature == 0:
        return int(np.argmax(z))
    return int(rng.choice(z.shape[0], p=next_token_distribution(z, temperature, top_k)))


def _check_options(temperature, top_k, n_tokens, seed):
    check_int(seed, "seed", 0)  # np.random.default_rng refuses a negative seed
    if not isinstance(n_tokens, (int, np.integer)) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise ValueError(f"tokens must be an integer ≥ 0, got {n_tokens!r}")
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer ≥ 1, got {top_k!r}")


def generate(model, prompt_ids, n_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0, use_cache: bool = True,
             stop_ids: Sequence[int] = ()) -> List[int]:
    """Sample ``n_tokens`` token ids continuing ``prompt_ids`` (a non-empty sequence of ids).

    Returns the new ids only; generation ends early after drawing one of ``stop_ids`` (an
    end-of-sequence token; it is the last id returned, as in transformers' ``generate``).
    The model is switched to evaluation mode (no dropout)."""
    _check_options(temperature, top_k, n_tokens, seed)
    context = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
    if not context:
        raise ValueError("the prompt must contain at least one token (it is empty)")
    model.eval()
    max_len = model.config.max_seq_len
    if len(context) > max_len:
        context = context[-max_len:]
    rng = np.random.default_rng(seed)
    new: List[int] = []
    caches = None
    fed = 0  # how many context tokens the cache holds
    for _ in range(n_tokens):
        if len(context) >= max_len:  # full: drop the oldest half, refill the cache
            context = context[len(context) - max(max_len // 2, 1):]
            caches, fed = None, 0
        if use_cache:
            if caches is None:
                caches = model.new_kv_caches()
            logits = model.forward(np.array([context[fed:]]), kv_caches=caches)  # (1, T_new, V)
            fed = len(context)
        else:
            logits = model.forward(np.array([context]))  # (1, T, V)
        token = draw(logits[0, -1], temperature, top_k, rng)
        context.append(token)
        new.append(token)
        if token in stop_ids:
            break
    return new


def generate_seq2seq(model, prompt_ids, n_tokens: int, *, temperature: float = 1.0,
                     top_k: Optional[int] = None, seed: int = 0) -> List[int]:
    """Continue text with the 2017 encoder-decoder, as it was trained here: the encoder reads
    the last T tokens (T = ``max_seq_len``), the decoder starts from the last of them and
    writes up to T new ones; then the window moves on. No KV cache (every step re-runs the
    decoder); returns the new ids."""
    _check_options(temperature, top_k, n_tokens, seed)
    context = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
    if not context:
        raise ValueError("the prompt must contain at least one token (it is empty)")
    model.eval()
    window = model.config.max_seq_len
    rng = np.random.default_rng(seed)
    new: List[int] = []
    while len(new) < n_tokens:
        source = context[-window:]
        target = [source[-1]]  # the decoder's first input: the encoder's last token
        for _ in range(min(window, n_tokens - len(new))):
            logits = model.forward(np.array([source]), np.array([target]))  # (1, T, V)
            token = draw(logits[0, -1], temperature, top_k, rng)
            target.append(token)
            new.append(token)
        context.extend(target[1:])
    return new
