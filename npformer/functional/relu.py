"""ReLU: ``y = max(x, 0)``, the FFN activation of "Attention Is All You Need" (2017).

Derivation
----------
Elementwise, y = x where x > 0 and y = 0 elsewhere, so

    ∂y/∂x = 1 if x > 0, 0 if x < 0           →  dx = dy ⊙ [x > 0]

At x = 0 the function has a kink and no derivative; we use 0 there (the subgradient PyTorch
uses too, so gradients match torch exactly even on zeros).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad


class ReluCache(NamedTuple):
    x: np.ndarray  # (...)


def relu_forward(x: np.ndarray):
    """``y = max(x, 0)`` elementwise.  x: (...)  →  y: (...), same dtype."""
    x = check_float(x, "x")
    # maximum, not where(x > 0, x, 0): a NaN stays NaN (the fused training step skips the
    # input scan and relies on NaN reaching the loss); the Python 0.0 keeps float32 float32
    y = np.asarray(np.maximum(x, 0.0))  # (...); asarray: a 0-d input stays a 0-d array
    return y, ReluCache(x)


def relu_backward(dy: np.ndarray, cache: ReluCache) -> np.ndarray:
    """Returns ``dx`` (...)."""
    (x,) = cache
    dy = check_grad(dy, x.shape, x.dtype)
    # forward: y = max(x, 0), so dx = dy where x > 0, else 0 (also at x == 0, as torch)
    dx = np.where(x > 0, dy, 0.0)  # (...)
    return dx
