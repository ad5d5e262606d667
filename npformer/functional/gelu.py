"""GeLU, the Gaussian error linear unit (Hendrycks & Gimpel 2016): ``y = x Φ(x)``.

Φ is the standard normal CDF and φ its density:

    Φ(x) = ½ (1 + erf(x / √2)),        φ(x) = exp(−x²/2) / √(2π)

Two forms are in use, and a checkpoint must be run with the one it was trained with:

    approximate="none"   exact:  y = ½ x (1 + erf(x / √2))
                         PyTorch's default (``F.gelu(x)``), Hugging Face ``"gelu"``.
    approximate="tanh"   y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))
                         the original code of GPT-1, GPT-2 and BERT (the erf was slow then);
                         Hugging Face calls it ``"gelu_new"`` / ``"gelu_pytorch_tanh"``,
                         PyTorch ``F.gelu(x, approximate="tanh")``.

The two differ by at most about 4.7e-4 (near x ≈ −2.7): small, but far above parity tolerances.

Derivation
----------
Exact form, by the product rule and Φ' = φ:

    ∂y/∂x = Φ(x) + x φ(x)                   →  dx = dy ⊙ (Φ(x) + x φ(x))

Tanh form. Let k = √(2/π), c = 0.044715, u = k (x + c x³), t = tanh(u). With
tanh'(u) = 1 − t² and du/dx = k (1 + 3 c x²):

    y = ½ x (1 + t)
    ∂y/∂x = ½ (1 + t) + ½ x (1 − t²) k (1 + 3 c x²)

The backward recomputes Φ (or t) from the cached x rather than caching it (as llm.c does).

Numerical stability
-------------------
NumPy has no erf; :func:`npformer.functional.erf.erf` evaluates it in float64 with NumPy
alone (a series and a Chebyshev fit, within 2 ulp of ``math.erf``) and rounds to x's dtype.
For |x| = 1e4: erf = ±1 and tanh = ±1 exactly,
exp(−x²/2) underflows to 0, and x² = 1e8 (x³ = 1e12) is far from float32's 3.4e38, so y is
x or −0 and ∂y/∂x is 1 or 0, with no overflow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._validate import check_float, check_grad
from .erf import erf

GELU_APPROXIMATIONS = ("none", "tanh")

# Plain Python floats, so float32 arrays stay float32 (an np.float64 would upcast them).
_INV_SQRT2 = 1.0 / math.sqrt(2.0)  # 1/√2, for Φ(x) = ½(1 + erf(x/√2))
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # 1/√(2π), for φ(x)
_TANH_K = math.sqrt(2.0 / math.pi)  # k = √(2/π)
_TANH_C = 0.044715  # c, the cubic coefficient of the tanh approximation


def _check_approximate(approximate) -> str:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"approximate must be one of {', '.join(repr(a) for a in GELU_APPROXIMATIONS)} "
            f"('none': exact erf form, 'tanh': GPT-2/BERT approximation), got {approximate!r}"
        )
    return approximate


def _check_gelu_inputs(x, approximate) -> str:
    """x a float array with no NaN/inf; approximate "none" or "tanh" (returned)."""
    check_float(x, "x")
    return _check_approximate(approximate)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = ½ (1 + erf(x/√2)) in x's dtype."""
    z = np.asarray(x * _INV_SQRT2)  # x/√2; asarray because a 0-d x gives a NumPy scalar
    return 0.5 * (1.0 + erf(z))


def _tanh_u(x: np.ndarray) -> np.ndarray:
    """t = tanh(u), u = k (x + c x³) = k x (1 + c x²), as a new array of x's shape and dtype.

    Written with in-place updates (one temporary instead of five): on the (B, T, 4C)
    activations of a training step the element-wise passes over memory are the cost.
    """
    t = np.multiply(x, x, out=np.empty_like(x))  # x²    (...)
    t *= _TANH_C
    t += 1.0
    t *= x
    t *= _TANH_K  # u
    return np.tanh(t, out=t)


class GeluCache(NamedTuple):
    x: np.ndarray  # (...)
    approximate: str  # "none" or "tanh"


def gelu_forward(x: np.ndarray, approximate: str = "none"):
    """``y = x Φ(x)`` (exact) or its tanh approximation.  x: (...)  →  y: (...), same dtype."""
    approximate = _check_gelu_inputs(x, approximate)
    if approximate == "none":
        cdf = _normal_cdf(x)  # Φ(x)    (...)
        y = x * cdf  # (...)
    else:
        y = _tanh_u(x)  # t = tanh(u)    (...)
        y += 1.0
        y *= 0.5  # ½ (1 + t), halved before the product: x (1 + t) overflows for |x| > max/2
        y *= x  # y = ½ x (1 + t)
    return np.asarray(y), GeluCache(x, approximate)  # asarray: a 0-d input stays 0-d


def gelu_backward(dy: np.ndarray, cache: GeluCache) -> np.ndarray:
    """Returns ``dx`` (...)."""
    x, approximate = cache
    dy = check_grad(dy, x.shape, x.dtype)
    if approximate == "none":
        # forward: y = x Φ(x), so ∂y/∂x = Φ(x) + x φ(x)
        cdf = _normal_cdf(x)  # Φ(x)    (...)
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)  # φ(x)    (...)
        dydx = cdf + x * pdf  # (...)
    else:
        # forward: y = ½ x (1 + t), t = tanh(u), u = k (x + c x³),
        # so ∂y/∂x = ½ (1 + t) + ½ x (1 − t²) k (1 + 3 c x²)
        t = _tanh_u(x)  # t = tanh(u)    (...)
        dydx = np.multiply(x, x, out=np.empty_like(x))  # x²    (...)
        # Beyond |x| = 1e4, 1 − t² is exactly 0 in both dtypes, so capping x² there changes
        # nothing, except that x² no longer overflows (|x| > 1.8e19 in float32) into 0 · inf
        np.minimum(dydx, 1e8, out=dydx)
        dydx *= 3.0 * _TANH_K * _TANH_C
        dydx += _TANH_K  # du/dx = k (1 + 3 c x²)
        slope = np.multiply(t, t, out=np.empty_like(x))  # t²    (...)
        np.subtract(1.0, slope, out=slope)  # 1 − t²
        slope *= x
        dydx *= slope  # x (1 − t²) du/dx
        dydx += t
        dydx += 1.0
        dydx *= 0.5  # ½ (1 + t) + ½ x (1 − t²) du/dx
    return np.asarray(dy * dydx)
