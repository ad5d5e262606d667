"""Shared test helpers: parity tolerances from DESIGN.md and an error-reporting comparison."""

from __future__ import annotations

import numpy as np

# PyTorch parity, DESIGN.md: float64 within 1e-10 relative; float32 within 1e-4 relative
# (1e-5 absolute on O(1) values). The rule is max|a - b| <= atol + rtol * max|ref|.
PARITY = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=0.0),
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),
}

# Finite differences in float64: max relative error per tensor.
FD_RTOL = 1e-6


def max_errors(actual, expected):
    """(max abs error, max abs error / max|expected|) as floats."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return abs_err, (abs_err / scale if scale > 0 else abs_err)


def assert_close(actual, expected, dtype, what: str = "", rtol=None, atol=None):
    """Parity assertion with the DESIGN.md tolerance of ``dtype``; the message gives both errors."""
    tol = PARITY[np.dtype(dtype)]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    if hasattr(actual, "detach"):
        actual = actual.detach().numpy()
    if hasattr(expected, "detach"):
        expected = expected.detach().numpy()
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in result"
    abs_err, rel_err = max_errors(actual, expected)
    bound = atol + rtol * float(np.max(np.abs(expected), initial=0.0))
    assert abs_err <= bound, (
        f"{what}: max abs err {abs_err:.3e} > {bound:.3e} "
        f"(atol {atol:g} + rtol {rtol:g} * max|ref|); max rel err {rel_err:.3e}"
    )


def assert_gradcheck_passes(reports):
    """Every tensor of a finite-difference report within FD_RTOL."""
    assert reports, "the check produced no reports"
    for r in reports:
        assert r.max_rel_err <= FD_RTOL, (
            f"{r.name}/{r.tensor}: max rel err {r.max_rel_err:.3e} > {FD_RTOL:g} "
            f"(max abs err {r.max_abs_err:.3e})"
        )
        assert r.passed


def to_torch(array, requires_grad=False):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array).copy())
    if requires_grad:
        t.requires_grad_(True)
    return t
