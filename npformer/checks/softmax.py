"""Gradient checks: ``softmax``, ``log_softmax``, ``sink_softmax``, ``cross_entropy``,
``cross_entropy_smoothing``, ``final_softcap`` (Gemma 2's soft-capped logits at the
language-model head)."""

import dataclasses

import numpy as np

from ..functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..functional.softmax import (
    log_softmax_backward,
    log_softmax_forward,
    softmax_backward,
    softmax_forward,
)
from ..functional.softmax_variants import sink_softmax_backward, sink_softmax_forward
from ..gradcheck import check_pair, register_check


def _renamed(reports, tensor: str):
    """Give the reports of one of several pairs in a check a telling tensor name."""
    return [dataclasses.replace(r, tensor=tensor) for r in reports]


def _targets(rng: np.random.Generator, shape: tuple, vocab: int, ignore_index: int, n_ignored: int):
    targets = rng.integers(0, vocab, size=shape)  # (...) class ids
    flat = targets.reshape(-1)
    flat[rng.choice(flat.size, size=n_ignored, replace=False)] = ignore_index
    return targets


@register_check("softmax")
def check_softmax():
    rng = np.random.default_rng(11)
    # along the last axis: x (B=2, H=3, T=2, S=5), scores with an offset and a wide spread
    last = {"x": rng.standard_normal((2, 3, 2, 5)) * 2.1 + 0.4, "axis": -1}
    reports = _renamed(check_pair("softmax", softmax_forward, softmax_backward, last, ("x",)),
                       "x (axis=-1)")
    # along a middle axis, with masks: x (2, 6, 3) over axis 1; two masked entries and one
    # fully masked slice, whose output and gradient must be exactly 0
    middle = rng.standard_normal((2, 6, 3)) * 1.3 - 0.8
    middle[0, 2, 1] = middle[1, 4, 0] = -np.inf
    middle[1, :, 2] = -np.inf
    inputs = {"x": middle, "axis": 1}
    reports += _renamed(check_pair("softmax", softmax_forward, softmax_backward, inputs, ("x",)),
                        "x (axis=1, masked)")
    return reports


@register_check("log_softmax")
def check_log_softmax():
    rng = np.random.default_rng(12)
    last = {"x": rng.standard_normal((3, 2, 7)) * 1.9 - 0.6, "axis": -1}
    reports = _renamed(
        check_pair("log_softmax", log_softmax_forward, log_softmax_backward, last, ("x",)),
        "x (axis=-1)",
    )
    first = {"x": rng.standard_normal((4, 3, 2)) * 1.4 + 0.9, "axis": 0}
    reports += _renamed(
        check_pair("log_softmax", log_softmax_forward, log_softmax_backward, first, ("x",)),
        "x (axis=0)",
    )
    return reports


@register_check("sink_softmax")
def check_sink_softmax():
    """p = exp(x) / (exp(s) + Σ exp(x)) along the last axis: x and the sink s. One sink per
    (batch, head), broadcast over the T rows (as attention shares one per head), so ds sums
    those rows; two masked entries and one fully masked row (p = 0, dx = 0 and ds = 0 from
    it, exactly)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 3, 4, 6)) * 1.8 + 0.5  # (B=2, H=3, T=4, S=6)
    x[0, 1, 2, 3] = x[1, 2, 0, 5] = -np.inf
    x[1, 0, 3, :] = -np.inf
    sink = rng.standard_normal((2, 3, 1, 1)) * 1.5 + 0.7  # (B, H, 1, 1): one per (b, h)

    def backward(dp, cache):
        dx, dsink_rows = sink_softmax_backward(dp, cache)  # (..., S), (B, H, T, 1)
        return dx, dsink_rows.sum(axis=2, keepdims=True)  # Σ over the T rows sharing it

    return check_pair("sink_softmax", sink_softmax_forward, backward, {"x": x, "sink": sink},
                      ("x", "sink"))


@register_check("cross_entropy")
def check_cross_entropy():
    rng = np.random.default_rng(13)
    # logits (B=2, T=5, V=7); three of the ten targets are ignore_index
    inputs = {
        "logits": rng.standard_normal((2, 5, 7)) * 2.2 + 0.3,
        "targets": _targets(rng, (2, 5), 7, -100, 3),
        "ignore_index": -100,
    }
    return check_pair("cross_entropy", cross_entropy_forward, cross_entropy_backward, inputs,
                      ("logits",))


@register_check("cross_entropy_smoothing")
def check_cross_entropy_smoothing():
    rng = np.random.default_rng(14)
    # logits (B=3, T=4, V=6), label smoothing 0.1, a non-default ignore_index on two targets
    inputs = {
        "logits": rng.standard_normal((3, 4, 6)) * 1.7 - 0.5,
        "targets": _targets(rng, (3, 4), 6, -1, 2),
        "ignore_index": -1,
        "label_smoothing": 0.1,
    }
    return check_pair("cross_entropy_smoothing", cross_entropy_forward, cross_entropy_backward,
                      inputs, ("logits",))


@register_check("final_softcap")
def check_final_softcap():
    """The head ``logits = c · tanh(s · (x W_tokᵀ + b) / c)`` of a tiny decoder (tied table,
    logit_scale s = 0.7, a head bias, cap c = 2): x, the table and the bias, with logits
    spread from the linear part of tanh into its saturation (|z| up to ~3c)."""
    from ..config import ModelConfig
    from ..gradcheck import check_gradients
    from ..models import build_model

    config = ModelConfig(vocab_size=9, d_model=6, n_heads=2, n_layers=1, max_seq_len=8,
                         logit_scale=0.7, lm_head_bias=True, final_logit_softcap=2.0)
    model = build_model(config, seed=5)
    rng = np.random.default_rng(61)
    table = model.parameters()["embed.tokens.weight"]
    table[...] = rng.standard_normal(table.shape) * 0.9 + 0.1
    bias = model.parameters()["lm_head_bias"]
    bias[...] = rng.standard_normal(bias.shape) * 0.8
    x = rng.standard_normal((2, 3, 6)) * 1.2 - 0.3  # (B, T, C)
    probe = rng.standard_normal((2, 3, 9))  # L = Σ logits ⊙ probe

    logits, cache = model._head_forward(x)
    model.zero_grad()
    dx = model._head_backward(probe, cache)
    grads = model.gradients()

    def loss():
        return float(np.sum(model._head_forward(x)[0] * probe))

    return check_gradients("final_softcap", loss,
                           {"x": x, "embed.tokens.weight": table, "lm_head_bias": bias},
                           {"x": dx, "embed.tokens.weight": grads["embed.tokens.weight"],
                            "lm_head_bias": grads["lm_head_bias"]}, seed=61)
