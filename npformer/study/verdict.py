"""The study's pre-registered verdict rule, written before the full run and applied mechanically.

The rule has two parts, and the report prints this module's ``RULE_TEXT`` verbatim above the
results it is applied to.

1. The positive control (the baseline, softmax): the claim under test is that a variant
   *tames* outliers, which can only be tested where there are outliers to tame. Over the
   paired seeds, the baseline passes the control when all three hold:

   - its max ∞-norm grows from the early step (the first measurement after initialisation)
     to the end of training: the 95 % interval of the mean log-ratio log(end / early) lies
     above 0;
   - its mean kurtosis grows the same way;
   - simulated W8A8 costs measurable loss at the end: the mean increase of the validation loss
     over float32 is at least ``MIN_W8A8_COST`` nats and its 95 % interval lies above 0.

   If the control fails, every variant's verdict is CANNOT_TELL: a null result in a setting
   without outliers is not a refutation.

2. Each variant against the baseline, at the end of training, paired by seed:
   r = log(max ∞-norm of the variant / of the baseline) and
   q = W8A8 cost of the variant − W8A8 cost of the baseline (costs in nats over float32):

   - YES when the point estimates reach the thresholds and both intervals exclude 0:
     mean r ≤ log(1 / ``MIN_INF_NORM_FACTOR``) (≥ 2× smaller ∞-norm) with the interval of r
     below 0, and mean q ≤ −``MIN_W8A8_REDUCTION`` × (the baseline's mean W8A8 cost) (≥ 50 %
     less) with the interval of q below 0;
   - NO when an interval excludes reaching a threshold: the interval of r lies entirely above
     log(1/2) (the ∞-norm is shown to shrink by less than 2×), or the interval of q lies
     entirely above −50 % of the baseline's cost (the W8A8 cost is shown to shrink by less
     than half);
   - CANNOT_TELL otherwise (including fewer than 2 complete pairs).

Everything else the report shows (float32 loss, kurtosis, first-token and unassigned mass,
W8 and A8 alone) is described with intervals but takes no part in the verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..tour.stats import PairedDifference, paired_difference

YES, NO, CANNOT_TELL = "yes", "no", "cannot tell"
MIN_INF_NORM_FACTOR = 2.0  # "tames outliers": the max ∞-norm at least this many times smaller
MIN_W8A8_REDUCTION = 0.5  # and the W8A8 loss increase at least this fraction smaller
# nats: the baseline's W8A8 cost the positive control requires. Chosen, like the budget, after
# a baseline-only pilot and before any variant ran: the gpt2 preset at d_model 128, 4 layers,
# 1500 steps (seed 0) reached max ∞-norm 29.5 and kurtosis 9.5, and W8A8 cost +0.0016 nats —
# far below the 0.02 nats the research notes suggested, which no budget that runs here in
# 90 minutes is likely to reach. 0.001 nats (a tenth of a percent of perplexity) is a cost
# that is small but not rounding: the same model evaluated on the readable and the fused
# paths differs by ~1e-6 nats.
MIN_W8A8_COST = 0.001
CONFIDENCE = 0.95

RULE_TEXT = f"""\
Positive control (baseline, paired over seeds, 95 % t intervals): the max ∞-norm and the mean
kurtosis both grow from the first measurement after initialisation to the end of training
(interval of the mean log-ratio above 0), and simulated W8A8 raises the final validation loss
by at least {MIN_W8A8_COST} nats on average with its interval above 0. If the control fails, every
variant is "{CANNOT_TELL}".
Per variant, at the end of training, paired with the baseline by seed: r = log(max ∞-norm ratio),
q = W8A8 loss increase of the variant − of the baseline.
"{YES}": mean r ≤ log(1/{MIN_INF_NORM_FACTOR:g}) with r's interval below 0, AND mean q ≤ −{MIN_W8A8_REDUCTION:g} × the baseline's
mean W8A8 increase with q's interval below 0.
"{NO}": r's interval entirely above log(1/{MIN_INF_NORM_FACTOR:g}), OR q's interval entirely above
−{MIN_W8A8_REDUCTION:g} × the baseline's mean W8A8 increase.
"{CANNOT_TELL}": anything else (including fewer than 2 complete pairs)."""


def _log(values: Sequence[Optional[float]]):
    return [None if v is None or not math.isfinite(v) or v <= 0 else math.log(v) for v in values]


def log_ratio(before: Sequence[Optional[float]], after: Sequence[Optional[float]]) -> PairedDifference:
    """The paired mean of log(after_s / before_s) with its interval (values must be > 0)."""
    return paired_difference(_log(before), _log(after), CONFIDENCE)


@dataclass(frozen=True)
class ControlOutcome:
    passed: bool
    inf_norm_growth: dict  # PairedDifference of log(end / early) max ∞-norm
    kurtosis_growth: dict  # and of the mean kurtosis
    w8a8_cost: dict  # (mean, low, high, n) of the baseline's W8A8 loss increase
    reasons: tuple  # the conditions that failed, in words

    def to_dict(self) -> dict:
        return asdict(self)


def positive_control(inf_early, inf_end, kurt_early, kurt_end, w8a8_cost) -> ControlOutcome:
    """The control on the baseline's per-seed values (lists indexed by seed; None = missing)."""
    from ..tour.stats import mean_interval

    inf_growth = log_ratio(inf_early, inf_end)
    kurt_growth = log_ratio(kurt_early, kurt_end)
    values = [v for v in w8a8_cost if v is not None and math.isfinite(v)]
    mean, low, high = mean_interval(values, CONFIDENCE)
    reasons = []
    if not inf_growth.low > 0:
        reasons.append("the max ∞-norm is not shown to grow during training")
    if not kurt_growth.low > 0:
        reasons.append("the mean kurtosis is not shown to grow during training")
    if not (len(values) >= 2 and mean >= MIN_W8A8_COST and low > 0):
        reasons.append(f"W8A8 is not shown to cost ≥ {MIN_W8A8_COST} nats")
    cost = dict(mean=mean, low=low, high=high, n=len(values))
    return ControlOutcome(not reasons, inf_growth.to_dict(), kurt_growth.to_dict(), cost,
                          tuple(reasons))


@dataclass(frozen=True)
class VariantVerdict:
    verdict: str
    inf_norm_log_ratio: dict  # PairedDifference of r
    w8a8_cost_difference: dict  # PairedDifference of q
    baseline_w8a8_cost: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def variant_verdict(control: ControlOutcome, base_inf, variant_inf, base_w8a8,
                    variant_w8a8) -> VariantVerdict:
    """The rule's verdict for one variant (per-seed values, paired by index)."""
    r = log_ratio(base_inf, variant_inf)
    q = paired_difference(base_w8a8, variant_w8a8, CONFIDENCE)
    base_cost = control.w8a8_cost["mean"]
    needed_r = -math.log(MIN_INF_NORM_FACTOR)
    needed_q = -MIN_W8A8_REDUCTION * base_cost
    if not control.passed:
        verdict, reason = CANNOT_TELL, "the positive control failed: " + "; ".join(control.reasons)
    elif r.n < 2 or q.n < 2:
        verdict, reason = CANNOT_TELL, "fewer than 2 complete pairs"
    elif r.mean <= needed_r and r.high < 0 and q.mean <= needed_q and q.high < 0:
        verdict, reason = YES, (f"∞-norm ×{math.exp(r.mean):.2f} and W8A8 cost {q.mean:+.4f} nats "
                                "reach both thresholds, intervals excluding 0")
    elif r.low > needed_r or q.low > needed_q:
        shown = []
        if r.low > needed_r:
            shown.append(f"the ∞-norm shrinks by less than {MIN_INF_NORM_FACTOR:g}× (interval "
                         f"of the ratio ×[{math.exp(r.low):.2f}, {math.exp(r.high):.2f}])")
        if q.low > needed_q:
            shown.append(f"the W8A8 cost shrinks by less than {MIN_W8A8_REDUCTION:.0%} (interval "
                         f"[{q.low:+.4f}, {q.high:+.4f}] nats vs the {needed_q:+.4f} needed)")
        verdict, reason = NO, "; ".join(shown)
    else:
        verdict, reason = CANNOT_TELL, "the intervals neither reach nor exclude the thresholds"
    return VariantVerdict(verdict, r.to_dict(), q.to_dict(), base_cost, reason)
