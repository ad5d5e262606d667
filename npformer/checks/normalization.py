"""Gradient checks: ``layernorm`` (x, weight, bias) and ``rmsnorm`` (x, weight)."""

import numpy as np

from ..functional.layernorm import layernorm_backward, layernorm_forward
from ..functional.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..gradcheck import check_pair, register_check


@register_check("layernorm")
def check_layernorm():
    rng = np.random.default_rng(31)
    # x: (B=2, T=3, C=7), rows off-centre and wider than 1; weight not near 1, bias not near 0
    inputs = {
        "x": rng.standard_normal((2, 3, 7)) * 1.8 + 0.6,
        "weight": rng.standard_normal(7) * 0.7 + 1.1,
        "bias": rng.standard_normal(7) * 0.5 - 0.3,
        "eps": 1e-5,
    }
    return check_pair("layernorm", layernorm_forward, layernorm_backward, inputs,
                      ("x", "weight", "bias"))


@register_check("rmsnorm")
def check_rmsnorm():
    rng = np.random.default_rng(32)
    # x: (B=2, T=3, C=7) with an offset (RMSNorm does not centre, so the mean matters)
    inputs = {
        "x": rng.standard_normal((2, 3, 7)) * 1.6 - 0.4,
        "weight": rng.standard_normal(7) * 0.6 + 0.9,
        "eps": 1e-6,
    }
    return check_pair("rmsnorm", rmsnorm_forward, rmsnorm_backward, inputs, ("x", "weight"))
