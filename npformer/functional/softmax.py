"""Softmax and log-softmax along any axis: ``p = softmax(x)``, ``y = log softmax(x)``.

The part of the transformer that never changed: attention normalises its scores with it and
the language-model loss starts with it. Everything below is along one axis of length n; the
other axes are independent slices.

Forward, stably
---------------
    p_i = exp(x_i) / Σ_k exp(x_k)                  x, p: (..., n, ...)

(x is any input: attention's scores s, or the logits z of a language model.)

Softmax does not change when a constant is subtracted from every x_i (the factor exp(−c)
cancels between numerator and denominator). Subtracting the row max m = max_k x_k makes every exponent
≤ 0, so exp never overflows, and one term equals exp(0) = 1, so the sum lies in [1, n]: no
division by a number that underflowed to 0. Logits of ±1e4 are then harmless in float32.

Masks (−inf) are exact: an entry x_j = −inf gives exp(x_j − m) = 0, so p_j = 0 exactly, not
a small number a large learning rate could resurrect. A slice that is entirely −inf has
m = −inf and x − m = NaN; we take m = 0 there, so every exp is 0, and define p = 0 (all
zeros) instead of 0/0. Its gradient is then 0 as well (below, dx = p ⊙ (...)), never NaN.

The Jacobian
------------
With Z = Σ_k exp(x_k) (so ∂Z/∂x_j = exp(x_j)), the quotient rule gives

    ∂p_i/∂x_j = ([i = j] exp(x_i) Z − exp(x_i) exp(x_j)) / Z² = p_i ([i = j] − p_j)

which in matrix form is

    J = ∂p/∂x = diag(p) − p pᵀ        (n, n), symmetric

(:func:`softmax_jacobian` builds it explicitly, for study). Its rows sum to 0 (p sums to 1
whatever x is) and it is singular along the all-ones vector (the shift invariance above).

The backward never needs J
--------------------------
Given dp = ∂ℓ/∂p, the chain rule is dx = Jᵀ dp = J dp (J is symmetric):

    dx_j = Σ_i dp_i p_i ([i = j] − p_j) = p_j dp_j − p_j Σ_i dp_i p_i

    dx = p ⊙ (dp − ⟨dp, p⟩)

One dot product and two elementwise operations: O(n) time and no extra memory, where J
would cost n² per slice. In attention each of the B·H·T score rows has n = S entries, so
the explicit Jacobians would take B·H·T·S² numbers; the formula above takes none.

Log-softmax
-----------
    y_i = log p_i = x_i − log Σ_k exp(x_k) = (x_i − m) − log Σ_k exp(x_k − m)

(the log-sum-exp with the same max shift: the sum lies in [1, n], so its log is in
[0, log n] and y is exact even when p_i itself would underflow to 0). The derivative of
log Σ_k exp(x_k) with respect to x_j is p_j, so

    ∂y_i/∂x_j = [i = j] − p_j
    dx_j = Σ_i dy_i ([i = j] − p_j) = dy_j − p_j Σ_i dy_i

    dx = dy − softmax(x) · Σ_i dy_i

Log-softmax accepts finite inputs only. A masked entry x_j = −inf has y_j = −inf, and any
loss that weights it (even by 0: 0 · (−inf) = NaN) or sums it turns into NaN or ±inf; a
fully masked slice would give −inf − (−inf) = NaN. Mask with :func:`softmax_forward`
(attention), or leave positions out of a loss with ``ignore_index`` (cross-entropy).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad


class SoftmaxCache(NamedTuple):
    p: np.ndarray  # the output, shape of x
    axis: int  # non-negative axis of the softmax


class LogSoftmaxCache(NamedTuple):
    p: np.ndarray  # softmax(x) = exp(y), shape of x
    axis: int  # non-negative axis of the softmax


def _check_axis(axis, x: np.ndarray, name: str) -> int:
    """A valid axis of ``x`` (negative counts from the end), returned non-negative."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis must be an integer, got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"axis must lie in [{-x.ndim}, {x.ndim - 1}] for {name} of shape {x.shape}, got {axis}"
        )
    axis %= x.ndim
    if x.shape[axis] == 0:
        raise ValueError(
            f"{name} has length 0 along axis {axis} (shape {x.shape}); "
            "softmax needs at least one entry"
        )
    return axis


def _check_softmax_inputs(x, axis, name: str = "x", *, allow_neg_inf: bool = True):
    """``(x, axis)`` for a softmax along ``axis``: a float array of rank >= 1 (finite, and
    -inf where ``allow_neg_inf``), axis an integer naming a non-empty axis (returned >= 0)."""
    x = check_float(x, name, allow_neg_inf=allow_neg_inf, min_ndim=1)
    return x, _check_axis(axis, x, name)


def _check_log_softmax_inputs(x, axis):
    """``(x, axis)`` as for softmax, but -inf refused with its reason (module docstring)."""
    x = check_float(x, "x", allow_neg_inf=True, min_ndim=1)  # NaN and +inf: the usual error
    masked = np.isneginf(x)
    if masked.any():
        raise ValueError(
            f"x contains {int(masked.sum())} -inf value(s) "
            f"(first at index {np.unravel_index(int(np.argmax(masked)), x.shape)}); "
            "log_softmax needs finite inputs: a masked entry's log-probability is -inf, which "
            "turns any loss that uses it into NaN or inf (and a fully masked slice into "
            "-inf - (-inf) = NaN). Mask with softmax_forward, or use cross_entropy's ignore_index"
        )
    return x, _check_axis(axis, x, "x")


def softmax_forward(x: np.ndarray, axis: int = -1):
    """``p = softmax(x)`` along ``axis``; ``-inf`` entries are masked (p = 0 there).

    x: any shape (n = x.shape[axis] ≥ 1)  →  p: same shape, each slice sums to 1 (or is all
    zeros when the whole slice is -inf). NaN and +inf are refused.
    """
    x, axis = _check_softmax_inputs(x, axis)
    m = np.max(x, axis=axis, keepdims=True)  # (..., 1, ...) the shift
    m[np.isneginf(m)] = 0  # all masked: −inf − 0 = −inf, not −inf − (−inf) = NaN
    e = np.exp(x - m)  # (..., n, ...) every exponent ≤ 0; a masked entry gives exactly 0
    Z = np.sum(e, axis=axis, keepdims=True)  # (..., 1, ...) in [1, n], or 0 if fully masked
    Z[Z == 0] = 1  # fully masked slice: p = 0 / 1 = 0, never 0 / 0
    p = e / Z  # (..., n, ...) p = exp(x − m) / Σ_k exp(x_k − m)
    return p, SoftmaxCache(p, axis)


def softmax_backward(dp: np.ndarray, cache: SoftmaxCache):
    """Returns ``dx`` (shape of x): the vector-Jacobian product, without forming J."""
    p, axis = cache
    dp = check_grad(dp, p.shape, p.dtype, "dp")
    # forward: p = exp(x − m) / Σ exp(x − m), so J = diag(p) − p pᵀ and
    # dx = J dp = p ⊙ dp − p ⟨dp, p⟩ = p ⊙ (dp − ⟨dp, p⟩)
    dot = np.sum(dp * p, axis=axis, keepdims=True)  # (..., 1, ...) ⟨dp, p⟩ per slice
    return p * (dp - dot)  # (..., n, ...) masked entries (p = 0) get exactly 0


def softmax_jacobian(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """The explicit Jacobian ``J = diag(p) − p pᵀ`` of each slice of a softmax output ``p``.

    For study and tests only: the backward uses ``J dp = p ⊙ (dp − ⟨dp, p⟩)`` instead.
    p: softmax output, n = p.shape[axis]  →  J: (..., n, n), where ``...`` are p's other axes
    in order (the softmax axis moved last) and ``J[..., i, j] = ∂p_i / ∂x_j``.
    """
    p, axis = _check_softmax_inputs(p, axis, "p", allow_neg_inf=False)
    p_last = np.moveaxis(p, axis, -1)  # (..., n)
    eye = np.eye(p_last.shape[-1], dtype=p.dtype)  # (n, n)
    col = p_last[..., :, None]  # (..., n, 1)
    row = p_last[..., None, :]  # (..., 1, n)
    return col * eye - col * row  # diag(p) − p pᵀ   (..., n, n)


def log_softmax_forward(x: np.ndarray, axis: int = -1):
    """``y = log softmax(x) = x − log Σ exp(x)`` along ``axis`` via a stable log-sum-exp.

    x: any shape, finite (no -inf masks: see the module docstring)  →  y: same shape.
    """
    x, axis = _check_log_softmax_inputs(x, axis)
    shifted = x - np.max(x, axis=axis, keepdims=True)  # (..., n, ...) x − m: all ≤ 0, one is 0
    e = np.exp(shifted)  # (..., n, ...)
    Z = np.sum(e, axis=axis, keepdims=True)  # (..., 1, ...) in [1, n]
    y = shifted - np.log(Z)  # (..., n, ...) log p = (x − m) − log Σ_k exp(x_k − m)
    p = e / Z  # (..., n, ...) softmax(x), needed by the backward
    return y, LogSoftmaxCache(p, axis)


def log_softmax_backward(dy: np.ndarray, cache: LogSoftmaxCache):
    """Returns ``dx`` (shape of x)."""
    p, axis = cache
    dy = check_grad(dy, p.shape, p.dtype)
    # forward: y = x − log Σ_k exp(x_k), so ∂y_i/∂x_j = [i = j] − p_j and
    # dx = dy − p Σ_i dy_i
    return dy - p * np.sum(dy, axis=axis, keepdims=True)  # (..., n, ...)
