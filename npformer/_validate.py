"""Input checks shared by every layer pair.

A wrong input must raise a ``ValueError`` that a person can act on: it names the argument,
the value it had and what would be valid. It must never become a silently wrong answer
(NumPy would happily broadcast a (5,) bias onto a (3, 4) output, or turn int64 inputs into
float64 results, or carry a NaN all the way to the loss).

Every function here returns its (possibly converted) argument, so call sites read
``x = check_float(x, "x")``.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class NonFiniteError(ValueError):
    """NaN or ±inf where finite numbers are needed: in an input (check_float), or from finite
    inputs whose arithmetic overflowed (check_no_overflow, attention's scores). A
    ValueError; the trainer reads it as a divergence."""


# Inside a model's fused training step the values have been vouched for once (see
# finite_values_checked_once); check_float then checks type, dtype and rank but skips its scan.
_FINITE_CHECKED_ONCE = contextvars.ContextVar("npformer_finite_checked_once", default=False)


@contextlib.contextmanager
def finite_values_checked_once():
    """Within this block, ``check_float`` skips its O(n) NaN/inf scan (type, dtype and rank
    are still checked: those are O(1)).

    Why it is safe where the models use it (``layer_impl="numba"``): a model step validates
    its inputs at the door (token ids in range; ``inputs_embeds`` finite), the parameters
    are finite by construction (initialised, loaded through a checkpoint check, updated
    only with a finite gradient norm), so a NaN or inf inside the step can only come from
    an overflow of finite numbers. Those are caught where they would otherwise be silent
    (a norm's variance, attention scores: their overflow checks stay on) and otherwise
    propagate to the loss and the gradient norm, which the trainer checks once per step
    and reports as a divergence. A full ``isfinite`` pass over every layer's input cost
    7% of the default step.
    """
    token = _FINITE_CHECKED_ONCE.set(True)
    try:
        yield
    finally:
        _FINITE_CHECKED_ONCE.reset(token)


def check_float(x, name: str, *, allow_neg_inf: bool = False, min_ndim: int = 0) -> np.ndarray:
    """Require a float32/float64 ndarray with no NaN (and no inf unless allowed).

    allow_neg_inf: softmax accepts -inf as "this entry is masked out"; NaN and +inf
    are always refused. Inside :func:`finite_values_checked_once` the NaN/inf scan is skipped.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype}"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    if _FINITE_CHECKED_ONCE.get():
        return x
    if allow_neg_inf:
        bad = np.isnan(x) | (x == np.inf)
        if bad.any():
            raise NonFiniteError(
                f"{name} contains {int(bad.sum())} NaN or +inf value(s) "
                f"(first at index {np.unravel_index(int(np.argmax(bad)), x.shape)}); "
                "only finite values and -inf (masked) are allowed"
            )
    elif not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise NonFiniteError(
            f"{name} contains {int(bad.sum())} NaN or infinite value(s) "
            f"(first at index {np.unravel_index(int(np.argmax(bad)), x.shape)})"
        )
    return x


def check_no_overflow(statistic: np.ndarray, x: np.ndarray, where: str) -> None:
    """ValueError if a per-row statistic of finite inputs overflowed (±inf or NaN), e.g. the
    mean of squares of values near 1e20 in float32: a norm layer would otherwise return
    zeros, a wrong answer that no later check would notice."""
    bad = ~np.isfinite(statistic)
    if bad.any():
        raise NonFiniteError(
            f"{where} overflows {x.dtype} in {int(bad.sum())} row(s) (largest |x| is "
            f"{float(np.abs(x).max()):.3g}); scale the input down or compute in float64"
        )


def check_same_dtype(reference: np.ndarray, reference_name: str, **others) -> None:
    """All float tensors of one call must share a dtype (no silent float32 -> float64 upcast)."""
    for name, arr in others.items():
        if arr is not None and arr.dtype != reference.dtype:
            raise ValueError(
                f"{name} has dtype {arr.dtype} but {reference_name} has dtype {reference.dtype}; "
                "all floating-point inputs of one call must share one dtype"
            )


def check_shape(x: np.ndarray, expected: tuple, name: str, meaning: str = "") -> None:
    """Exact shape match; ``meaning`` names the axes, e.g. "(C,) with C = x.shape[-1]"."""
    if tuple(x.shape) != tuple(expected):
        extra = f" {meaning}" if meaning else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(x.shape)}")


def check_channel_params(x, **params) -> None:
    """A norm layer's inputs: x (..., C) float with C >= 1 channels, and each named parameter
    (gain w, bias b) None or a float (C,) array in x's dtype."""
    check_float(x, "x", min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x must have at least one channel (x.shape[-1] >= 1), got {x.shape}")
    for name, param in params.items():
        if param is not None:
            check_float(param, name)
            check_shape(param, (x.shape[-1],), name, "(C,) with C = x.shape[-1]")
    check_same_dtype(x, "x", **params)


def check_ids(ids, name: str, upper: int) -> np.ndarray:
    """Integer token ids with 0 <= id < upper (an ndarray, or a NumPy integer scalar)."""
    if isinstance(ids, np.integer):
        ids = np.asarray(ids)
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of integers, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= upper):
        bad = ids[(ids < 0) | (ids >= upper)]
        raise ValueError(
            f"{name} must lie in [0, {upper - 1}] (vocabulary size {upper}), "
            f"got out-of-range value(s) {bad[:5].tolist()}"
        )
    return ids


def check_probability(p, name: str, *, allow_one: bool = False) -> float:
    """A probability-like scalar in [0, 1) (or [0, 1] with allow_one)."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {type(p).__name__}")
    p = float(p)
    upper_ok = p <= 1.0 if allow_one else p < 1.0
    if not (p >= 0.0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {p}")
    return p


def check_int(value, name: str, minimum: int) -> int:
    """A Python or NumPy integer (not a bool, not a float) >= minimum."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_positive(value, name: str) -> float:
    """A finite number > 0 (eps, scale, cap ...)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.floating, np.integer)
    ):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_grad(dy: np.ndarray, expected_shape: tuple, dtype: np.dtype, name: str = "dy") -> np.ndarray:
    """An upstream gradient must match the forward output it belongs to."""
    dy = check_float(dy, name)
    check_shape(dy, expected_shape, name, "(the shape of the forward output)")
    if dy.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {dy.dtype} but the forward output has dtype {dtype}; "
            "pass the gradient in the forward's dtype"
        )
    return dy


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as a person reads a memory size)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"  # pragma: no cover


def physical_memory_bytes() -> int:
    """This machine's physical memory (``os.sysconf``); 16 GB where the platform cannot say."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - e.g. Windows
        return 16 * 10**9


def check_memory(nbytes: int, what: str, advice: str, limit: int = None) -> None:
    """Refuse, before allocating, an allocation of ``nbytes`` larger than ``limit`` (default:
    the machine's physical memory): the message says what needs how much, and what to do."""
    limit = physical_memory_bytes() if limit is None else limit
    if nbytes > limit:
        raise ValueError(
            f"{what} would need at least {format_bytes(nbytes)} of memory, more than the "
            f"{format_bytes(limit)} of this machine; {advice}"
        )
