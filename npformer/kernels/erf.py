"""The error function ``erf(x) = 2/√π ∫₀ˣ exp(−t²) dt``, elementwise on an array.

NumPy has no ``erf`` ufunc (SciPy does, but npformer depends only on NumPy and numba), and
the exact GeLU needs it: ``gelu(x) = ½ x (1 + erf(x/√2))``. Python's ``math.erf`` is the C
library's, accurate to about one ulp, and numba compiles calls to it, so the fast path is a
plain loop:

    erf(x)            numba ``@njit`` loop over a flat float64 copy of x
    erf_reference(x)  the same ``math.erf`` applied with ``np.frompyfunc``; slow, obviously right

Both evaluate in float64 and round the result to x's dtype, so a float32 input gets the
correctly rounded float64 value rather than a float32 approximation; the two functions agree
exactly (tests/test_erf_kernel.py checks 1e-12 in float64 and 1e-5 in float32).

With ``NUMBA_DISABLE_JIT=1`` the ``@njit`` loop is ordinary Python: slower, same results.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .._validate import FLOAT_DTYPES


def _check_float_array(x, name: str = "x") -> np.ndarray:
    # Not _validate.check_float: erf(±inf) = ±1 and erf(NaN) = NaN are well defined here,
    # so only the type and dtype are checked.
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype}"
        )
    return x


@njit(cache=True)
def _erf_loop(flat):
    """flat: (N,) float64, contiguous  →  (N,) float64 with erf of every entry."""
    out = np.empty_like(flat)
    for i in range(flat.shape[0]):
        out[i] = math.erf(flat[i])
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise ``erf(x)`` (numba kernel); the result has x's shape and dtype."""
    x = _check_float_array(x)
    flat = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)  # (N,) float64
    return _erf_loop(flat).reshape(x.shape).astype(x.dtype, copy=False)


def erf_reference(x: np.ndarray) -> np.ndarray:
    """Elementwise ``erf(x)`` by ``math.erf`` per entry: the readable twin of :func:`erf`."""
    x = _check_float_array(x)
    values = np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64))  # object array (or scalar)
    return np.asarray(values, dtype=np.float64).reshape(x.shape).astype(x.dtype, copy=False)
