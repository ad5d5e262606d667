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

The functional (reference) GeLU does not use this module: ``npformer.functional`` imports with
NumPy alone, so its erf is :func:`npformer.functional.erf.erf`, the algorithm of
:func:`erf_float64` below vectorised in NumPy. The fused GeLU kernels use :func:`erf_float64`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..functional.erf import check_float_array as _check_float_array
from ._exp import exp_nonpositive


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


# ---- a vectorisable erf for fused kernels ------------------------------------------------
# math.erf is a scalar libm call (~30 ns per element here, the whole cost of the exact GeLU
# kernel); this evaluates erf in float64 with plain arithmetic and the exp of ._exp, so a
# loop calling it vectorises. Coefficients computed with mpmath at 40 digits:
#   |x| < 1       erf(x) = x Σₙ cₙ (x²)ⁿ, the Maclaurin series cₙ = 2/√π (−1)ⁿ / (n! (2n+1)),
#                 n ≤ 18 (the first omitted term is 2e-19 of erf(1) = 0.84)
#   1 ≤ |x| < 6   erf(x) = 1 − e^(−x²) erfcx(|x|), with erfcx(x) = e^(x²) erfc(x) smooth on
#                 [1, 6]: its degree-29 Chebyshev interpolant (at the 30 Chebyshev nodes) in
#                 s = (2|x| − 7)/5, whose error in erfc is ≤ 7e-19 (0.006 ulp of erf near 1)
#   |x| ≥ 6       erfc(6) = 2e-17 < half an ulp of 1, so the same formula at |x| = 6 gives 1
# Measured against math.erf: tests/test_activation_kernels.py (max ulp error stated there).
# npformer.functional.erf.erf is the same algorithm with the same coefficients vectorised in
# NumPy (the exact GeLU of npformer.functional, which must import without numba).

@njit(inline="always", error_model="numpy", fastmath={"contract"})
def erf_float64(x):
    """erf of one float64 number, branch-free (both pieces computed, one selected) so that a
    loop over it vectorises; NaN → NaN, ±inf → ±1."""
    a = abs(x)
    t = a * a
    # Maclaurin coefficients c₁₈ … c₀ by Horner in t = x², written out (a loop over a
    # tuple of coefficients is not unrolled and stops the vectorisation)
    series = 4.763348040515068e-18
    series = series * t + -9.063970842808673e-17
    series = series * t + 1.6342614095367152e-15
    series = series * t + -2.7835162072109215e-14
    series = series * t + 4.4632242632864775e-13
    series = series * t + -6.7113668551641105e-12
    series = series * t + 9.422759064650411e-11
    series = series * t + -1.2290555301717928e-09
    series = series * t + 1.4807192815879218e-08
    series = series * t + -1.6365844691234924e-07
    series = series * t + 1.6462114365889248e-06
    series = series * t + -1.492565035840625e-05
    series = series * t + 0.00012055332981789664
    series = series * t + -0.0008548327023450853
    series = series * t + 0.005223977625442188
    series = series * t + -0.026866170645131252
    series = series * t + 0.11283791670955126
    series = series * t + -0.37612638903183754
    series = series * t + 1.1283791670955126
    series *= a
    clamped = min(max(a, 1.0), 6.0)
    s = (2.0 * clamped - 7.0) / 5.0
    s2 = 2.0 * s  # Clenshaw: bₖ = cₖ + 2s bₖ₊₁ − bₖ₊₂, k = 29 … 1
    # Chebyshev coefficients of erfcx, b₂₉ … b₀
    b1 = -5.394020788469484e-18
    b2 = 0.0
    b1, b2 = 2.6494001992231862e-17 + s2 * b1 - b2, b1
    b1, b2 = -1.2358968293313467e-16 + s2 * b1 - b2, b1
    b1, b2 = 5.693123694895126e-16 + s2 * b1 - b2, b1
    b1, b2 = -2.5933001174246888e-15 + s2 * b1 - b2, b1
    b1, b2 = 1.1678402563368202e-14 + s2 * b1 - b2, b1
    b1, b2 = -5.197545127186086e-14 + s2 * b1 - b2, b1
    b1, b2 = 2.2852946889956604e-13 + s2 * b1 - b2, b1
    b1, b2 = -9.923156075370268e-13 + s2 * b1 - b2, b1
    b1, b2 = 4.253478301220761e-12 + s2 * b1 - b2, b1
    b1, b2 = -1.799019306443203e-11 + s2 * b1 - b2, b1
    b1, b2 = 7.504484747602075e-11 + s2 * b1 - b2, b1
    b1, b2 = -3.0858852312872416e-10 + s2 * b1 - b2, b1
    b1, b2 = 1.2501871239431183e-09 + s2 * b1 - b2, b1
    b1, b2 = -4.987110132992565e-09 + s2 * b1 - b2, b1
    b1, b2 = 1.957586342968354e-08 + s2 * b1 - b2, b1
    b1, b2 = -7.555861081756622e-08 + s2 * b1 - b2, b1
    b1, b2 = 2.865502572057316e-07 + s2 * b1 - b2, b1
    b1, b2 = -1.0668392337070025e-06 + s2 * b1 - b2, b1
    b1, b2 = 3.895514595190115e-06 + s2 * b1 - b2, b1
    b1, b2 = -1.3935932859822488e-05 + s2 * b1 - b2, b1
    b1, b2 = 4.878565911493746e-05 + s2 * b1 - b2, b1
    b1, b2 = -0.00016689473052528832 + s2 * b1 - b2, b1
    b1, b2 = 0.0005570714353927344 + s2 * b1 - b2, b1
    b1, b2 = -0.0018109803028142997 + s2 * b1 - b2, b1
    b1, b2 = 0.005721802417478219 + s2 * b1 - b2, b1
    b1, b2 = -0.017525709964867527 + s2 * b1 - b2, b1
    b1, b2 = 0.05188222158351389 + s2 * b1 - b2, b1
    b1, b2 = -0.147884835533987 + s2 * b1 - b2, b1
    erfcx = 0.20196598791223083 + s * b1 - b2  # b₀ + s b₁ − b₂
    tail = 1.0 - exp_nonpositive(-(clamped * clamped)) * erfcx  # 1 − erfc(|x|)
    value = math.copysign(series if a < 1.0 else tail, x)
    return value if x == x else x
