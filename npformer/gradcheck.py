"""Central finite-difference gradient checker, and the registry of named checks.

The idea
--------
For a scalar loss L(θ) and one entry θ_i, the central difference

    g_i ≈ (L(θ + h e_i) − L(θ − h e_i)) / 2h

has truncation error O(h²) (the even Taylor terms cancel) plus rounding error
O(ε_machine · |L| / h). In float64 with h = 1e-6 both are around 1e-10 for O(1)
quantities, which is why every check runs in float64: in float32 the rounding term alone
(~1e-7 / 1e-3) would swamp the comparison.

A layer pair ``y, cache = f(x, ...)`` / ``grads = f_backward(dy, cache)`` has no scalar loss,
so :func:`check_pair` makes one: a fixed random "probe" ``dy`` with ``L = Σ y ⊙ dy``. Then
∂L/∂y = dy exactly, and the backward called with that dy must return ∂L/∂x for every input.

Error measures (per tensor)
---------------------------
    max_abs_err = max_i |analytic_i − numeric_i|
    max_rel_err = max_abs_err / max_i max(|analytic_i|, |numeric_i|)

The relative error is taken against the tensor's largest gradient entry rather than entry
by entry: an entry whose true gradient is ~0 would otherwise turn harmless 1e-11 noise into
a "relative error" of 1. (A tensor whose analytic and numeric gradients are both below 1e-8
everywhere is a zero gradient seen through rounding noise, and passes.) This is the same ``max|a − b| ≤ rtol · max|ref|`` rule the PyTorch
parity tests use. A check passes when ``max_rel_err ≤ rtol`` (1e-6 by default).

Small tensors are checked at every entry; larger ones at ``max_entries`` entries drawn by a
seeded generator, so a failing run is reproducible.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

DEFAULT_STEP = 1e-6
DEFAULT_RTOL = 1e-6
DEFAULT_MAX_ENTRIES = 128
# A tensor whose analytic and numeric gradients both stay below this absolute level is a
# zero gradient measured through rounding noise (float64, h = 1e-6, O(1) losses: ~1e-10).
STRUCTURAL_ZERO_ATOL = 1e-8


@dataclass
class TensorReport:
    """The outcome for one tensor of one check."""

    name: str  # the check, e.g. "layernorm"
    tensor: str  # the differentiated input, e.g. "weight"
    max_abs_err: float
    max_rel_err: float
    passed: bool
    n_checked: int  # entries compared
    n_total: int  # entries in the tensor

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GradientEntries:
    """The entries one report summarises: the compared flat indices of a tensor of ``shape``
    and the analytic and numeric gradient at each (``npformer explain`` prints them)."""

    name: str
    tensor: str
    shape: tuple
    flat_indices: np.ndarray  # (n_checked,)
    analytic: np.ndarray  # (n_checked,)
    numeric: np.ndarray  # (n_checked,)


_ENTRY_RECORDERS: List[List[GradientEntries]] = []


@contextmanager
def recording_entries():
    """Within the block, every tensor :func:`check_gradients` compares appends its
    :class:`GradientEntries` to the yielded list, in the order of the reports."""
    entries: List[GradientEntries] = []
    _ENTRY_RECORDERS.append(entries)
    try:
        yield entries
    finally:
        _ENTRY_RECORDERS.pop()  # this block's list: recorders nest, last in first out


def _entries_to_check(size: int, max_entries: int, rng: np.random.Generator) -> np.ndarray:
    if size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_entries, replace=False))


def numerical_gradient(
    loss_fn: Callable[[], float], tensor: np.ndarray, flat_indices: np.ndarray, step: float
) -> np.ndarray:
    """Central differences of ``loss_fn()`` with respect to ``tensor`` at ``flat_indices``.

    ``tensor`` is perturbed in place and restored exactly after each entry, so ``loss_fn``
    simply reads the current values (the tensor may be a module's parameter).
    """
    flat = tensor.reshape(-1)  # a view: writing to it writes to tensor
    if not np.shares_memory(flat, tensor):
        raise ValueError("gradcheck needs tensors that can be perturbed in place (contiguous arrays)")
    grads = np.empty(len(flat_indices), dtype=np.float64)
    for k, i in enumerate(flat_indices):
        original = flat[i]
        flat[i] = original + step
        loss_plus = float(loss_fn())
        flat[i] = original - step
        loss_minus = float(loss_fn())
        flat[i] = original
        grads[k] = (loss_plus - loss_minus) / (2.0 * step)
    return grads


def compare(name: str, tensor_name: str, analytic: np.ndarray, numeric: np.ndarray,
            rtol: float, n_total: int) -> TensorReport:
    """Build the report for one tensor from matching analytic and numeric entries."""
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    abs_err = float(np.max(np.abs(analytic - numeric))) if analytic.size else 0.0
    scale = float(max(np.max(np.abs(analytic), initial=0.0), np.max(np.abs(numeric), initial=0.0)))
    if scale == 0.0:
        rel_err = 0.0 if abs_err == 0.0 else float("inf")
    elif scale <= STRUCTURAL_ZERO_ATOL:
        # Both gradients are zero up to rounding (e.g. a key bias: adding one vector to every
        # key shifts each score row by a constant, which softmax ignores). The numeric one is
        # then pure noise, which has no scale to be relative to.
        rel_err = 0.0
    else:
        rel_err = abs_err / scale
    passed = bool(np.isfinite(rel_err) and rel_err <= rtol and np.all(np.isfinite(analytic)))
    return TensorReport(name, tensor_name, abs_err, rel_err, passed, int(analytic.size), n_total)


def check_gradients(
    name: str,
    loss_fn: Callable[[], float],
    tensors: Mapping[str, np.ndarray],
    analytic: Mapping[str, np.ndarray],
    *,
    step: float = DEFAULT_STEP,
    rtol: float = DEFAULT_RTOL,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    seed: int = 0,
) -> List[TensorReport]:
    """Compare ``analytic[k]`` with finite differences of ``loss_fn`` for each ``tensors[k]``.

    This is the general form: ``loss_fn()`` takes no arguments and reads the current values
    of ``tensors`` (layer inputs captured in a closure, or a module's parameters).
    All tensors must be float64.
    """
    reports = []
    for index, (tensor_name, tensor) in enumerate(tensors.items()):
        if tensor.dtype != np.float64:
            raise ValueError(
                f"gradcheck runs in float64; tensor {tensor_name!r} has dtype {tensor.dtype}"
            )
        if tensor_name not in analytic or analytic[tensor_name] is None:
            raise ValueError(f"no analytic gradient given for tensor {tensor_name!r}")
        grad = np.asarray(analytic[tensor_name])
        if grad.shape != tensor.shape:
            raise ValueError(
                f"analytic gradient for {tensor_name!r} has shape {grad.shape}, "
                f"but the tensor has shape {tensor.shape}"
            )
        rng = np.random.default_rng([seed, index])
        flat_indices = _entries_to_check(tensor.size, max_entries, rng)
        numeric = numerical_gradient(loss_fn, tensor, flat_indices, step)
        compared = grad.reshape(-1)[flat_indices]
        for recorded in _ENTRY_RECORDERS:
            recorded.append(GradientEntries(name, tensor_name, tensor.shape, flat_indices,
                                            np.array(compared, dtype=np.float64), numeric))
        reports.append(compare(name, tensor_name, compared, numeric, rtol, tensor.size))
    return reports


def check_pair(
    name: str,
    forward: Callable,
    backward: Callable,
    inputs: Mapping[str, object],
    grad_names: Sequence[Optional[str]],
    *,
    seed: int = 0,
    step: float = DEFAULT_STEP,
    rtol: float = DEFAULT_RTOL,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> List[TensorReport]:
    """Check a ``forward(**inputs) -> (y, cache)`` / ``backward(dy, cache) -> grads`` pair.

    grad_names: names the outputs of ``backward`` in order (a single array counts as a
    one-tuple); ``None`` marks an output that is not checked (for example a bias gradient
    that is None). Every named input must be a float64 array; other inputs (integer ids,
    flags, generators made fresh by a factory) are passed through unchanged.

    The loss is ``L = Σ y ⊙ probe`` with a seeded random probe of y's shape.
    """
    inputs = dict(inputs)
    y, cache = forward(**inputs)
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal(np.shape(y))
    if np.ndim(y) == 0:
        probe = np.float64(probe)

    def loss_fn() -> float:
        out, _ = forward(**inputs)
        return float(np.sum(out * probe))

    grads = backward(probe, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(grad_names):
        raise ValueError(
            f"backward of {name!r} returned {len(grads)} gradient(s) but grad_names has "
            f"{len(grad_names)}: {list(grad_names)}"
        )
    analytic: Dict[str, np.ndarray] = {}
    tensors: Dict[str, np.ndarray] = {}
    for grad_name, grad in zip(grad_names, grads):
        if grad_name is None:
            continue
        if grad is None:
            raise ValueError(f"backward of {name!r} returned None for {grad_name!r}")
        analytic[grad_name] = grad
        tensors[grad_name] = inputs[grad_name]
    return check_gradients(
        name, loss_fn, tensors, analytic, step=step, rtol=rtol, max_entries=max_entries, seed=seed
    )


# --------------------------------------------------------------------------------------
# Registry of named checks (``npformer gradcheck`` runs them all)
# --------------------------------------------------------------------------------------

_REGISTRY: Dict[str, Callable[[], List[TensorReport]]] = {}

# Modules whose import registers checks; later work appends to this list.
CHECK_MODULES = (
    "npformer.checks.linear",
    "npformer.checks.embedding",
    "npformer.checks.normalization",
    "npformer.checks.activations",
    "npformer.checks.softmax",
    "npformer.checks.dropout",
    "npformer.checks.positions",
    "npformer.checks.attention",
    "npformer.checks.attention_gate",
    "npformer.checks.modules",
    "npformer.checks.fused_layers",
)


def register_check(name: str):
    """Decorator: ``@register_check("linear")`` on a function returning ``List[TensorReport]``."""

    def decorate(fn: Callable[[], List[TensorReport]]):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a gradient check named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def registered_checks() -> Dict[str, Callable[[], List[TensorReport]]]:
    """All registered checks by name (importing the modules that define them)."""
    for module in CHECK_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def run_checks(names: Optional[Iterable[str]] = None) -> List[TensorReport]:
    """Run the named checks (all when ``names`` is None) and return every tensor's report."""
    checks = registered_checks()
    selected = list(checks) if names is None else list(names)
    unknown = [n for n in selected if n not in checks]
    if unknown:
        raise ValueError(
            f"unknown gradient check(s) {unknown}; valid names: {', '.join(sorted(checks))}"
        )
    reports: List[TensorReport] = []
    for check_name in selected:
        reports.extend(checks[check_name]())
    return reports


def format_table(reports: Sequence[TensorReport]) -> str:
    """A fixed-width table: check, tensor, max abs err, max rel err, entries, pass/fail."""
    header = ("check", "tensor", "max abs err", "max rel err", "entries", "result")
    rows = [
        (
            r.name,
            r.tensor,
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            f"{r.n_checked}/{r.n_total}",
            "pass" if r.passed else "FAIL",
        )
        for r in reports
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    n_failed = sum(not r.passed for r in reports)
    lines.append(
        f"{len(reports) - n_failed} passed, {n_failed} failed "
        f"({len({r.name for r in reports})} checks, {len(reports)} tensors)"
    )
    return "\n".join(lines)
