"""The error function ``erf(x) = 2/√π ∫₀ˣ exp(−t²) dt``, elementwise, in NumPy alone.

NumPy has no ``erf`` ufunc (SciPy has one, but ``npformer.functional`` needs only NumPy), and
the exact GeLU needs it: ``Φ(x) = ½ (1 + erf(x/√2))``. This is a vectorised NumPy evaluation
of the same algorithm as the fused kernels' :func:`npformer.kernels.erf.erf_float64`, with the
same coefficients (computed with mpmath at 40 digits), in float64:

    |x| < 1       the Maclaurin series of erf, summed by Horner's rule in t = x²:

                      erf(x) = x Σₙ cₙ tⁿ,    cₙ = (2/√π) (−1)ⁿ / (n! (2n + 1)),   n = 0 … 18

                  (integrate exp(−t²) = Σₙ (−t²)ⁿ/n! term by term); the first omitted term,
                  |c₁₉| ≈ 2.4e-19 at |x| = 1, is 3e-19 of erf(1) = 0.84, far below float64's rounding.

    1 ≤ |x| < 6   erf(x) = 1 − e^(−x²) erfcx(|x|), where erfcx(x) = e^(x²) erfc(x) is smooth
                  and slowly varying on [1, 6] (erfc itself falls from 0.16 to 2e-17), so a
                  polynomial fits it well: its degree-29 Chebyshev interpolant

                      erfcx(x) ≈ Σₖ aₖ Tₖ(s),    s = (2|x| − 7)/5 ∈ [−1, 1],   k = 0 … 29

                  evaluated by Clenshaw's recurrence (bₖ = aₖ + 2s bₖ₊₁ − bₖ₊₂, then
                  Σ = a₀ + s b₁ − b₂), whose error in erfc is ≤ 7e-19 (0.006 ulp of erf near 1).
                  The subtraction 1 − e^(−x²) erfcx is benign: its result is ≥ 0.84.

    |x| ≥ 6       erfc(6) = 2e-17 is below half an ulp of 1, so erf(x) = ±1 exactly.

erf is odd, so every piece is evaluated at |x| and given x's sign (erf(−0) = −0). NaN gives
NaN, ±inf gives ±1. The result is rounded once to x's dtype: a float32 input gets the float64
value rounded to float32 (within one float32 ulp of the exact value, almost always the
correctly rounded one).

Accuracy, measured against ``math.erf`` (the C library's, about one ulp itself) on 10⁶
points across both seams, tests/test_functional_erf.py: at most 2 float64 ulp in float64,
at most 1 float32 ulp in float32.

Reference: the series is Abramowitz & Stegun 7.1.5; Chebyshev interpolation and Clenshaw's
recurrence as in Trefethen, *Approximation Theory and Approximation Practice*, ch. 3–4.
"""

from __future__ import annotations

import numpy as np

from .._validate import FLOAT_DTYPES

# c₀ … c₁₈: erf(x) = x Σₙ cₙ (x²)ⁿ for |x| < 1
MACLAURIN = (
    1.1283791670955126, -0.37612638903183754, 0.11283791670955126, -0.026866170645131252,
    0.005223977625442188, -0.0008548327023450853, 0.00012055332981789664,
    -1.492565035840625e-05, 1.6462114365889248e-06, -1.6365844691234924e-07,
    1.4807192815879218e-08, -1.2290555301717928e-09, 9.422759064650411e-11,
    -6.7113668551641105e-12, 4.4632242632864775e-13, -2.7835162072109215e-14,
    1.6342614095367152e-15, -9.063970842808673e-17, 4.763348040515068e-18,
)

# a₀ … a₂₉: erfcx(x) = e^(x²) erfc(x) ≈ Σₖ aₖ Tₖ((2x − 7)/5) for 1 ≤ x ≤ 6
CHEBYSHEV_ERFCX = (
    0.20196598791223083, -0.147884835533987, 0.05188222158351389, -0.017525709964867527,
    0.005721802417478219, -0.0018109803028142997, 0.0005570714353927344,
    -0.00016689473052528832, 4.878565911493746e-05, -1.3935932859822488e-05,
    3.895514595190115e-06, -1.0668392337070025e-06, 2.865502572057316e-07,
    -7.555861081756622e-08, 1.957586342968354e-08, -4.987110132992565e-09,
    1.2501871239431183e-09, -3.0858852312872416e-10, 7.504484747602075e-11,
    -1.799019306443203e-11, 4.253478301220761e-12, -9.923156075370268e-13,
    2.2852946889956604e-13, -5.197545127186086e-14, 1.1678402563368202e-14,
    -2.5933001174246888e-15, 5.693123694895126e-16, -1.2358968293313467e-16,
    2.6494001992231862e-17, -5.394020788469484e-18,
)


def check_float_array(x, name: str = "x") -> np.ndarray:
    """A float32/float64 ndarray. Not :func:`npformer._validate.check_float`: erf(±inf) = ±1
    and erf(NaN) = NaN are well defined, so only the type and dtype are checked."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype}"
        )
    return x


def _erf_series(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0 ≤ a < 1: a Σₙ cₙ (a²)ⁿ by Horner's rule.    a: (M,) float64."""
    t = a * a  # (M,)
    total = np.full_like(a, MACLAURIN[-1])  # (M,)
    for c in MACLAURIN[-2::-1]:
        total *= t
        total += c
    return total * a


def _erf_tail(a: np.ndarray) -> np.ndarray:
    """erf(a) for 1 ≤ a < 6: 1 − e^(−a²) erfcx(a), erfcx by Clenshaw.    a: (M,) float64."""
    s = (2.0 * a - 7.0) / 5.0  # a ∈ [1, 6] → s ∈ [−1, 1]    (M,)
    two_s = 2.0 * s
    b1 = np.full_like(a, CHEBYSHEV_ERFCX[-1])  # bₖ₊₁, from b₂₉    (M,)
    b2 = np.zeros_like(a)  # bₖ₊₂, from b₃₀ = 0    (M,)
    bk = np.empty_like(a)  # bₖ    (M,)
    for coefficient in CHEBYSHEV_ERFCX[-2:0:-1]:  # k = 28 … 1: bₖ = aₖ + 2s bₖ₊₁ − bₖ₊₂
        np.multiply(two_s, b1, out=bk)  # in place: three passes, no temporary, per step
        bk -= b2
        bk += coefficient
        b1, b2, bk = bk, b1, b2  # shift k down by one; bₖ₊₂'s buffer is reused
    erfcx = CHEBYSHEV_ERFCX[0] + s * b1 - b2  # a₀ + s b₁ − b₂    (M,)
    return 1.0 - np.exp(-(a * a)) * erfcx  # 1 − erfc(a)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise ``erf(x)`` in NumPy; the result has x's shape and dtype.

    x: (...) float32 or float64 (NaN and ±inf allowed)  →  (...) in x's dtype.
    """
    x = check_float_array(x)
    x64 = np.array(x, dtype=np.float64).reshape(-1)  # (N,) float64, a copy
    a = np.abs(x64)  # erf is odd: evaluate at |x|, then copy x's sign
    out = np.copysign(np.ones_like(x64), x64)  # |x| ≥ 6 (and ±inf): ±1    (N,)
    series = a < 1.0
    tail = (a >= 1.0) & (a < 6.0)
    out[series] = np.copysign(_erf_series(a[series]), x64[series])
    out[tail] = np.copysign(_erf_tail(a[tail]), x64[tail])
    out[np.isnan(x64)] = np.nan
    return out.reshape(x.shape).astype(x.dtype, copy=False)
