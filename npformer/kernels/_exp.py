"""A vectorisable exp for the numba kernels: numba has no SVML here, so ``math.exp`` in a
loop is a scalar libm call (5–10× slower per element than a vector loop).

    exp(x) = 2ⁿ e^r,   n = round(x / ln 2),   r = x − n ln 2 ∈ [−ln2/2, ln2/2]

Cody–Waite range reduction (ln 2 split in two so that n · ln2_hi is exact), e^r by its Taylor
polynomial (degree 7 in float32, 13 in float64: the first omitted term is below each dtype's
rounding) and 2ⁿ put into the exponent bits by an integer add (:func:`_times_power_of_two`).
Arguments at or below ``floor`` (−87 float32, −708 float64, where e^x reaches the smallest
normal number), −inf and NaN give exactly 0.

- :func:`npformer.kernels.flash_attention._exp_tile` applies it to a tile of scores (its
  accuracy test: tests/test_flash_attention.py, ≤ 1 float32 / 2 float64 units of rounding);
- :func:`exp_nonpositive` is the same exp for one number x ≤ 0, inlined into elementwise
  loops (:mod:`.activations`: sigmoid, tanh, the normal density), where LLVM vectorises it.

Under ``NUMBA_DISABLE_JIT=1`` the plain Python versions run (``np.ldexp`` for the exponent
add): slower, the same values up to fused multiply-adds.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

# ---- x · 2ⁿ by an integer add on the exponent field --------------------------------------


def _times_power_of_two(x, n):
    """x · 2ⁿ for a float x and an integer-valued float n, when x and the result are normal
    numbers (as in _exp_tile). This plain version (``np.ldexp``) runs under
    ``NUMBA_DISABLE_JIT``; compiled, the overload below adds n to x's exponent field, which
    gives the same bits for normal results and vectorises."""
    return np.ldexp(x, int(n))


@intrinsic
def _same_bits(typingctx, x):
    """The same bits read as the other kind of number of that width: float32 ↔ int32,
    float64 ↔ int64 (a bitcast, no conversion)."""
    if isinstance(x, types.Float):
        other = types.int32 if x.bitwidth == 32 else types.int64
    else:
        other = types.float32 if x.bitwidth == 32 else types.float64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(other))

    return other(x), codegen


@overload(_times_power_of_two)
def _times_power_of_two_compiled(x, n):
    if x.bitwidth == 32:
        def times_power_of_two(x, n):  # exponent field: bits 23–30
            return _same_bits(np.int32(_same_bits(x) + (np.int32(n) << 23)))
    else:
        def times_power_of_two(x, n):  # exponent field: bits 52–62
            return _same_bits(np.int64(_same_bits(x) + (np.int64(n) << 52)))
    return times_power_of_two


# ---- constants of the vectorisable exp --------------------------------------------------


@functools.lru_cache(maxsize=None)  # one shared array per dtype; the kernels only read it
def _exp_constants(dtype):
    """[log2(e), ln2_hi, ln2_lo, floor, 1/2, 1/0!, 1/1!, …, 1/13!] in ``dtype``.

    ln2_hi + ln2_lo = ln 2 split so that n · ln2_hi is exact for the n that occur
    (Cody & Waite): fdlibm's split in float64, Cephes' in float32.
    """
    if dtype == np.float64:
        head = [1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10,
                -708.0, 0.5]
    else:
        head = [1.4426950408889634, 0.693359375, -2.12194440e-4, -87.0, 0.5]
    taylor = [1.0 / math.factorial(i) for i in range(14)]
    return np.array(head + taylor, dtype=dtype)


def _mantissa_bits(dtype) -> int:
    return 23 if dtype == np.float32 else 52


# ---- e^x for one x ≤ 0, inlined into elementwise kernels -----------------------------------


def exp_nonpositive(x):
    """e^x for a float32 or float64 number x ≤ 0 (0 at or below ``floor``, for −inf and NaN),
    in x's precision. Plain Python version (NUMBA_DISABLE_JIT); compiled, the overload below
    inlines the same arithmetic with the constants as literals, so that a loop calling it
    vectorises."""
    consts = _exp_constants(np.dtype(type(x)))
    log2e, ln2_hi, ln2_lo, floor, half = consts[:5]
    degree = 7 if consts.dtype == np.float32 else 13
    inside = x > floor
    x = x if inside else floor
    n = np.floor(x * log2e + half)
    r = (x - n * ln2_hi) - n * ln2_lo
    poly = consts[5 + degree]
    for power in range(degree - 1, -1, -1):  # Horner
        poly = poly * r + consts[5 + power]
    return _times_power_of_two(poly, n) if inside else consts.dtype.type(0.0)


@overload(exp_nonpositive)
def _exp_nonpositive_compiled(x):
    if not isinstance(x, types.Float):
        return None
    if x.bitwidth == 32:
        (log2e, ln2_hi, ln2_lo, floor, half, c0, c1, c2, c3, c4, c5, c6,
         c7) = (float(v) for v in _exp_constants(np.dtype(np.float32))[:13])

        def exp32(x):  # every constant cast to float32, so the arithmetic stays float32
            inside = x > np.float32(floor)
            x = x if inside else np.float32(floor)
            n = np.floor(x * np.float32(log2e) + np.float32(half))
            r = (x - n * np.float32(ln2_hi)) - n * np.float32(ln2_lo)
            poly = (((((((np.float32(c7) * r + np.float32(c6)) * r + np.float32(c5)) * r
                        + np.float32(c4)) * r + np.float32(c3)) * r + np.float32(c2)) * r
                     + np.float32(c1)) * r + np.float32(c0))
            return _times_power_of_two(poly, n) if inside else np.float32(0.0)

        return exp32
    (log2e, ln2_hi, ln2_lo, floor, half, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12,
     c13) = (float(v) for v in _exp_constants(np.dtype(np.float64)))

    def exp64(x):
        inside = x > floor
        x = x if inside else floor
        n = np.floor(x * log2e + half)
        r = (x - n * ln2_hi) - n * ln2_lo
        poly = (((((((((((((c13 * r + c12) * r + c11) * r + c10) * r + c9) * r + c8) * r
                    + c7) * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0)
        return _times_power_of_two(poly, n) if inside else 0.0

    return exp64
