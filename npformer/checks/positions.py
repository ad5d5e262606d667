"""Gradient checks: ``sinusoidal``, ``learned_positions``, ``rope_half``, ``rope_interleaved``,
``rope_partial``, and the scaled RoPE schedules ``rope_linear``, ``rope_dynamic``,
``rope_yarn``, ``rope_llama3``."""

import dataclasses

import numpy as np

from ..functional.positions import (
    learned_positions_backward,
    learned_positions_forward,
    sinusoidal_backward,
    sinusoidal_forward,
)
from ..functional.rope import RopeScaling, rope_backward, rope_forward
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


# Scaled RoPE: positions beyond the original length L₀ = 64 (up to 150), theta = 500 and
# rotary_dim = 8 so that the four pairs fall in different bands of yarn's ramp (γ = 0, ½, 1, 1)
# and of llama3's wavelengths (kept, smoothed, slowed, slowed); yarn's attention factor ≠ 1.
LONG_POSITIONS = np.array([[0, 63, 64, 101, 150], [7, 149, 65, 3, 120]])
SCALINGS = {
    "rope_linear": RopeScaling("linear", rope_factor=2.5),
    "rope_dynamic": RopeScaling("dynamic", rope_factor=3.0, rope_original_max_seq_len=64),
    "rope_yarn": RopeScaling("yarn", rope_factor=4.0, rope_original_max_seq_len=64),
    "rope_llama3": RopeScaling("llama3", rope_factor=8.0, rope_original_max_seq_len=64),
}


def _check_scaled(name: str, seed: int):
    reports = []
    for offset, layout in enumerate(("half", "interleaved")):
        inputs = _rope_inputs(seed + offset, 10, layout, rotary_dim=8)  # D = 10: 2 pass through
        inputs.update(position_ids=LONG_POSITIONS, theta=500.0, scaling=SCALINGS[name])
        pair = check_pair(name, rope_forward, rope_backward, inputs, ("x",))
        reports += [dataclasses.replace(r, tensor=f"x ({layout})") for r in pair]
    return reports


@register_check("rope_linear")
def check_rope_linear():
    return _check_scaled("rope_linear", 37)


@register_check("rope_dynamic")
def check_rope_dynamic():
    return _check_scaled("rope_dynamic", 39)


@register_check("rope_yarn")
def check_rope_yarn():
    return _check_scaled("rope_yarn", 41)


@register_check("rope_llama3")
def check_rope_llama3():
    return _check_scaled("rope_llama3", 43)
