"""Gradient checks through the fused layer kernels (``layer_impl="numba"``):

``fused_layernorm``, ``fused_rmsnorm``, ``fused_gelu``, ``fused_gelu_tanh``, ``fused_silu``,
``fused_swiglu``, ``fused_geglu``, ``fused_rope``, ``fused_residual_dropout``,
``fused_cross_entropy``, ``fused_embedding``.

The same inputs as the reference checks of each layer (checks/normalization.py,
activations.py, positions.py, dropout.py, softmax.py), differentiated by finite differences
of the kernel forward and compared with the kernel backward, float64. The whole-model checks
of every preset (checks/models.py) run through the fused path already: it is the models'
default.
"""

import dataclasses

import numpy as np

from ..functional.embedding import embedding_forward
from ..gradcheck import check_pair, register_check
from ..kernels import activations, embedding, norms, residual_dropout, rope
from ..kernels.cross_entropy import softmax_cross_entropy
from .activations import _glu_inputs, _x
from .positions import _rope_inputs


@register_check("fused_layernorm")
def check_fused_layernorm():
    rng = np.random.default_rng(31)
    # x: (B=2, T=3, C=7), rows off-centre and wider than 1; weight not near 1, bias not near 0
    inputs = {
        "x": rng.standard_normal((2, 3, 7)) * 1.8 + 0.6,
        "weight": rng.standard_normal(7) * 0.7 + 1.1,
        "bias": rng.standard_normal(7) * 0.5 - 0.3,
        "eps": 1e-5,
    }
    return check_pair("fused_layernorm", norms.layernorm_forward, norms.layernorm_backward,
                      inputs, ("x", "weight", "bias"))


@register_check("fused_rmsnorm")
def check_fused_rmsnorm():
    rng = np.random.default_rng(32)
    inputs = {"x": rng.standard_normal((2, 3, 7)) * 1.6 - 0.4,
              "weight": rng.standard_normal(7) * 0.6 + 0.9, "eps": 1e-6}
    return check_pair("fused_rmsnorm", norms.rmsnorm_forward, norms.rmsnorm_backward, inputs,
                      ("x", "weight"))


@register_check("fused_gelu")
def check_fused_gelu():
    inputs = {"x": _x(np.random.default_rng(12)), "approximate": "none"}
    return check_pair("fused_gelu", activations.gelu_forward, activations.gelu_backward,
                      inputs, ("x",))


@register_check("fused_gelu_tanh")
def check_fused_gelu_tanh():
    inputs = {"x": _x(np.random.default_rng(13)), "approximate": "tanh"}
    return check_pair("fused_gelu_tanh", activations.gelu_forward, activations.gelu_backward,
                      inputs, ("x",))


@register_check("fused_silu")
def check_fused_silu():
    inputs = {"x": _x(np.random.default_rng(14))}
    return check_pair("fused_silu", activations.silu_forward, activations.silu_backward,
                      inputs, ("x",))


def _glu_middle_inputs(seed: int, activation: str) -> dict:
    """The gated middle h = act(g) ⊙ u on the pre-activations a GLU layer would make."""
    glu = _glu_inputs(np.random.default_rng(seed))
    return {"g": glu["x"] @ glu["w_gate"].T, "u": glu["x"] @ glu["w_up"].T,
            "activation": activation, "approximate": "none"}


@register_check("fused_swiglu")
def check_fused_swiglu():
    return check_pair("fused_swiglu", activations.glu_forward, activations.glu_backward,
                      _glu_middle_inputs(15, "silu"), ("g", "u"))


@register_check("fused_geglu")
def check_fused_geglu():
    return check_pair("fused_geglu", activations.glu_forward, activations.glu_backward,
                      _glu_middle_inputs(16, "gelu"), ("g", "u"))


@register_check("fused_rope")
def check_fused_rope():
    reports = []
    for seed, head_size, layout, rotary_dim in ((33, 8, "half", None), (34, 8, "interleaved", None),
                                                (35, 10, "half", 6), (36, 10, "interleaved", 6)):
        inputs = _rope_inputs(seed, head_size, layout, rotary_dim)
        pair = check_pair("fused_rope", rope.rope_forward, rope.rope_backward, inputs, ("x",))
        reports += [dataclasses.replace(r, tensor=f"x ({layout}, rotary {rotary_dim or head_size}"
                                                  f" of {head_size})") for r in pair]
    return reports


def _seeded_residual_dropout(x, b, p, seed):
    """x + drop(b) with the same mask on every call (a fresh generator from ``seed``)."""
    return residual_dropout.residual_dropout_forward(x, b, p, np.random.default_rng(seed), True)


def _residual_dropout_backward(dy, cache):
    # forward: y = x + drop(b): dx = dy, db = drop'(dy)
    return dy.copy(), residual_dropout.dropout_backward(dy, cache)


@register_check("fused_residual_dropout")
def check_fused_residual_dropout():
    rng = np.random.default_rng(41)
    inputs = {"x": rng.standard_normal((2, 3, 5)) * 1.5 + 0.4,
              "b": rng.standard_normal((2, 3, 5)) * 0.8 - 0.2, "p": 0.3, "seed": 7}
    return check_pair("fused_residual_dropout", _seeded_residual_dropout,
                      _residual_dropout_backward, inputs, ("x", "b"))


def _fused_cross_entropy(logits, targets):
    """The trainer's head as a pair: the loss, and ∂loss/∂logits kept for the backward."""
    loss, dlogits = softmax_cross_entropy(logits, targets)
    return np.float64(loss), dlogits


def _fused_cross_entropy_backward(dloss, dlogits):
    return dloss * dlogits


@register_check("fused_cross_entropy")
def check_fused_cross_entropy():
    rng = np.random.default_rng(51)
    # logits (B=2, T=3, V=7) with a spread and an offset; one ignored target (-100)
    targets = rng.integers(0, 7, (2, 3))
    targets[1, 2] = -100
    inputs = {"logits": rng.standard_normal((2, 3, 7)) * 2.1 + 0.7, "targets": targets}
    return check_pair("fused_cross_entropy", _fused_cross_entropy, _fused_cross_entropy_backward,
                      inputs, ("logits",))


@register_check("fused_embedding")
def check_fused_embedding():
    rng = np.random.default_rng(21)
    # the reference check's repeats: token 3 four times, 5 twice; 0 and 6 never occur
    ids = np.array([[3, 1, 3, 5, 2, 3], [4, 5, 3, 1, 2, 2]])
    inputs = {"ids": ids, "weight": rng.standard_normal((7, 5)) * 0.8 + 0.2}
    return check_pair("fused_embedding", embedding_forward, embedding.embedding_backward, inputs,
                      ("weight",))
