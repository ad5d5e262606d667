"""The softmax study's pre-registered rule (npformer.study.verdict) on synthetic results: it
must be able to say "yes", "no" and "cannot tell", and the positive control gates it."""

import math

import pytest

from npformer.study import verdict as rule
from npformer.study.plan import DEFAULT, QUICK, StudyBudget, study_plan, VARIANTS

SEEDS = 5


def _control(passed: bool = True, cost: float = 0.10):
    """A baseline whose outliers grow (×4 ∞-norm, ×3 kurtosis) and whose W8A8 costs ``cost``."""
    jitter = [0.00, 0.01, -0.01, 0.02, -0.02]
    inf_early = [10.0] * SEEDS
    inf_end = [40.0 * (1 + j) for j in jitter] if passed else [10.0 * (1 + j) for j in jitter]
    kurt_early = [5.0] * SEEDS
    kurt_end = [15.0 * (1 + j) for j in jitter]
    w8a8 = [cost * (1 + j) for j in jitter]
    return rule.positive_control(inf_early, inf_end, kurt_early, kurt_end, w8a8)


def _verdict(control, inf_factor: float, cost_factor: float, noise: float = 0.01):
    """A variant with ∞-norm × inf_factor and W8A8 cost × cost_factor of the baseline's."""
    jitter = [0.0, noise, -noise, 2 * noise, -2 * noise]
    base_inf = [40.0] * SEEDS
    base_cost = [0.10] * SEEDS
    variant_inf = [40.0 * inf_factor * (1 + j) for j in jitter]
    variant_cost = [0.10 * cost_factor + 0.10 * j for j in jitter]
    return rule.variant_verdict(control, base_inf, variant_inf, base_cost, variant_cost)


def test_control_passes_when_outliers_grow_and_int8_costs():
    control = _control()
    assert control.passed and control.reasons == ()
    assert math.exp(control.inf_norm_growth["mean"]) == pytest.approx(4.0, rel=0.01)


def test_control_fails_without_growth_or_without_cost():
    flat = _control(passed=False)
    assert not flat.passed and any("∞-norm" in r for r in flat.reasons)
    cheap = _control(cost=0.0005)  # grows, but W8A8 costs less than the required 0.001 nats
    assert not cheap.passed and any("W8A8" in r for r in cheap.reasons)


def test_yes_when_both_thresholds_are_reached_with_intervals_excluding_zero():
    outcome = _verdict(_control(), inf_factor=0.2, cost_factor=0.2)
    assert outcome.verdict == rule.YES


def test_no_when_the_interval_excludes_a_twofold_reduction():
    outcome = _verdict(_control(), inf_factor=0.9, cost_factor=0.9)
    assert outcome.verdict == rule.NO
    assert "less than 2×" in outcome.reason


def test_no_when_the_int8_cost_is_shown_not_to_halve():
    outcome = _verdict(_control(), inf_factor=0.2, cost_factor=0.95)
    assert outcome.verdict == rule.NO and "W8A8" in outcome.reason


def test_cannot_tell_when_the_intervals_are_too_wide():
    outcome = _verdict(_control(), inf_factor=0.45, cost_factor=0.45, noise=0.4)
    assert outcome.verdict == rule.CANNOT_TELL


def test_cannot_tell_whatever_the_effect_when_the_control_fails():
    outcome = _verdict(_control(passed=False), inf_factor=0.1, cost_factor=0.1)
    assert outcome.verdict == rule.CANNOT_TELL and "positive control" in outcome.reason


def test_cannot_tell_with_fewer_than_two_pairs():
    control = _control()
    outcome = rule.variant_verdict(control, [40.0, None, None, None, None],
                                   [4.0, None, None, None, None], [0.1] * 5, [0.01] * 5)
    assert outcome.verdict == rule.CANNOT_TELL and "pairs" in outcome.reason


def test_the_rule_text_names_its_thresholds():
    assert "2" in rule.RULE_TEXT and "0.001" in rule.RULE_TEXT and "cannot tell" in rule.RULE_TEXT


def test_plans_pair_every_variant_over_the_same_seeds_and_budget():
    for budget in (QUICK, DEFAULT):
        plan = study_plan(budget)
        assert len(plan.jobs) == len(VARIANTS) * budget.seeds
        assert DEFAULT.seeds >= 5
        by_seed = {}
        for job in plan.jobs:
            by_seed.setdefault(job["seed"], []).append(job)
        for seed, jobs in by_seed.items():
            trains = [dict(j["train"]) for j in jobs]
            assert all(t == trains[0] for t in trains)  # same recipe, same seed, same data order
            shared = [{k: v for k, v in j["model_overrides"].items()
                       if k in ("d_model", "n_layers", "n_heads")} for j in jobs]
            assert all(s == shared[0] for s in shared)
        overrides = {j["variant"]: j["model_overrides"] for j in plan.jobs if j["seed"] == 0}
        assert overrides["clipped"]["clip_alpha"] == budget.clip_alpha
        assert overrides["sink"]["softmax"] == "sink"
        assert overrides["gated"]["attention_gate"] is True


def test_budget_schedule_is_checked_and_stretches_with_steps():
    stretched = DEFAULT.with_steps(600)
    assert stretched.measure_steps[-1] == 600 and stretched.control_step == 75
    with pytest.raises(ValueError, match="measure_steps"):
        QUICK.replace(measure_steps=(0, 40), quantize_steps=(40,)).validate()  # no early step
    with pytest.raises(ValueError, match="quantize_steps"):
        QUICK.replace(quantize_steps=(20, 40)).validate()
    with pytest.raises(ValueError, match="measure_steps"):
        QUICK.replace(measure_steps=(0, 10, 30)).validate()
    with pytest.raises(ValueError, match="seeds"):
        StudyBudget.validate(QUICK.replace(seeds=1))


def test_every_variant_starts_from_the_baselines_weights():
    """Pairing: at one seed the five variants share every baseline parameter bit for bit (the
    sink starts at 0, the gate's weights come from a child stream that leaves the rest alone)."""
    from npformer.models import build_model
    from npformer.presets import preset_config

    budget = QUICK
    base = build_model(preset_config("gpt2", **VARIANTS[0].model_overrides(budget)), seed=3)
    base_params = base.parameters()
    for variant in VARIANTS[1:]:
        model = build_model(preset_config("gpt2", **variant.model_overrides(budget)), seed=3)
        params = model.parameters()
        for name, value in base_params.items():
            assert params[name].tobytes() == value.tobytes(), (variant.name, name)
        extra = set(params) - set(base_params)
        assert all(n.endswith(("sinks", "gate_weight", "gate_bias")) for n in extra)
        if variant.name in ("sink", "gated"):
            assert extra
