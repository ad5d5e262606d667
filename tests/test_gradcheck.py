"""The finite-difference checker itself: it must pass right gradients and catch wrong ones."""

import numpy as np
import pytest

from npformer.functional.linear import linear_backward, linear_forward
from npformer.gradcheck import (
    check_gradients,
    check_pair,
    compare,
    format_table,
    registered_checks,
    run_checks,
)

# Every name the foundation promises in the registry (later work adds more).
FOUNDATION_CHECKS = [
    "linear", "linear_nobias", "embedding", "layernorm", "rmsnorm", "relu", "gelu",
    "gelu_tanh", "silu", "swiglu", "geglu", "softmax", "log_softmax", "cross_entropy",
    "cross_entropy_smoothing", "dropout",
]


def test_registry_has_every_foundation_check():
    missing = [name for name in FOUNDATION_CHECKS if name not in registered_checks()]
    assert not missing, f"missing registered checks: {missing}"


def test_every_registered_check_passes():
    reports = run_checks()
    assert {r.name for r in reports} >= set(FOUNDATION_CHECKS)
    failed = [(r.name, r.tensor, r.max_rel_err) for r in reports if not r.passed]
    assert not failed, f"failing checks: {failed}"
    assert max(r.max_rel_err for r in reports) <= 1e-6


def _wrong_linear_backward(dy, cache):
    dx, dw, db = linear_backward(dy, cache)
    return dx, dw * 1.001, db  # a 0.1% error in one tensor


def test_checker_catches_a_wrong_gradient():
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((3, 4)), "weight": rng.standard_normal((2, 4)),
              "bias": rng.standard_normal(2)}
    reports = check_pair("broken", linear_forward, _wrong_linear_backward, inputs,
                         ("x", "weight", "bias"))
    by_tensor = {r.tensor: r for r in reports}
    assert by_tensor["x"].passed and by_tensor["bias"].passed
    assert not by_tensor["weight"].passed
    assert 5e-4 < by_tensor["weight"].max_rel_err < 2e-3


def test_checker_catches_a_transposed_gradient():
    # a classic bug: dW = x^T dy instead of dy^T x has the wrong shape -> refused outright
    rng = np.random.default_rng(1)
    inputs = {"x": rng.standard_normal((3, 4)), "weight": rng.standard_normal((4, 4)), "bias": None}

    def transposed(dy, cache):
        dx, dw, _ = linear_backward(dy, cache)
        return dx, dw.T, None

    reports = check_pair("transposed", linear_forward, transposed, inputs, ("x", "weight", None))
    assert not {r.tensor: r for r in reports}["weight"].passed


def test_large_tensor_is_sampled_reproducibly():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 30))

    def loss():
        return float(np.sum(np.sin(w)))

    first = check_gradients("sin", loss, {"w": w}, {"w": np.cos(w)}, max_entries=50, seed=3)
    second = check_gradients("sin", loss, {"w": w}, {"w": np.cos(w)}, max_entries=50, seed=3)
    assert first[0].n_checked == 50 and first[0].n_total == 1200
    assert first[0].max_abs_err == second[0].max_abs_err
    assert first[0].passed


def test_tensors_are_restored_after_perturbation():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 3))
    before = w.copy()
    check_gradients("square", lambda: float(np.sum(w**2)), {"w": w}, {"w": 2 * w})
    assert np.array_equal(w, before)


def test_relative_error_definition():
    report = compare("c", "t", np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 4.004]), 1e-6, 3)
    assert report.max_abs_err == pytest.approx(0.004)
    assert report.max_rel_err == pytest.approx(0.004 / 4.004)
    assert not report.passed
    zero = compare("c", "t", np.zeros(3), np.zeros(3), 1e-6, 3)
    assert zero.passed and zero.max_rel_err == 0.0


def test_bad_usage_is_refused():
    w32 = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="float64"):
        check_gradients("c", lambda: 0.0, {"w": w32}, {"w": w32})
    with pytest.raises(ValueError, match="unknown gradient check"):
        run_checks(["no_such_check"])


def test_format_table_marks_failures():
    reports = [compare("a", "x", np.ones(2), np.ones(2), 1e-6, 2),
               compare("b", "y", np.ones(2), np.full(2, 2.0), 1e-6, 2)]
    table = format_table(reports)
    assert "FAIL" in table and "pass" in table
    assert table.splitlines()[-1].startswith("1 passed, 1 failed")
