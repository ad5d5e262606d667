"""The tour's statistics on synthetic data with known answers: the paired t interval, its
coverage, the verdict words, and what a diverged run does to a pair."""

import math

import numpy as np
import pytest

from npformer.tour.stats import (BETTER, CANNOT_COMPARE, NO_DIFFERENCE, WORSE, mean_interval,
                                 paired_difference, t_quantile)


def test_t_quantiles_match_the_printed_table():
    # Student's t, two-sided 95 %: the values every statistics table prints
    for dof, value in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.95, dof) == pytest.approx(value, abs=1e-3)


def test_the_interval_of_a_hand_computed_case():
    # differences 0.1, 0.2, 0.3: mean 0.2, sample sd 0.1, half-width t(2) · 0.1 / √3, with
    # t(2) in closed form: for 2 degrees of freedom t_p = (2p − 1) √(2 / (4p(1 − p)))
    result = paired_difference([1.0, 2.0, 3.0], [1.1, 2.2, 3.3])
    t2 = (2 * 0.975 - 1) * math.sqrt(2 / (4 * 0.975 * 0.025))
    half = t2 * 0.1 / math.sqrt(3)
    assert result.mean == pytest.approx(0.2, abs=1e-12)
    assert result.sd == pytest.approx(0.1, abs=1e-12)
    assert (result.low, result.high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-12)
    assert result.n == 3 and result.verdict == NO_DIFFERENCE  # 0.2 − 0.248 < 0


def test_pairing_removes_what_the_seeds_share():
    """Seed-to-seed spread of 1 nat, a constant effect of −0.01: paired, the effect is exact
    (an unpaired comparison of the means could not see it)."""
    seeds = np.array([3.0, 4.0, 5.0, 2.0])
    result = paired_difference(seeds, seeds - 0.01)
    assert result.verdict == BETTER
    assert result.high < 0 and result.mean == pytest.approx(-0.01)


@pytest.mark.parametrize("effect, verdict", [(-0.05, BETTER), (0.05, WORSE), (0.0, NO_DIFFERENCE)])
def test_verdicts_read_the_interval(effect, verdict):
    rng = np.random.default_rng(0)
    parent = 1.5 + rng.normal(0, 0.1, 5)
    child = parent + effect + rng.normal(0, 0.005, 5)
    assert paired_difference(parent, child).verdict == verdict


def test_higher_is_better_flips_the_words():
    assert paired_difference([1, 2, 3], [2, 3, 4.01], lower_is_better=False).verdict == BETTER
    assert paired_difference([1, 2, 3], [2, 3, 4.01]).verdict == WORSE


def test_the_95_percent_interval_covers_the_true_effect_95_percent_of_the_time():
    """2000 synthetic experiments of 4 pairs, true effect −0.02, noise sd 0.01: the interval
    must cover −0.02 in 95 % of them (binomial sd 0.5 %, so 93.5–96.5 % is ±3 sd)."""
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(2000):
        parent = 1.6 + rng.normal(0, 0.2, 4)
        child = parent - 0.02 + rng.normal(0, 0.01, 4)
        result = paired_difference(parent, child)
        covered += result.low <= -0.02 <= result.high
    assert 0.935 <= covered / 2000 <= 0.965


def test_a_diverged_run_drops_its_pair_and_too_few_pairs_cannot_compare():
    result = paired_difference([1.0, 2.0, 3.0], [0.9, math.nan, 2.9])
    assert result.n == 2 and result.mean == pytest.approx(-0.1)
    result = paired_difference([1.0, None, 3.0], [0.9, 1.9, math.inf])
    assert result.n == 1 and result.verdict == CANNOT_COMPARE and math.isnan(result.low)
    assert paired_difference([None], [None]).verdict == CANNOT_COMPARE


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.5)


def test_mean_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    half = t_quantile(0.95, 2) * 1.0 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert mean_interval([2.0, math.nan])[0] == 2.0 and math.isnan(mean_interval([2.0])[1])
    assert all(math.isnan(v) for v in mean_interval([]))
