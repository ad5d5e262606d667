"""Gradient check of gated attention (Bondarenko et al. 2023): ``attention_gate``.

The pair :func:`npformer.functional.attention_gate.head_gate_forward` (x, o, weight and bias
each checked; H = 3 heads of C/H = 4 channels, Dv = 5 ≠ C/H, logits spread over about ±3 so
σ is well into its curved part), then a grouped-query MultiHeadAttention with the gate
(head size 5 ≠ C/H, partial RoPE, causal window), every parameter and the input x.
"""

import numpy as np

from ..functional.attention_gate import head_gate_backward, head_gate_forward
from ..gradcheck import check_pair, register_check
from ..nn.attention import MultiHeadAttention
from .modules import check_module, randomize_parameters


@register_check("attention_gate")
def check_attention_gate():
    rng = np.random.default_rng(71)
    B, T, C, H, Dv = 2, 5, 12, 3, 5
    inputs = {
        "x": rng.standard_normal((B, T, C)) * 1.1 + 0.3,  # (B, T, C)
        "o": rng.standard_normal((B, H, T, Dv)) * 1.4 - 0.2,  # (B, H, T, Dv)
        "weight": rng.standard_normal((H, C // H)) * 0.6 + 0.1,  # (H, C/H)
        "bias": np.array([-1.1, 0.4, 1.7]),  # (H,): gates near 0.25, 0.6 and 0.85
    }
    reports = check_pair("attention_gate", head_gate_forward, head_gate_backward, inputs,
                         ("x", "o", "weight", "bias"))
    # the gate inside attention: x feeds q, k, v and the gate, and the four dx paths add
    mha = MultiHeadAttention(12, 4, 2, head_dim=5, rope=True, rotary_dim=4, window=3, attention_gate=True,
                             attention_impl="numpy", rng=rng)
    randomize_parameters(mha, rng)
    x = rng.standard_normal((2, 5, 12)) * 0.8 + 0.1
    for r in check_module("attention_gate", mha, lambda x: mha.forward(x), {"x": x}, seed=71):
        r.tensor = "mha/" + r.tensor
        reports.append(r)
    return reports
