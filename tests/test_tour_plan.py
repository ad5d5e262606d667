"""The tour's plan: one switch per comparison, matched sizes, equal budgets, paired seeds."""

import dataclasses
import json

import pytest

from npformer.models.stats import parameter_count
from npformer.tour.plan import (COMPARISON_NAMES, COMPARISONS, DEFAULT, D_FF_STEP, QUICK,
                                SIZE_TOLERANCE, VARIANTS, check_matched_sizes, get_comparisons,
                                matched_d_ff, model_config, tour_plan)

BUDGETS = [QUICK, DEFAULT]


def _differing_fields(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


# What each pair may change, field by field (d_ff: the matched-size rule). The presets
# GPT-1 → GPT-2 and GPT-2 → GPT-3 are one lineage step each, so their own fields.
GPT2_STEP = {"norm_placement", "final_norm", "scaled_residual_init"}
ALLOWED = {
    ("gpt1", "gpt2"): GPT2_STEP,
    ("gpt1-longwarmup", "gpt2-longwarmup"): GPT2_STEP,
    ("gpt2-relu", "gpt2"): {"ffn"},
    ("gpt2", "gpt2-swiglu"): {"ffn", "ffn_bias", "d_ff"},
    ("gpt2-sinusoidal", "gpt2"): {"positions", "scale_embeddings", "d_ff"},
    ("gpt2", "gpt2-rope"): {"positions", "d_ff"},
    ("gpt2", "gpt2-parallel"): {"block", "d_ff"},
    ("gpt2", "gpt3"): {"attention_pattern", "window"},
    ("llama1", "llama1-gqa"): {"n_kv_heads", "d_ff"},
    ("llama1", "llama1-mqa"): {"n_kv_heads", "d_ff"},
    ("llama1-layernorm", "llama1"): {"norm"},
    ("llama1-packed", "llama1-docmask"): {"document_mask"},
}
SWITCHES = {"ffn", "positions", "n_kv_heads", "block", "norm", "document_mask",
            "attention_pattern", "norm_placement"}


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: b.name)
def test_each_pair_changes_only_its_switch(budget):
    seen = set()
    for comparison in COMPARISONS:
        for pair in comparison.pairs:
            key = (pair.parent, pair.child)
            a, b = (model_config(VARIANTS[n], budget, 65) for n in key)
            changed = _differing_fields(a, b)
            assert changed <= ALLOWED[key] and SWITCHES & changed, (key, changed)
            seen.add(key)
    assert seen == set(ALLOWED)


def test_the_long_warmup_runs_change_only_the_recipe():
    for budget in BUDGETS:
        plan = tour_plan(budget, only=["norm-placement"])
        jobs = {j["variant"]: j for j in plan.jobs if j["kind"] == "train" and j["seed"] == 0}
        for base in ("gpt1", "gpt2"):
            short, long = jobs[base], jobs[f"{base}-longwarmup"]
            assert long["model_overrides"] == short["model_overrides"]
            assert {k for k in short["train"] if short["train"][k] != long["train"][k]} == {"warmup_steps"}
            assert long["train"]["warmup_steps"] == round(budget.long_warmup_fraction * budget.steps)
            for lr in budget.no_warmup_lrs:  # every no-warm-up lr has its long-warm-up partner
                partner = "longwarmup" if lr == budget.lr else f"warmup25pct-lr{lr:g}"
                assert jobs[f"{base}-nowarmup-lr{lr:g}"]["train"]["lr"] == lr
                assert jobs[f"{base}-{partner}"]["train"]["lr"] == lr
                assert jobs[f"{base}-{partner}"]["train"]["warmup_steps"] == long["train"]["warmup_steps"]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: b.name)
def test_sizes_are_matched_within_5_percent_by_the_closest_d_ff(budget):
    for comparison in COMPARISONS:
        counts = check_matched_sizes(comparison, budget)
        reference = counts[comparison.variants[0]]
        assert all(abs(c - reference) <= SIZE_TOLERANCE * reference for c in counts.values())
    for variant in VARIANTS.values():
        d_ff = matched_d_ff(variant, budget)
        if d_ff is None:
            continue
        target = parameter_count(model_config(VARIANTS[variant.match_size_to], budget, 65))
        gap = abs(parameter_count(model_config(variant, budget, 65)) - target)
        for other in (d_ff - D_FF_STEP, d_ff + D_FF_STEP):  # its neighbours are no closer
            if other > 0:
                assert abs(parameter_count(model_config(variant, budget, 65, d_ff=other)) - target) >= gap


def test_a_size_outside_the_tolerance_is_caught():
    comparison = get_comparisons(["ffn"])[0]
    wide = dataclasses.replace(VARIANTS["gpt2-relu"], overrides=(("d_ff", 512), ("ffn", "relu")))
    original = VARIANTS["gpt2-relu"]
    VARIANTS["gpt2-relu"] = wide
    try:
        with pytest.raises(AssertionError, match="gpt2-relu has"):
            check_matched_sizes(comparison, DEFAULT)
    finally:
        VARIANTS["gpt2-relu"] = original


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: b.name)
def test_jobs_are_an_equal_budget_over_paired_seeds(budget):
    plan = tour_plan(budget)
    train = [j for j in plan.jobs if j["kind"] == "train"]
    timing = [j for j in plan.jobs if j["kind"] == "timing"]
    assert len({j["id"] for j in plan.jobs}) == len(plan.jobs)
    assert len(train) == len(plan.variants) * budget.seeds
    assert [j["comparison"] for j in timing] == list(COMPARISON_NAMES)
    assert plan.jobs[-len(timing):] == timing  # the timings run after the training
    for key in ("steps", "batch_size", "seq_len", "eval_batches", "dtype", "weight_decay",
                "grad_clip"):
        assert len({j["train"][key] for j in train}) == 1, key
    for variant in plan.variants:
        seeds = sorted(j["seed"] for j in train if j["variant"] == variant)
        assert seeds == list(range(budget.seeds))
        assert all(j["train"]["seed"] == j["seed"] for j in train)
    warmup = {j["variant"]: (j["train"]["warmup_steps"], j["train"]["lr"]) for j in train}
    assert warmup["gpt2"] == (budget.warmup_steps, budget.lr)
    for lr in budget.no_warmup_lrs:
        assert warmup[f"gpt1-nowarmup-lr{lr:g}"] == (0, lr)
        assert warmup[f"gpt2-nowarmup-lr{lr:g}"] == (0, lr)
    assert json.loads(json.dumps(plan.jobs)) == plan.jobs  # plain JSON, as the workers get them


def test_only_selects_comparisons_and_trains_a_shared_variant_once():
    plan = tour_plan(QUICK, only=["ffn", "positions"])
    assert [c.name for c in plan.comparisons] == ["ffn", "positions"]
    assert set(plan.variants) == {"gpt2", "gpt2-relu", "gpt2-swiglu", "gpt2-sinusoidal", "gpt2-rope"}
    measures = {j["variant"]: j["measures"] for j in plan.jobs if j["kind"] == "train"}
    assert measures["gpt2-rope"] == ["length_extrapolation"] and measures["gpt2-relu"] == []
    with pytest.raises(ValueError, match="unknown comparison.*'mlp'.*valid names"):
        tour_plan(QUICK, only=["mlp"])
    with pytest.raises(ValueError, match="unknown comparison"):
        tour_plan(QUICK, only=[])
