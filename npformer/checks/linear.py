"""Gradient checks: ``linear`` and ``linear_nobias``."""

import numpy as np

from ..functional.linear import linear_backward, linear_forward
from ..gradcheck import check_pair, register_check


def _inputs(rng: np.random.Generator, with_bias: bool) -> dict:
    # x: (B=2, T=3, in=5) with an offset so rows are not centred; weight (out=7, in=5)
    inputs = {
        "x": rng.standard_normal((2, 3, 5)) * 1.7 + 0.3,
        "weight": rng.standard_normal((7, 5)) * 0.6,
    }
    inputs["bias"] = rng.standard_normal(7) if with_bias else None
    return inputs


@register_check("linear")
def check_linear():
    inputs = _inputs(np.random.default_rng(1), with_bias=True)
    return check_pair("linear", linear_forward, linear_backward, inputs, ("x", "weight", "bias"))


@register_check("linear_nobias")
def check_linear_nobias():
    inputs = _inputs(np.random.default_rng(2), with_bias=False)
    return check_pair("linear_nobias", linear_forward, linear_backward, inputs, ("x", "weight", None))
