"""Gradient check: ``dropout`` (training with p = 0.3, and the identity at inference)."""

import dataclasses

import numpy as np

from ..functional.dropout import dropout_backward, dropout_forward
from ..gradcheck import check_pair, register_check


def _seeded_dropout(x, p, seed, training=True):
    """Dropout whose mask is the same on every call: a fresh generator from ``seed`` each time.

    Finite differences evaluate the forward many times; with one shared generator every
    evaluation would draw a different mask and the differences would be noise.
    """
    return dropout_forward(x, p, np.random.default_rng(seed), training=training)


def _renamed(reports, tensor: str):
    return [dataclasses.replace(r, tensor=tensor) for r in reports]


@register_check("dropout")
def check_dropout():
    rng = np.random.default_rng(41)
    # x: (B=2, T=3, C=5), no entry near 0
    x = rng.standard_normal((2, 3, 5)) * 1.5 + 0.4
    train = {"x": x, "p": 0.3, "seed": 7}
    reports = _renamed(check_pair("dropout", _seeded_dropout, dropout_backward, train, ("x",)),
                       "x (p=0.3)")
    inference = {"x": x.copy(), "p": 0.3, "seed": 7, "training": False}
    reports += _renamed(
        check_pair("dropout", _seeded_dropout, dropout_backward, inference, ("x",)),
        "x (training=False)",
    )
    return reports
