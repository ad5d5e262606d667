"""Paired differences over seeds: the mean effect, its 95 % interval, and the verdict word.

Seed s gives every variant of a comparison the same batches in the same order, so the loss
of parent and child under seed s form a pair. The effect is the mean of the paired
differences d_s = child_s − parent_s (negative: the child reaches a lower loss). With n
pairs, mean d̄ and sample standard deviation s_d, Student's t interval is

    d̄ ± t_{n−1, 0.975} · s_d / √n

exact when the d_s are independent normal draws (the seeds are independent; normality is
the usual assumption at n = 3–5, stated in the report). The verdict reads the interval:
entirely below 0 → "better", entirely above 0 → "worse", containing 0 → "no difference
detected at this budget" (an interval that contains 0 does not show the effect is 0, only
that this budget cannot tell).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference detected at this budget"
CANNOT_COMPARE = "cannot compare"  # fewer than 2 complete pairs (e.g. diverged runs)


@dataclass(frozen=True)
class PairedDifference:
    """child − parent over paired seeds: mean, its interval [low, high], n pairs, the sample
    standard deviation of the differences, and the verdict word."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student t quantile t_{dof, (1 + confidence)/2}."""
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))


def paired_difference(parent: Sequence[Optional[float]], child: Sequence[Optional[float]],
                      confidence: float = 0.95, lower_is_better: bool = True) -> PairedDifference:
    """The paired effect child − parent. ``parent[s]`` and ``child[s]`` are seed s's values;
    a pair with a missing or non-finite value (a diverged run) is left out, and with fewer
    than 2 complete pairs the verdict is "cannot compare" (mean over what is left, no interval)."""
    if len(parent) != len(child):
        raise ValueError(f"paired values need one per seed on both sides, got {len(parent)} "
                         f"parent and {len(child)} child values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    pairs = [(p, c) for p, c in zip(parent, child)
             if p is not None and c is not None and math.isfinite(p) and math.isfinite(c)]
    d = np.array([c - p for p, c in pairs], dtype=np.float64)  # (n,)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return PairedDifference(mean, math.nan, math.nan, n, math.nan, confidence, CANNOT_COMPARE)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    child_lower = high < 0
    child_higher = low > 0
    if child_lower or child_higher:
        verdict = BETTER if child_lower == lower_is_better else WORSE
    else:
        verdict = NO_DIFFERENCE
    return PairedDifference(mean, low, high, n, sd, confidence, verdict)


def mean_interval(values: Sequence[float], confidence: float = 0.95):
    """(mean, low, high) of the finite values: the t interval of one variant's mean over
    seeds (for bands and tables; NaN bounds with fewer than 2 values)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan, math.nan
    half = t_quantile(confidence, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half
