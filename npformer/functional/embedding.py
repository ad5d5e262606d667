"""Token embedding lookup: ``out = weight[ids]``.

Weight layout follows PyTorch's ``nn.Embedding``: ``W`` is (V, C), one row per token.

Derivation
----------
Flatten ids into N positions. The lookup copies one row per position,

    out[n, c] = W[ids[n], c] = Σ_v [ids[n] = v] W[v, c]

([·] is 1 when true, 0 otherwise: a one-hot row times W). Given dout = ∂ℓ/∂out (N, C):

    ∂ℓ/∂W[v, c] = Σ_n [ids[n] = v] dout[n, c]

Row v of dW is the sum of dout over every position that holds token v: a scatter-add. A
token that occurs k times receives k contributions; a token that does not occur gets 0.
The ids are integers, so they have no gradient.

Repeated ids: NumPy's ``dW[ids] += dout`` is WRONG. Fancy-index assignment is buffered: it
reads dW[ids], adds, and writes back, so for a repeated id the last write wins and k − 1
contributions vanish silently. ``np.add.at`` is the unbuffered form and accumulates them.

padding_idx
-----------
As in ``torch.nn.functional.embedding``: the forward is unchanged (a padding position gets
whatever row padding_idx holds; ``nn.Embedding`` initialises that row to zeros, a loaded
checkpoint need not), but ``dW[padding_idx] = 0``, so that row never trains. This is a
convention, not a derivative: finite differences see a nonzero gradient there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_float, check_grad, check_ids


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (...) integer token ids
    vocab_size: int  # V
    channels: int  # C
    padding_idx: Optional[int]  # in [0, V), or None
    dtype: np.dtype  # the weight's dtype


def _check_padding_idx(padding_idx, vocab_size: int) -> Optional[int]:
    """None, or an integer in [−V, V), returned in [0, V) (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(padding_idx, (int, np.integer)):
        raise ValueError(
            f"padding_idx must be None or an integer, got {type(padding_idx).__name__} "
            f"{padding_idx!r}"
        )
    padding_idx = int(padding_idx)
    if not -vocab_size <= padding_idx < vocab_size:
        raise ValueError(
            f"padding_idx must lie in [{-vocab_size}, {vocab_size - 1}] "
            f"(vocabulary size {vocab_size}), got {padding_idx}"
        )
    return padding_idx % vocab_size


def _check_embedding_inputs(ids, weight, padding_idx):
    """weight (V, C) float; ids integers in [0, V); padding_idx None or in [−V, V).
    Returns ``(ids, padding_idx)``, padding_idx counted in [0, V)."""
    check_float(weight, "weight", min_ndim=2)
    if weight.ndim != 2:
        raise ValueError(
            f"weight must be 2-D (V, C) as in torch.nn.Embedding, got shape {weight.shape}"
        )
    vocab_size = weight.shape[0]
    return check_ids(ids, "ids", vocab_size), _check_padding_idx(padding_idx, vocab_size)


def embedding_forward(ids: np.ndarray, weight: np.ndarray, padding_idx: Optional[int] = None):
    """``out = weight[ids]``.

    ids: (...) integers in [0, V), weight: (V, C)  →  out: (..., C), weight's dtype.

    padding_idx: a token whose row gets no gradient (see the module docstring). Beware
    Llama's pad_token_id trap: Hugging Face's LlamaModel builds its embedding with
    ``padding_idx=config.pad_token_id``. If that id is also a real token (a common choice is
    pad = eos), the token's row silently stops learning. padding_idx does not remove padding
    positions from the loss either; mask them there (cross-entropy's ignore_index).
    """
    ids, padding_idx = _check_embedding_inputs(ids, weight, padding_idx)
    vocab_size, channels = weight.shape  # V, C
    out = weight[ids]  # out[n] = W[ids[n]]    (..., C), a copy
    return out, EmbeddingCache(ids, vocab_size, channels, padding_idx, weight.dtype)


def embedding_backward(dout: np.ndarray, cache: EmbeddingCache) -> np.ndarray:
    """Returns ``dweight`` (V, C): dout scatter-added into the rows named by ids."""
    ids, vocab_size, channels, padding_idx, dtype = cache
    dout = check_grad(dout, ids.shape + (channels,), dtype, "dout")
    # forward: out[n] = W[ids[n]], so dW[v] = Σ_{n: ids[n] = v} dout[n]
    dweight = np.zeros((vocab_size, channels), dtype=dtype)  # (V, C)
    np.add.at(dweight, ids.reshape(-1), dout.reshape(-1, channels))  # unbuffered: repeats add up
    if padding_idx is not None:
        dweight[padding_idx] = 0  # the padding row is frozen (torch's padding_idx)
    return dweight
