"""Gradient checks of modules (every parameter and the input): ``mha_module``."""

import numpy as np

from ..gradcheck import check_gradients, register_check
from ..nn.attention import MultiHeadAttention


def check_module(name, module, forward, inputs, seed=0):
    """Finite differences of ``L = Σ y ⊙ probe`` for every parameter of ``module`` and the
    float64 arrays in ``inputs`` (a dict passed to ``forward(**inputs)``, which returns (y, cache)
    and whose backward is ``module.backward``)."""
    y, cache = forward(**inputs)
    probe = np.random.default_rng(seed).standard_normal(y.shape)
    module.zero_grad()
    dinputs = module.backward(probe, cache)
    if not isinstance(dinputs, tuple):
        dinputs = (dinputs,)
    analytic = dict(module.gradients())
    tensors = dict(module.parameters())
    for (input_name, value), grad in zip(inputs.items(), dinputs):
        analytic[input_name] = grad
        tensors[input_name] = value

    def loss():
        out, _ = forward(**inputs)
        return float(np.sum(out * probe))

    return check_gradients(name, loss, tensors, analytic, seed=seed)


def randomize_parameters(module, rng, scale=0.4):
    """Unusual non-zero values for every parameter (biases start at zero, which hides bugs)."""
    for _, value in module.named_parameters():
        value[...] = rng.standard_normal(value.shape) * scale + 0.05


@register_check("mha_module")
def check_mha_module():
    rng = np.random.default_rng(11)
    # grouped-query (H=4, K=2), head size 5, RoPE on part of each head, causal + window, biases
    mha = MultiHeadAttention(10, 4, 2, head_dim=5, rope=True, rotary_dim=4, window=3, rng=rng)
    randomize_parameters(mha, rng)
    x = rng.standard_normal((2, 5, 10)) * 0.8 + 0.1
    reports = check_module("mha_module", mha, lambda x: mha.forward(x), {"x": x})
    # the 2017 form: fused qkv, cross-attention over a memory of another length
    cross = MultiHeadAttention(6, 2, fused_qkv=True, causal=False, cross=True, rng=rng)
    randomize_parameters(cross, rng)
    inputs = {"x": rng.standard_normal((2, 3, 6)), "memory": rng.standard_normal((2, 4, 6)) - 0.2}
    for r in check_module("mha_module", cross, lambda x, memory: cross.forward(x, memory=memory), inputs):
        r.tensor = "cross/" + r.tensor
        reports.append(r)
    return reports
