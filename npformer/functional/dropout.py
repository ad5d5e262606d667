"""Inverted dropout: ``y = x ⊙ m / (1 − p)`` with a fresh random keep-mask m per call.

Each entry is kept with probability 1 − p (m_i = 1) or zeroed (m_i = 0), independently:

    m_i ~ Bernoulli(1 − p),        y_i = x_i m_i / (1 − p)

"Inverted": the survivors are scaled up at training time so that E[y_i] = x_i, and at
inference (training=False) dropout is simply the identity. p = 0 is the identity too.
p = 1 drops everything: y = 0, and 1/(1 − p) is never formed (no division by zero).

Randomness is explicit: the caller passes a ``numpy.random.Generator``, so a run is
reproducible from its seed and two layers never share hidden global state.

Derivation
----------
With the mask fixed, y is linear in x with a diagonal Jacobian:

    ∂y_i/∂x_j = δ_ij m_i / (1 − p)          →  dx = dy ⊙ m / (1 − p)

The backward must use THE mask this call drew, so the mask lives in the returned cache.
A module that keeps "the last mask" on itself and is called twice (a dropout layer reused in
two places) would backpropagate the second call's mask through the first: silently wrong
gradients. Here every call returns its own cache, and each backward gets its own.

Finite differences need the same mask on every evaluation, so the gradient check builds a
new ``np.random.default_rng(seed)`` inside each forward call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._validate import check_float, check_grad, check_probability


class DropoutCache(NamedTuple):
    mask: Optional[np.ndarray]  # (...) bool, True = kept; None when the forward was the identity
    scale: float  # 1 / (1 − p); 0.0 when p = 1, 1.0 for the identity
    shape: tuple  # shape of x
    dtype: np.dtype  # dtype of x


def _check_dropout_inputs(x, p, rng, training) -> float:
    """x a finite float array, p in [0, 1] (returned as a float), rng a Generator, training a
    bool."""
    check_float(x, "x")
    p = check_probability(p, "p", allow_one=True)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    if not isinstance(training, (bool, np.bool_)):
        raise ValueError(f"training must be True or False, got {type(training).__name__} "
                         f"{training!r}")
    return p


def dropout_forward(x: np.ndarray, p: float, rng: np.random.Generator, training: bool = True):
    """``y = x ⊙ mask / (1 − p)``, mask ~ Bernoulli(1 − p) drawn from ``rng``.

    x: (...)  →  y: (...), x's dtype. p in [0, 1]. rng: a ``numpy.random.Generator``
    (``np.random.default_rng(seed)``). training=False, or p = 0, is the identity and draws
    nothing from rng.
    """
    p = _check_dropout_inputs(x, p, rng, training)
    if not training or p == 0.0:
        # identity; a copy, so that writing into y never changes the caller's x
        return x.copy(), DropoutCache(None, 1.0, x.shape, x.dtype)
    if p == 1.0:
        mask = np.zeros(x.shape, dtype=bool)  # everything dropped
        scale = 0.0  # y = 0; 1/(1 − p) would be 1/0
    else:
        mask = rng.random(x.shape) >= p  # m ~ Bernoulli(1 − p)    (...) bool
        scale = 1.0 / (1.0 - p)  # a Python float: keeps float32 arrays float32
    y = x * mask * scale  # y = x ⊙ m / (1 − p)    (...)
    return np.asarray(y), DropoutCache(mask, scale, x.shape, x.dtype)


def dropout_backward(dy: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """Returns ``dx`` (...): dy through the very mask the forward drew."""
    mask, scale, shape, dtype = cache
    dy = check_grad(dy, shape, dtype)
    if mask is None:
        return dy.copy()  # forward: y = x, so dx = dy
    # forward: y = x ⊙ m / (1 − p), so dx = dy ⊙ m / (1 − p)
    return np.asarray(dy * mask * scale)  # (...)
