"""The NumPy erf of npformer.functional (the exact GeLU's Φ) against math.erf and torch.erf.

Accuracy in units of the last place (ulp) of math.erf's value: glibc's erf is itself within
about one ulp, so "≤ 2" allows ours one ulp plus its own. Measured on the 1.4 million points
below: max 2 ulp in float64 (7e-5 of the points above 1 ulp), and in float32 every value
equal to math.erf's rounded to float32.
"""

import math

import numpy as np
import pytest
import torch

from helpers import assert_close
from npformer.functional.erf import erf


def _sample(n):
    rng = np.random.default_rng(7)
    return np.concatenate([
        rng.uniform(-7.0, 7.0, n), rng.standard_normal(n) * 2.0,
        rng.uniform(-1.0, 1.0, n), rng.uniform(1.0, 6.0, n),  # each formula densely
        np.linspace(-6.5, 6.5, n + 1),  # through both seams, |x| = 1 and |x| = 6
        np.logspace(-320, 300, n // 4), -np.logspace(-320, 300, n // 4),  # subnormal to huge
        np.nextafter(1.0, [0.0, 2.0]), np.nextafter(6.0, [0.0, 7.0]), [-1.0, 1.0],
    ])


def test_float64_within_two_units_of_math_erf():
    x = _sample(250_000)  # 1.4 million points
    expected = np.array([math.erf(v) for v in x])
    got = erf(x)
    assert got.dtype == np.float64 and got.shape == x.shape
    units = np.abs(got - expected) / np.spacing(np.abs(expected))
    assert units.max() <= 2, (units.max(), x[np.argmax(units)])
    assert np.all(np.abs(got) <= 1.0)


def test_float32_is_math_erf_rounded():
    x = _sample(50_000)
    x = x[np.abs(x) < 1e30].astype(np.float32)  # float32's range
    expected = np.array([math.erf(float(v)) for v in x]).astype(np.float32)
    got = erf(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    units = np.abs(got.astype(np.float64) - expected) / np.spacing(np.abs(expected))
    assert units.max() <= 1, (units.max(), x[np.argmax(units)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_erf(dtype):
    x = (np.random.default_rng(3).standard_normal((4, 257)) * 3).astype(dtype)
    assert_close(erf(x), torch.erf(torch.from_numpy(x)).numpy(), dtype, "erf")


def test_special_values_and_shapes():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6.0, -6.0, 1e300, -1e-310, 1.0])
    got = erf(x)
    assert got[0] == 0.0 and not np.signbit(got[0]) and got[1] == 0.0 and np.signbit(got[1])
    assert list(got[2:4]) == [1.0, -1.0] and np.isnan(got[4])
    assert list(got[5:8]) == [1.0, -1.0, 1.0] and got[8] == math.erf(-1e-310)
    assert got[9] == pytest.approx(0.8427007929497149, abs=1e-16)
    scalar = erf(np.array(0.5))  # 0-d in, 0-d out
    assert scalar.shape == () and scalar == pytest.approx(math.erf(0.5), abs=1e-16)
    view = np.linspace(-3, 3, 24).reshape(4, 6)[:, ::2]  # non-contiguous
    np.testing.assert_array_equal(erf(view), erf(np.ascontiguousarray(view)))
    assert erf(np.zeros((2, 0))).shape == (2, 0)
    x = np.array([0.3, -2.0])
    erf(x)
    assert list(x) == [0.3, -2.0]  # the input is not written to


def test_same_algorithm_as_the_kernels_erf():
    # npformer.kernels.erf.erf_float64 (the fused GeLU's) uses the same coefficients; the two
    # differ only by fused multiply-adds and the exp, so they agree to an ulp or two
    from numba import njit

    from npformer.kernels.erf import erf_float64

    @njit
    def kernel_erf(x, out):
        for i in range(x.shape[0]):
            out[i] = erf_float64(x[i])

    x = _sample(20_000)
    kernel = np.empty_like(x)
    kernel_erf(x, kernel)
    units = np.abs(erf(x) - kernel) / np.spacing(np.abs(kernel))
    assert units.max() <= 2


def test_refuses_non_float_input():
    with pytest.raises(ValueError, match="x must be a floating-point array"):
        erf(np.arange(3))
    with pytest.raises(ValueError, match="x must be a numpy.ndarray, got list"):
        erf([0.1, 0.2])
