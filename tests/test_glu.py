"""swiglu / geglu: finite differences, PyTorch parity (the same composition in torch ops),
large gate pre-activations, shape validation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.glu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from npformer.gradcheck import check_pair, run_checks

GRAD_NAMES = ("x", "w_gate", "w_up", "w_down")
# name -> (numpy forward, numpy backward, torch activation, extra forward kwargs)
VARIANTS = {
    "swiglu": (swiglu_forward, swiglu_backward, F.silu, {}),
    "geglu": (geglu_forward, geglu_backward, F.gelu, {"approximate": "none"}),
    "geglu_tanh": (
        geglu_forward, geglu_backward, lambda g: F.gelu(g, approximate="tanh"),
        {"approximate": "tanh"},
    ),
}
X_SHAPES = [(6,), (3, 6), (2, 3, 6), (2, 1, 3, 6)]  # C = 6


def _inputs(rng, x_shape, ffn_width, dtype=np.float64, gate_scale=0.7):
    width = x_shape[-1]
    return {
        "x": (rng.standard_normal(x_shape) * 1.4 + 0.2).astype(dtype),
        "w_gate": (rng.standard_normal((ffn_width, width)) * gate_scale).astype(dtype),
        "w_up": (rng.standard_normal((ffn_width, width)) * 0.5 - 0.1).astype(dtype),
        "w_down": (rng.standard_normal((width, ffn_width)) * 0.4).astype(dtype),
    }


def _torch_glu(inputs, torch_act, dy):
    """The same FFN written with torch ops; returns y and every gradient from autograd."""
    x, wg, wu, wd = (to_torch(inputs[k], True) for k in GRAD_NAMES)
    y = (torch_act(x @ wg.T) * (x @ wu.T)) @ wd.T
    y.backward(to_torch(dy))
    return y, x.grad, wg.grad, wu.grad, wd.grad


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("x_shape", [(5,), (4, 5), (2, 3, 5), (3, 1, 2, 5)])
def test_finite_differences(variant, x_shape):
    forward, backward, _, kwargs = VARIANTS[variant]
    inputs = {**_inputs(np.random.default_rng(len(x_shape) + 70), x_shape, 7), **kwargs}
    assert_gradcheck_passes(check_pair(variant, forward, backward, inputs, GRAD_NAMES))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape", X_SHAPES)
def test_torch_parity(variant, dtype, x_shape):
    forward, backward, torch_act, kwargs = VARIANTS[variant]
    rng = np.random.default_rng(sum(x_shape) + len(variant))
    inputs = _inputs(rng, x_shape, 11, dtype)
    y, cache = forward(**inputs, **kwargs)
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = backward(dy, cache)

    expected = _torch_glu(inputs, torch_act, dy)
    assert y.shape == x_shape and y.dtype == dtype
    assert_close(y, expected[0], dtype, f"{variant} y")
    for grad_name, grad, grad_t in zip(GRAD_NAMES, grads, expected[1:]):
        assert grad.dtype == dtype and grad.shape == inputs[grad_name].shape
        assert_close(grad, grad_t, dtype, f"{variant} d{grad_name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_gate_preactivations(variant, dtype):
    # gate pre-activations g = x W_gateᵀ reach about ±1e4: the activations saturate
    forward, backward, torch_act, kwargs = VARIANTS[variant]
    rng = np.random.default_rng(8)
    inputs = _inputs(rng, (2, 3, 6), 9, dtype, gate_scale=3000.0)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = forward(**inputs, **kwargs)
        g_abs_max = np.abs(cache.gate.x @ cache.gate.weight.T).max()
        dy = rng.standard_normal(y.shape).astype(dtype)
        grads = backward(dy, cache)
    assert g_abs_max > 5e3
    expected = _torch_glu(inputs, torch_act, dy)
    assert_close(y, expected[0], dtype, f"{variant} y")
    for grad_name, grad, grad_t in zip(GRAD_NAMES, grads, expected[1:]):
        assert grad.dtype == dtype
        assert_close(grad, grad_t, dtype, f"{variant} d{grad_name}")


def test_independent_caches():
    rng = np.random.default_rng(9)
    first = _inputs(rng, (3, 5), 7)
    y1, cache1 = swiglu_forward(**first)
    dy = rng.standard_normal(y1.shape)
    grads_before = swiglu_backward(dy, cache1)
    swiglu_forward(**_inputs(rng, (3, 5), 7))  # a second call must not disturb cache1
    for a, b in zip(grads_before, swiglu_backward(dy, cache1)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs():
    rng = np.random.default_rng(10)
    good = _inputs(rng, (2, 5), 7)
    x, wg, wu, wd = (good[k] for k in GRAD_NAMES)
    with pytest.raises(ValueError, match="w_up must have shape \\(7, 5\\)"):
        swiglu_forward(x, wg, np.ones((7, 4)), wd)
    with pytest.raises(ValueError, match="w_down must have shape \\(5, 7\\)"):
        swiglu_forward(x, wg, wu, np.ones((7, 5)))
    with pytest.raises(ValueError, match="x has 4 features"):
        swiglu_forward(np.ones((2, 4)), wg, wu, wd)
    with pytest.raises(ValueError, match="w_gate must be 2-D"):
        geglu_forward(x, np.ones(5), wu, wd)
    with pytest.raises(ValueError, match="w_up has dtype float32"):
        swiglu_forward(x, wg, wu.astype(np.float32), wd)
    with pytest.raises(ValueError, match="floating-point"):
        swiglu_forward(np.ones((2, 5), dtype=np.int64), wg, wu, wd)
    with pytest.raises(ValueError, match="w_down contains 1 NaN"):
        bad = wd.copy()
        bad[0, 0] = np.nan
        swiglu_forward(x, wg, wu, bad)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        swiglu_forward(np.array(1.0), wg, wu, wd)
    with pytest.raises(ValueError, match="approximate must be one of 'none', 'tanh'"):
        geglu_forward(x, wg, wu, wd, approximate="sigmoid")
    _, cache = geglu_forward(x, wg, wu, wd)
    with pytest.raises(ValueError, match="dy must have shape"):
        geglu_backward(np.ones((2, 7)), cache)
    with pytest.raises(ValueError, match="dtype"):
        geglu_backward(np.ones((2, 5), dtype=np.float32), cache)
