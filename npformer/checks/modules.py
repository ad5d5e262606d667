"""Gradient checks of modules (every parameter and the input): ``mha_module``, ``qk_norm``
(attention with Qwen3 / Gemma 3 q/k norms) and ``sandwich_block`` (Gemma 2's block)."""

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


def _renamed(reports, prefix: str):
    for r in reports:
        r.tensor = prefix + r.tensor
    return reports


@register_check("qk_norm")
def check_qk_norm():
    """q/k norms inside grouped-query attention with partial RoPE after them, plain (Qwen3)
    and with the unit offset (Gemma 3), through the reference and the fused layer paths. The
    norm weights are drawn unusual, so a gradient summed over the wrong axes would fail."""
    reports = []
    for seed, unit_offset, impl in ((12, False, "numpy"), (13, True, "numpy"), (14, True, "numba")):
        rng = np.random.default_rng(seed)
        # H=4, K=2, head size D=6 ≠ C/H, RoPE on 4 of the 6, causal window 3, biases on q/k/v
        mha = MultiHeadAttention(10, 4, 2, head_dim=6, rope=True, rotary_dim=4, window=3,
                                 qk_norm=True, qk_norm_eps=1e-6, norm_unit_offset=unit_offset,
                                 layer_impl=impl, attention_impl=impl, out_bias=False, rng=rng)
        randomize_parameters(mha, rng)
        for norm in (mha.q_norm, mha.k_norm):
            norm.params["weight"][...] = rng.standard_normal(6) * 0.3 + (0.0 if unit_offset else 1.0)
        x = rng.standard_normal((2, 5, 10)) * 0.8 + 0.1
        label = f"{'unit offset' if unit_offset else 'plain'}, {impl}/"
        reports += _renamed(check_module("qk_norm", mha, lambda x: mha.forward(x), {"x": x},
                                         seed=seed), label)
    return reports


@register_check("sandwich_block")
def check_sandwich_block():
    """Gemma 2's block x + drop(m(branch(n(x)))) with dropout on (the same masks in every
    evaluation: a fresh generator per forward), for a LayerNorm GeLU model and for Gemma's
    RMSNorm (1 + w) with q/k norms and the tanh GeGLU, on both layer paths."""
    from ..config import ModelConfig
    from ..models.blocks import Dropout, SequentialBlock

    reports = []
    variants = (
        ("layernorm", dict(norm="layernorm", ffn="gelu", layer_impl="numpy", attention_impl="numpy")),
        ("gemma, numpy", dict(norm="rmsnorm", norm_bias=False, norm_unit_offset=True, qk_norm=True,
                              ffn="geglu_tanh", ffn_bias=False, layer_impl="numpy",
                              attention_impl="numpy")),
        ("gemma, numba", dict(norm="rmsnorm", norm_bias=False, norm_unit_offset=True, qk_norm=True,
                              ffn="geglu_tanh", ffn_bias=False)),
    )
    for seed, (label, fields) in enumerate(variants, start=21):
        config = ModelConfig(vocab_size=7, d_model=8, n_heads=2, head_dim=6, d_ff=12, n_layers=1,
                             max_seq_len=8, positions="rope", sandwich_norm=True, dropout=0.2,
                             **fields)
        rng = np.random.default_rng(seed)
        block = SequentialBlock(config, 0, rng)
        randomize_parameters(block, rng)
        for name, value in block.named_parameters():
            if name.endswith("norm.weight"):
                offset = 0.0 if config.norm_unit_offset else 1.0
                value[...] = rng.standard_normal(value.shape) * 0.3 + offset
        x = rng.standard_normal((2, 5, 8)) * 0.9 - 0.2

        def forward(x, block=block, config=config):
            dropout = Dropout(config.dropout, np.random.default_rng(99), True,
                              fused=config.layer_impl == "numba")
            return block.forward(x, dropout)

        reports += _renamed(check_module("sandwich_block", block, forward, {"x": x}, seed=seed),
                            f"{label}/")
    return reports
