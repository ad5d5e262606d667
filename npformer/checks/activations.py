"""Gradient checks: ``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``swiglu``, ``geglu`` and
``geglu_tanh``."""

import dataclasses

import numpy as np

from ..functional.gelu import gelu_backward, gelu_forward
from ..functional.glu import (geglu_backward, geglu_forward, geglu_tanh_backward,
                              geglu_tanh_forward, swiglu_backward, swiglu_forward)
from ..functional.relu import relu_backward, relu_forward
from ..functional.silu import silu_backward, silu_forward
from ..gradcheck import check_pair, register_check


def _x(rng: np.random.Generator) -> np.ndarray:
    # x: (B=2, T=3, C=5), spread over the curved part of the activations, off-centre
    return rng.standard_normal((2, 3, 5)) * 1.9 - 0.4


def _glu_inputs(rng: np.random.Generator) -> dict:
    # x: (B=2, T=3, C=5); F = 7; scales keep the gate pre-activations O(1)
    return {
        "x": rng.standard_normal((2, 3, 5)) * 1.3 + 0.2,
        "w_gate": rng.standard_normal((7, 5)) * 0.7,
        "w_up": rng.standard_normal((7, 5)) * 0.5 - 0.1,
        "w_down": rng.standard_normal((5, 7)) * 0.4,
    }


@register_check("relu")
def check_relu():
    x = _x(np.random.default_rng(11))
    x = np.sign(x) * (np.abs(x) + 0.05)  # at least 0.05 from the kink at 0 (step is 1e-6)
    return check_pair("relu", relu_forward, relu_backward, {"x": x}, ("x",))


@register_check("gelu")
def check_gelu():
    inputs = {"x": _x(np.random.default_rng(12)), "approximate": "none"}
    return check_pair("gelu", gelu_forward, gelu_backward, inputs, ("x",))


@register_check("gelu_tanh")
def check_gelu_tanh():
    inputs = {"x": _x(np.random.default_rng(13)), "approximate": "tanh"}
    return check_pair("gelu_tanh", gelu_forward, gelu_backward, inputs, ("x",))


@register_check("silu")
def check_silu():
    inputs = {"x": _x(np.random.default_rng(14))}
    return check_pair("silu", silu_forward, silu_backward, inputs, ("x",))


@register_check("swiglu")
def check_swiglu():
    inputs = _glu_inputs(np.random.default_rng(15))
    return check_pair(
        "swiglu", swiglu_forward, swiglu_backward, inputs, ("x", "w_gate", "w_up", "w_down")
    )


@register_check("geglu")
def check_geglu():
    inputs = _glu_inputs(np.random.default_rng(16))
    return check_pair(
        "geglu", geglu_forward, geglu_backward, inputs, ("x", "w_gate", "w_up", "w_down")
    )


@register_check("geglu_tanh")
def check_geglu_tanh():
    """The whole tanh-GeGLU FFN pair, and the fused middle h = gelu_tanh(g) ⊙ u of
    ``layer_impl="numba"`` (kernels/activations.py) on the pre-activations it would see."""
    from ..kernels import activations as activation_kernels

    inputs = _glu_inputs(np.random.default_rng(17))
    reports = check_pair("geglu_tanh", geglu_tanh_forward, geglu_tanh_backward, inputs,
                         ("x", "w_gate", "w_up", "w_down"))
    middle = {"g": inputs["x"] @ inputs["w_gate"].T * 2.0, "u": inputs["x"] @ inputs["w_up"].T,
              "activation": "gelu", "approximate": "tanh"}  # g spread over the curved part
    reports += [dataclasses.replace(r, tensor=f"{r.tensor} (fused middle)") for r in
                check_pair("geglu_tanh", activation_kernels.glu_forward,
                           activation_kernels.glu_backward, middle, ("g", "u"))]
    return reports
