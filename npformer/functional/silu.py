"""SiLU / Swish: ``y = x σ(x)`` with the logistic sigmoid ``σ(x) = 1 / (1 + e^(−x))``.

The activation inside SwiGLU (PaLM, Llama); see :mod:`npformer.functional.glu`.

Derivation
----------
The sigmoid satisfies σ'(x) = σ(x)(1 − σ(x)). By the product rule

    ∂y/∂x = σ(x) + x σ(x)(1 − σ(x)) = σ(x) (1 + x (1 − σ(x)))
                                              →  dx = dy ⊙ σ(x) (1 + x (1 − σ(x)))

Numerical stability
-------------------
``1 / (1 + exp(−x))`` overflows ``exp`` for x ≲ −89 (float32) or −710 (float64). With
e = exp(−|x|) ∈ (0, 1], which never overflows,

    σ(x) = 1 / (1 + e)    for x ≥ 0
    σ(x) = e / (1 + e)    for x < 0       (multiply top and bottom of 1/(1+e^(−x)) by e^x)

and 1 − σ(x) = σ(−x) is computed the same way, which keeps it accurate where σ(x) ≈ 1.
At x = ±1e4 this gives σ = 1 or 0 exactly, y = x or −0, and ∂y/∂x = 1 or 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) without overflow for any finite x; keeps x's dtype."""
    e = np.exp(-np.abs(x))  # (...) in (0, 1]
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class SiluCache(NamedTuple):
    x: np.ndarray  # (...)


def silu_forward(x: np.ndarray):
    """``y = x σ(x)`` elementwise.  x: (...)  →  y: (...), same dtype."""
    x = check_float(x, "x")
    y = np.asarray(x * _sigmoid(x))  # (...); asarray keeps a 0-d input a 0-d array
    return y, SiluCache(x)


def silu_backward(dy: np.ndarray, cache: SiluCache) -> np.ndarray:
    """Returns ``dx`` (...)."""
    (x,) = cache
    dy = check_grad(dy, x.shape, x.dtype)
    # forward: y = x σ(x), so ∂y/∂x = σ(x) (1 + x (1 − σ(x))), with 1 − σ(x) = σ(−x)
    s = _sigmoid(x)  # σ(x)    (...)
    dx = np.asarray(dy * s * (1.0 + x * _sigmoid(-x)))  # (...)
    return dx
