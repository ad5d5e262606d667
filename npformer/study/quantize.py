"""Post-training int8 quantization, simulated in NumPy (fake quantization), and its loss cost.

Weights: symmetric per-tensor, b bits (8 by default). With m = max|W| (or an MSE-chosen
clipping range, below) and n = 2^(b−1) − 1 (127):

    s = m / n,   q = clip(round(W / s), −n, n),   Ŵ = s · q

every Linear weight inside the blocks (q, k, v, out_proj, ffn up, down and the gated FFN's
gate) and the attention gate's ``gate_weight`` when present. The embeddings, positions,
norms, biases, the learned sink logits and the head stay in the model's float dtype.
``weight_range="mse"`` picks m among 100 candidates m_k = (k/100)·max|W| as the one whose Ŵ
is closest to W in squared error (Bondarenko et al.'s MSE range); "minmax" (the default)
uses max|W|.

Activations: asymmetric per-tensor, unsigned b bits (255 levels for 8), at fixed
("static") ranges calibrated before evaluation. The range of a point is the running
[min, max] of its values over the calibration batches — held-out batches, not the evaluation
ones — widened to contain 0 (as PyTorch's MinMaxObserver: zero, e.g. a ReLU's or padding's,
is then exact and the zero point a valid unsigned integer). With [lo, hi] that range and
n = 2^b − 1 (255):

    s = (hi − lo) / n,   z = round(−lo / s) ∈ [0, n],   q = clip(round(x / s) + z, 0, n),
    x̂ = s · (q − z)

so values outside the calibrated range are clipped to its ends (to the nearest multiple of
s: the grid is {s·(k − z)}, within s/2 of [lo, hi] at each end). A range of width 0 (all
calibration values 0) maps everything to 0. Rounding is NumPy's, half to even.
Quantization points (see :mod:`.instrument`): the embedding output entering block 0, each
block's output (the residual stream), the input of every Linear in the blocks, and the
attention's input when an attention gate reads it. Attention probabilities, the softmax, the
norms' statistics and the head stay float. Ranges are calibrated with the mode's weights (W8
in W8A8) and float activations.

Modes are "W<b>A<b>", "W<b>" or "A<b>" with 2 ≤ b ≤ 16: "W8A8", "W8" (weights only), "A8"
(activations only), "W16A16" (a check: nearly lossless). :func:`quantized_losses` reports
the mean token cross-entropy over the evaluation batches (the trainer's inputs x and
targets y: the next tokens) of the float model and of each mode, and their differences.
"""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from .._validate import check_float, check_int
from .instrument import Probe, batch_inputs, block_linears, instrumented, readable_copy

WEIGHT_RANGES = ("minmax", "mse")
MSE_CANDIDATES = 100
_MODE = re.compile(r"^(?:W(\d+))?(?:A(\d+))?$")


class SymmetricQuantized(NamedTuple):
    values: np.ndarray  # the dequantized values s · q, x's dtype
    scale: float  # s


class AsymmetricQuantized(NamedTuple):
    values: np.ndarray  # s · (q − z), x's dtype
    scale: float  # s
    zero_point: int  # z


def _check_bits(bits) -> int:
    bits = check_int(bits, "bits", 2)
    if bits > 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits}")
    return bits


def _finite_number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def quantize_symmetric(x: np.ndarray, bits: int = 8, max_abs: Optional[float] = None
                       ) -> SymmetricQuantized:
    """Symmetric per-tensor fake quantization: s = m / (2^(b−1) − 1), m = ``max_abs`` or
    max|x|; values clip(round(x / s), −n, n) · s. m = 0 (x all zero) gives zeros, s = 0."""
    x = check_float(x, "x")
    n = 2 ** (_check_bits(bits) - 1) - 1
    m = float(np.max(np.abs(x), initial=0.0)) if max_abs is None else _finite_number(max_abs,
                                                                                   "max_abs")
    if m < 0:
        raise ValueError(f"max_abs must be ≥ 0, got {m}")
    if m == 0:
        return SymmetricQuantized(np.zeros_like(x), 0.0)
    scale = m / n
    q = np.clip(np.round(x.astype(np.float64) / scale), -n, n)
    return SymmetricQuantized((q * scale).astype(x.dtype), scale)


def quantize_asymmetric(x: np.ndarray, lo: float, hi: float, bits: int = 8
                        ) -> AsymmetricQuantized:
    """Asymmetric per-tensor fake quantization to the range [lo, hi] widened to contain 0:
    s = (hi − lo) / (2^b − 1), z = round(−lo / s), values (clip(round(x / s) + z, 0, n) − z)·s.
    """
    x = check_float(x, "x")
    n = 2 ** _check_bits(bits) - 1
    lo, hi = _finite_number(lo, "lo"), _finite_number(hi, "hi")
    if lo > hi:
        raise ValueError(f"the range needs lo ≤ hi, got lo={lo}, hi={hi}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero is representable
    if hi == lo:  # == 0: nothing but zero was seen
        return AsymmetricQuantized(np.zeros_like(x), 0.0, 0)
    scale = (hi - lo) / n
    zero_point = int(np.clip(np.round(-lo / scale), 0, n))
    q = np.clip(np.round(x.astype(np.float64) / scale) + zero_point, 0, n)
    return AsymmetricQuantized(((q - zero_point) * scale).astype(x.dtype), scale, zero_point)


def mse_range(w: np.ndarray, bits: int = 8) -> float:
    """The symmetric clipping range m ∈ {(k/100)·max|w|, k = 1 … 100} that minimises
    Σ (Ŵ − W)²; the first (smallest) on ties."""
    w = check_float(w, "w")
    top = float(np.max(np.abs(w), initial=0.0))
    if top == 0:
        return 0.0
    candidates = top * np.arange(1, MSE_CANDIDATES + 1) / MSE_CANDIDATES
    errors = [float(np.sum((quantize_symmetric(w, bits, m).values.astype(np.float64) - w) ** 2))
              for m in candidates]
    return float(candidates[int(np.argmin(errors))])


def parse_mode(mode) -> Tuple[Optional[int], Optional[int]]:
    """"W8A8" → (8, 8), "W8" → (8, None), "A8" → (None, 8): (weight bits, activation bits)."""
    match = _MODE.match(mode) if isinstance(mode, str) else None
    if match is None or mode == "":
        raise ValueError(f"unknown quantization mode {mode!r}; valid: 'W<b>A<b>', 'W<b>' or "
                         "'A<b>' with 2 ≤ b ≤ 16, e.g. 'W8A8', 'W8', 'A8'")
    weight_bits, activation_bits = (None if g is None else int(g) for g in match.groups())
    for bits in (weight_bits, activation_bits):
        if bits is not None and not 2 <= bits <= 16:
            raise ValueError(f"quantization mode {mode!r}: bits must lie in [2, 16], got {bits}")
    return weight_bits, activation_bits


def quantized_weight_names(model) -> list:
    """The parameters :func:`quantize_weights` replaces: every Linear weight inside the
    blocks and each attention gate weight."""
    names = [f"{name}.weight" for name, _ in block_linears(model)]
    names += [f"layers.{layer}.attn.gate_weight" for layer, block in enumerate(model.layers)
              if "gate_weight" in block.attn.params]
    return names


def quantize_weights(model, bits: int = 8, weight_range: str = "minmax") -> None:
    """Replace those weights of ``model`` (a :func:`readable_copy`) by their quantized values,
    in place."""
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range must be one of {list(WEIGHT_RANGES)}, got {weight_range!r}")
    params = model.parameters()
    for name in quantized_weight_names(model):
        w = params[name]
        m = mse_range(w, bits) if weight_range == "mse" else None
        w[...] = quantize_symmetric(w, bits, m).values


class _RangeObserver(Probe):
    """Running [min, max] of every quantization point; changes nothing."""

    def __init__(self) -> None:
        self.ranges: Dict[str, Tuple[float, float]] = {}

    def point(self, name: str, x: np.ndarray) -> np.ndarray:
        lo, hi = float(x.min()), float(x.max())
        if name in self.ranges:
            old_lo, old_hi = self.ranges[name]
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        self.ranges[name] = (lo, hi)
        return x


class _ActivationQuantizer(Probe):
    def __init__(self, ranges: Dict[str, Tuple[float, float]], bits: int) -> None:
        self.ranges, self.bits = ranges, bits

    def point(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in self.ranges:
            raise ValueError(f"no calibrated range for the quantization point {name!r}; the "
                             f"ranges cover {sorted(self.ranges)}")
        lo, hi = self.ranges[name]
        return quantize_asymmetric(x, lo, hi, self.bits).values


def _forward_all(model, inputs) -> None:
    for x, doc_ids in inputs:
        model.forward(x, doc_ids=doc_ids)
        model._last_cache = None  # evaluation only: free the activations


def calibrate_activations(model, calibration_batches, weight_bits: Optional[int] = None,
                          weight_range: str = "minmax") -> Dict[str, Tuple[float, float]]:
    """{point: (min, max)} over ``calibration_batches`` (only those), the forward run with
    weights quantized to ``weight_bits`` (None: float) and float activations."""
    copy = readable_copy(model)
    inputs = batch_inputs(calibration_batches, copy, "calibration_batches")
    if weight_bits is not None:
        quantize_weights(copy, _check_bits(weight_bits), weight_range)
    return _observed_ranges(copy, inputs)


def _observed_ranges(copy, inputs) -> Dict[str, Tuple[float, float]]:
    """{point: (min, max)} of a readable copy's forward over ``inputs`` (checked batches)."""
    observer = _RangeObserver()
    with instrumented(copy, observer):
        _forward_all(copy, inputs)
    return observer.ranges


def _loss_batches(batches, model, what: str) -> list:
    """Trainer batches (x, y[, doc_ids]) with x and y (B, T) of one shape."""
    batch_inputs(batches, model, what)  # the list and each x
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)):
            raise ValueError(f"{what}[{i}] must be a trainer batch (x, y[, doc_ids]) with the "
                             f"targets y, got a {type(batch).__name__}")
        y = batch[1]
        if (not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer)
                or y.shape != batch[0].shape):
            raise ValueError(f"{what}[{i}]: the targets y must be an integer array of the shape "
                             f"of x {batch[0].shape}, got {getattr(y, 'dtype', type(y).__name__)}"
                             f" of shape {getattr(y, 'shape', None)}")
    return list(batches)


def quantized_losses(model, calibration_batches, eval_batches, modes=("W8A8", "W8", "A8"),
                     weight_range: str = "minmax") -> dict:
    """Mean token cross-entropy of ``model`` (left unchanged) over ``eval_batches`` (trainer
    batches (x, y[, doc_ids])) in float and in each quantization mode, with activation ranges
    calibrated on ``calibration_batches`` (held out: not the evaluation batches):

        {"fp32": L, "W8A8": L_q, ..., "delta": {"W8A8": L_q − L, ...}}

    "fp32" is the float model in its own dtype, evaluated on the same readable path.
    """
    from ..tour.jobs import mean_nll  # the trainer's loss: mean −log p(y | x) per token

    parsed = {}
    if isinstance(modes, str) or not isinstance(modes, (list, tuple)) or not modes:
        raise ValueError(f"modes must be a non-empty list of modes such as ('W8A8', 'W8', "
                         f"'A8'), got {modes!r}")
    for mode in modes:
        parsed[mode] = parse_mode(mode)
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range must be one of {list(WEIGHT_RANGES)}, got {weight_range!r}")
    copy = readable_copy(model)
    eval_batches = _loss_batches(eval_batches, copy, "eval_batches")
    calibration = batch_inputs(calibration_batches, copy, "calibration_batches")
    float_weights = {name: w.copy() for name, w in copy.parameters().items()}

    with instrumented(copy):
        result = {"fp32": float(mean_nll(copy, eval_batches))}
    for mode, (weight_bits, activation_bits) in parsed.items():
        if weight_bits is not None:
            quantize_weights(copy, weight_bits, weight_range)
        probe = None
        if activation_bits is not None:  # ranges seen with this mode's weights
            probe = _ActivationQuantizer(_observed_ranges(copy, calibration), activation_bits)
        with instrumented(copy, probe):
            result[mode] = float(mean_nll(copy, eval_batches))
        for name, w in copy.parameters().items():
            w[...] = float_weights[name]
    result["delta"] = {mode: result[mode] - result["fp32"] for mode in parsed}
    return result
