"""Gradient checks: ``layernorm`` (x, weight, bias), ``rmsnorm`` (x, weight) and
``rmsnorm_unit_offset`` (Gemma's (1 + w) scale; the functional pair and the fused kernel)."""

import dataclasses

import numpy as np

from ..functional.layernorm import layernorm_backward, layernorm_forward
from ..functional.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..gradcheck import check_pair, register_check
from ..kernels import norms as norm_kernels


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


@register_check("rmsnorm_unit_offset")
def check_rmsnorm_unit_offset():
    rng = np.random.default_rng(33)
    # x: (B=2, T=3, C=7) with an offset; w spread around 0 (the scale 1 + w around 1), so a
    # backward that used w instead of 1 + w (or dropped the offset's gradient) would fail
    inputs = {
        "x": rng.standard_normal((2, 3, 7)) * 1.6 - 0.4,
        "weight": rng.standard_normal(7) * 0.6 - 0.2,
        "eps": 1e-6,
        "unit_offset": True,
    }
    reports = []
    for path, forward, backward in (
            ("reference", rmsnorm_forward, rmsnorm_backward),
            ("fused", norm_kernels.rmsnorm_forward, norm_kernels.rmsnorm_backward)):
        reports += [dataclasses.replace(r, tensor=f"{r.tensor} ({path})") for r in
                    check_pair("rmsnorm_unit_offset", forward, backward, inputs, ("x", "weight"))]
    return reports
