"""The model's attention implementation: the numba kernels (the default) and the NumPy
reference are interchangeable — same logits, same gradients, same cached decoding — for every
preset; the clipped softmax, which the kernels do not implement, falls back to the reference.

The kernels themselves are tested against the reference in tests/test_flash_attention.py;
this file checks the wiring (which path each layer takes, every option passed through).
"""

import numpy as np
import pytest

from helpers import assert_close, forward_backward, modules_of, random_weight_model
from npformer.functional.attention import attention_backward, attention_forward
from npformer.kernels.flash_attention import flash_attention_backward, flash_attention_forward
from npformer.nn.attention import MultiHeadAttention
from npformer.presets import preset_names, tiny_config

# kernel vs reference: the tolerances of tests/test_flash_attention.py
KERNEL_TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _model(name, impl, dtype="float64", **overrides):
    return random_weight_model(name, dtype, attention_impl=impl, **overrides)


def _attention_modules(model):
    """Every MultiHeadAttention in the model (self- and cross-attention)."""
    return modules_of(model, MultiHeadAttention)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", preset_names())
def test_kernels_and_reference_give_the_same_model(name, dtype):
    kernel, reference = _model(name, "numba", dtype), _model(name, "numpy", dtype)
    modules = _attention_modules(kernel)
    assert modules and all(m.core == (flash_attention_forward, flash_attention_backward)
                           for m in modules)
    assert all(m.core == (attention_forward, attention_backward)
               for m in _attention_modules(reference))
    logits_k, grads_k = forward_backward(kernel)
    logits_r, grads_r = forward_backward(reference)
    tol = KERNEL_TOL[np.float64 if dtype == "float64" else np.float32]
    scale = max(float(np.max(np.abs(g))) for g in grads_r.values())
    assert_close(logits_k, logits_r, np.dtype(dtype), "logits", rtol=tol, atol=0.0)
    # Key-bias gradients are zero by structure (softmax ignores a shift shared by a row) and
    # come out as rounding noise on both sides: an absolute floor of 10 ulps of the model's
    # largest gradient (1e-6 of it in float32, 2e-15 in float64) covers that noise only.
    floor = 10 * np.finfo(dtype).eps * scale
    for key, g in grads_r.items():
        assert_close(grads_k[key], g, np.dtype(dtype), key, rtol=tol, atol=floor)


def test_the_default_is_the_kernel_and_clipped_softmax_falls_back():
    assert tiny_config("llama2").attention_impl == "numba"
    clipped = _model("gpt2", "numba", softmax="clipped")
    assert all(m.core == (attention_forward, attention_backward)
               for m in _attention_modules(clipped))
    logits_k, grads_k = forward_backward(clipped)
    logits_r, grads_r = forward_backward(_model("gpt2", "numpy", softmax="clipped"))
    assert np.array_equal(logits_k, logits_r)
    for key in grads_r:
        assert np.array_equal(grads_k[key], grads_r[key])


@pytest.mark.parametrize("name", ["gpt2", "gpt3", "llama2", "palm"])
def test_cached_decoding_through_the_kernel_equals_the_reference(name):
    from npformer.generate import generate

    kernel, reference = _model(name, "numba").eval(), _model(name, "numpy").eval()
    prompt = np.array([1, 2, 3])
    a = generate(kernel, prompt, 12, temperature=1.0, seed=5, use_cache=True)
    b = generate(reference, prompt, 12, temperature=1.0, seed=5, use_cache=True)
    c = generate(kernel, prompt, 12, temperature=1.0, seed=5, use_cache=False)
    assert list(a) == list(b) == list(c)


def test_softcap_and_softmax1_reach_the_kernel():
    for overrides in (dict(softmax="softmax1"), dict(attention_softcap=2.0)):
        kernel, reference = _model("gpt2", "numba", **overrides), _model("gpt2", "numpy", **overrides)
        assert all(m.core[0] is flash_attention_forward for m in _attention_modules(kernel))
        logits_k, grads_k = forward_backward(kernel)
        logits_r, grads_r = forward_backward(reference)
        assert_close(logits_k, logits_r, np.float64, str(overrides), rtol=1e-12)
        plain_logits, _ = forward_backward(_model("gpt2", "numba"))
        assert not np.allclose(plain_logits, logits_k)  # the option really changed the model


def test_bad_attention_impl_is_refused_by_config_and_module():
    with pytest.raises(ValueError, match="attention_impl='torch' is invalid"):
        tiny_config("gpt2", attention_impl="torch")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        MultiHeadAttention(8, 2, attention_impl="torch")
