"""erf kernel: the numba loop equals its NumPy twin; shapes, dtypes, known values, torch.erf."""

import math

import numpy as np
import pytest
import torch

from helpers import assert_close
from npformer.kernels.erf import erf, erf_reference

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (2, 3, 4, 5)]
KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}  # DESIGN.md


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(dtype, shape):
    rng = np.random.default_rng(len(shape) * 7 + sum(shape))
    x = np.asarray(rng.standard_normal(shape) * 2.1 + 0.15).astype(dtype)  # 0-d stays an array
    fast, slow = erf(x), erf_reference(x)
    assert isinstance(fast, np.ndarray) and isinstance(slow, np.ndarray)
    assert fast.shape == shape and slow.shape == shape
    assert fast.dtype == dtype and slow.dtype == dtype
    err = float(np.max(np.abs(fast.astype(np.float64) - slow), initial=0.0))
    assert err <= KERNEL_TOL[np.dtype(dtype)], f"kernel vs reference: max abs err {err:.3e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_contiguous_input_and_input_untouched(dtype):
    x = (np.random.default_rng(3).standard_normal((6, 8)) * 1.5).astype(dtype)
    view = x[::2, 1::3].T  # strided, transposed
    before = x.copy()
    out = erf(view)
    assert out.shape == view.shape and out.dtype == dtype
    np.testing.assert_array_equal(out, erf_reference(view))
    np.testing.assert_array_equal(x, before)


def test_known_values():
    x = np.array([0.0, 0.5, -0.5, 1.0, -2.0, 3.5, 1e4, -1e4, np.inf, -np.inf])
    expected = np.array([math.erf(v) for v in x])
    np.testing.assert_array_equal(erf(x), expected)
    assert erf(x)[0] == 0.0 and erf(x)[6] == 1.0 and erf(x)[7] == -1.0
    assert erf(np.array(1.0)) == pytest.approx(0.8427007929497149, abs=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch_erf(dtype):
    x = (np.random.default_rng(5).standard_normal((4, 9)) * 2.5 - 0.3).astype(dtype)
    assert_close(erf(x), torch.erf(torch.from_numpy(x)), dtype, "erf")


def test_float32_is_rounded_from_float64():
    x = (np.random.default_rng(6).standard_normal(50) * 2).astype(np.float32)
    np.testing.assert_array_equal(erf(x), erf(x.astype(np.float64)).astype(np.float32))


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        erf(np.arange(3))
    with pytest.raises(ValueError, match="numpy.ndarray"):
        erf([0.1, 0.2])
    with pytest.raises(ValueError, match="floating-point"):
        erf_reference(np.arange(3))
