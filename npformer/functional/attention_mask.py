"""Which keys each query may attend to: causal, sliding-window, document and padding masks.

:func:`attention_mask` returns a boolean array ``allowed`` (B, 1, T, S), True where query i
may attend to key j (the 1 broadcasts over heads). Attention turns False into a score of
exactly −inf, so a masked key gets probability 0 — not the small exp(−1e4) of a finite
"large negative" bias, which a big enough score could overcome.

Positions ("bottom-right" alignment)
------------------------------------
Keys sit at positions j = 0 … S−1. The T queries are the *last* T of those positions:
query i sits at

    qpos(i) = i + (S − T)

For self-attention over a whole sequence T = S and qpos(i) = i. When decoding with a KV
cache, the S keys are the S − T cached tokens followed by the T new ones, and the new
queries are exactly those last T tokens (T = 1: one query at position S − 1, which may see
every key). This is the alignment of FlashAttention 2 ("bottom-right"); ``torch.tril`` of a
(T, S) matrix would instead align the top-left corners and put query i at position i.

The masks (all combine by AND)
------------------------------
- causal: key j is allowed iff j ≤ qpos(i) — no peeking at later tokens (GPT decoders).
  Needs T ≤ S: a query at a negative position would see nothing.
- window w ≥ 1 (with causal): additionally j > qpos(i) − w, the w most recent keys
  including itself: qpos − w < j ≤ qpos. GPT-Neo's local layers and GPT-3's "locally
  banded" attention; w = 1 sees only itself, w ≥ S is plain causal.
- doc_ids (B, S) integers: several documents packed into one row; key j is allowed iff it
  belongs to the same document as the query, doc_ids[b, j] == doc_ids[b, qpos(i)]
  (Llama 3). The queries' ids are the last T columns, so this is for self-attention
  (T ≤ S). Combined with causal this is block-diagonal causal attention.
- key_padding_mask (B, S) bool, True = padding: that key is excluded for every query
  (the convention of ``torch.nn.MultiheadAttention``).

A query whose keys are all excluded (a fully padded row, say) has an all-False row;
attention gives it the output 0 and gradient 0 (see npformer.functional.attention).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._validate import check_int, check_shape


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_doc_ids(doc_ids, batch: int, T: int, S: int) -> None:
    """doc_ids: an integer ndarray (B, S), for self-attention (T <= S)."""
    if not isinstance(doc_ids, np.ndarray):
        raise ValueError(
            f"doc_ids must be a numpy.ndarray of integers, got {type(doc_ids).__name__}"
        )
    if not np.issubdtype(doc_ids.dtype, np.integer):
        raise ValueError(f"doc_ids must be an integer array (document id per position), "
                         f"got dtype {doc_ids.dtype}")
    check_shape(doc_ids, (batch, S), "doc_ids", "(B, S): the document id of every key position")
    if T > S:
        raise ValueError(
            f"doc_ids needs T <= S (self-attention: the queries are the last T of the S key "
            f"positions), got T={T}, S={S}"
        )


def _check_key_padding_mask(key_padding_mask, batch: int, S: int) -> None:
    """key_padding_mask: a bool ndarray (B, S), True = padding."""
    if not isinstance(key_padding_mask, np.ndarray) or key_padding_mask.dtype != np.bool_:
        got = (f"dtype {key_padding_mask.dtype}" if isinstance(key_padding_mask, np.ndarray)
               else type(key_padding_mask).__name__)
        raise ValueError(f"key_padding_mask must be a bool numpy.ndarray (True = padding key), "
                         f"got {got}")
    check_shape(key_padding_mask, (batch, S), "key_padding_mask",
                "(B, S): True where the key is padding")


def _check_attention_mask_inputs(batch, T, S, causal, window, doc_ids, key_padding_mask):
    """The one check of :func:`attention_mask`; returns ``(batch, T, S, causal, window)`` as
    Python ints and bool (doc_ids and key_padding_mask are used as given)."""
    batch = check_int(batch, "batch", 1)
    T = check_int(T, "T (number of queries)", 1)
    S = check_int(S, "S (number of keys)", 1)
    causal = _check_flag(causal, "causal")
    if causal and T > S:
        raise ValueError(
            f"causal attention needs T <= S (query i sits at position i + S − T, so a query "
            f"would have no key to see), got T={T}, S={S}"
        )
    if window is not None:
        window = check_int(window, "window", 1)
        if not causal:
            raise ValueError(
                f"window={window} needs causal=True: a sliding window is the w most recent keys "
                "(qpos − w < j <= qpos), as in GPT-Neo's local attention"
            )
    if doc_ids is not None:
        _check_doc_ids(doc_ids, batch, T, S)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, batch, S)
    return batch, T, S, causal, window


def attention_mask(
    batch: int,
    T: int,
    S: int,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    doc_ids: Optional[np.ndarray] = None,
    key_padding_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The keys each query may attend to: bool (B, 1, T, S), True = allowed.

    batch: B; T: number of queries (the last T positions); S: number of keys.
    causal: key j <= query position i + S − T (bottom-right alignment; needs T <= S).
    window: int >= 1, with causal only: also j > i + S − T − window.
    doc_ids: int (B, S) document id of every position; same-document keys only (T <= S).
    key_padding_mask: bool (B, S), True = padding key, excluded.
    """
    batch, T, S, causal, window = _check_attention_mask_inputs(
        batch, T, S, causal, window, doc_ids, key_padding_mask)
    qpos = np.arange(T)[:, None] + (S - T)  # (T, 1) absolute position of every query
    kpos = np.arange(S)[None, :]  # (1, S) absolute position of every key
    allowed = np.ones((batch, 1, T, S), dtype=bool)  # (B, 1, T, S)
    if causal:
        allowed &= kpos <= qpos  # (T, S) broadcast over B: no later keys
    if window is not None:
        allowed &= kpos > qpos - window  # (T, S): only the window most recent keys
    if doc_ids is not None:
        query_docs = doc_ids[:, S - T:]  # (B, T) document of every query
        allowed &= query_docs[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, S)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S) padding keys excluded
    return allowed
