"""Gradient checks: ``sinusoidal``, ``learned_positions``, ``rope_half``, ``rope_interleaved``,
``rope_partial``."""

import dataclasses

import numpy as np

from ..functional.positions import (
    learned_positions_backward,
    learned_positions_forward,
    sinusoidal_backward,
    sinusoidal_forward,
)
from ..functional.rope import rope_backward, rope_forward
from ..gradcheck import check_pair, register_check

# (B=2, T=5) positions as in packed documents: each row restarts at 0 when a new document
# begins, so positions repeat within a row and between rows, and are not arange(T)
PACKED_POSITIONS = np.array([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])


@register_check("sinusoidal")
def check_sinusoidal():
    rng = np.random.default_rng(31)
    # x (B=2, T=5, C=6) with an offset and scale; positions from a KV-cache-like offset
    inputs = {
        "x": rng.standard_normal((2, 5, 6)) * 1.4 - 0.3,
        "position_ids": np.arange(5) + 7,
        "base": 10000.0,
    }
    return check_pair("sinusoidal", sinusoidal_forward, sinusoidal_backward, inputs, ("x",))


@register_check("learned_positions")
def check_learned_positions():
    rng = np.random.default_rng(32)
    # x (B=2, T=5, C=4), table (P=7, C=4): position 1 occurs 3 times, 0 and 2 twice; 5 and 6
    # never occur, so their rows must get exactly zero gradient
    inputs = {
        "x": rng.standard_normal((2, 5, 4)) * 0.9 + 0.4,
        "table": rng.standard_normal((7, 4)) * 1.2 - 0.1,
        "position_ids": PACKED_POSITIONS,
    }
    return check_pair("learned_positions", learned_positions_forward, learned_positions_backward,
                      inputs, ("x", "table"))


def _rope_inputs(seed: int, head_size: int, layout: str, rotary_dim=None) -> dict:
    rng = np.random.default_rng(seed)
    # x (B=2, H=3, T=5, D) queries or keys, offset and scaled; (B, T) packed positions
    return {
        "x": rng.standard_normal((2, 3, 5, head_size)) * 1.6 + 0.25,
        "position_ids": PACKED_POSITIONS,
        "theta": 10000.0,
        "rotary_dim": rotary_dim,
        "layout": layout,
    }


@register_check("rope_half")
def check_rope_half():
    inputs = _rope_inputs(33, 8, "half")
    return check_pair("rope_half", rope_forward, rope_backward, inputs, ("x",))


@register_check("rope_interleaved")
def check_rope_interleaved():
    inputs = _rope_inputs(34, 8, "interleaved")
    return check_pair("rope_interleaved", rope_forward, rope_backward, inputs, ("x",))


@register_check("rope_partial")
def check_rope_partial():
    # D = 10, rotary_dim = 6 (GPT-NeoX's rotary_pct = 0.6; GPT-J's rotary_dim < D):
    # channels 6..9 pass through; both layouts pair channels inside the first 6 only
    reports = []
    for seed, layout in ((35, "half"), (36, "interleaved")):
        inputs = _rope_inputs(seed, 10, layout, rotary_dim=6)
        pair = check_pair("rope_partial", rope_forward, rope_backward, inputs, ("x",))
        reports += [dataclasses.replace(r, tensor=f"x ({layout})") for r in pair]
    return reports
