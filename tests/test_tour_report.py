"""npformer.tour.report: the analysis of a tour, its page, figures and results.json.

The results are fabricated to the schema of jobs.py / timing.py with KNOWN final losses:
seed s gives every variant a shared offset (what pairing removes) plus the variant's effect
plus a small per-seed noise that sums to 0 over the 4 seeds, so a pair's mean effect is
known exactly and its verdict follows from the effect's size against the noise:

- ReLU → GeLU: −0.05 with noise ±0.002 → "better";   GeLU → SwiGLU: +0.05 → "worse";
- sequential → parallel: 0 with noise ±0.05 → "no difference detected at this budget";
- MHA → MQA: seed 1's MQA run diverged → left out (3 pairs) and counted.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from npformer.tour import report
from npformer.tour.plan import (QUICK, WARMUP_BASES, long_warmup_variant, no_warmup_variant,
                                tour_plan)
from npformer.tour.stats import BETTER, CANNOT_COMPARE, NO_DIFFERENCE, WORSE

REPO = Path(__file__).resolve().parents[1]
BUDGET = QUICK.replace(seeds=4)
SEED_OFFSET = (0.30, 0.10, 0.20, 0.00)  # shared by every variant of seed s: pairing removes it
SMALL_NOISE = (0.002, -0.001, 0.001, -0.002)  # sums to 0: the mean effect is exact
LARGE_NOISE = (0.05, -0.04, 0.04, -0.05)
EFFECT = {  # final loss − 2.0 − the seed's offset
    "gpt1": 0.03, "gpt2": 0.0, "gpt2-relu": 0.05, "gpt2-swiglu": 0.05,
    "gpt2-sinusoidal": 0.01, "gpt2-rope": -0.02, "gpt2-parallel": 0.0, "gpt3": 0.01,
    "llama1": -0.1, "llama1-gqa": -0.1, "llama1-mqa": -0.08, "llama1-layernorm": -0.1,
    "llama1-packed": -0.05, "llama1-docmask": -0.06,
}
NOISY = {"gpt2-parallel": LARGE_NOISE}  # everything else has SMALL_NOISE (but the references)
REFERENCES = {"gpt1", "gpt2", "llama1", "llama1-packed"}  # no noise: the children carry it
MQA_DIVERGED = "llama1-mqa-seed1"


def train_result(job: dict, final, diverged: bool = False, measures=None) -> dict:
    """A train result in the schema of jobs.run_job, with final validation loss ``final``."""
    steps, interval = job["train"]["steps"], job["train"]["eval_interval"]
    history = []
    for step in range(1, steps + 1):
        loss = (final if final is not None else 3.0) + 1.5 * (1 - step / steps) ** 2
        row = {"step": step, "loss": loss + 0.01 * (step % 3), "lr": 1e-3, "grad_norm": 0.5}
        if step % interval == 0 or step == steps:
            row["val_loss"] = loss
        history.append(row)
    if diverged:
        history = history[: steps // 2]
    return {"id": job["id"], "kind": "train", "variant": job["variant"], "seed": job["seed"],
            "job": job, "parameters": 10_000 + len(job["variant"]), "diverged": diverged,
            "diverged_at_step": steps // 2 if diverged else None,
            "divergence": "loss is NaN at step 15" if diverged else None,
            "history": history, "final_val_loss": None if diverged else final,
            "tokens_per_s": 5000.0, "seconds": 1.0, "measures": measures or {}}


def measures_for(job: dict, final: float) -> dict:
    out = {}
    T = job["train"]["seq_len"]
    for name in job["measures"]:
        if name == "length_extrapolation":
            learned = job["variant"] == "gpt2"
            rope = job["variant"] == "gpt2-rope"
            out[name] = {"seq_len": T, "val_loss_T": final,
                         "val_loss_2T": None if learned else final + (0.1 if rope else 0.6),
                         "note": ("learned positions: the table has only T rows, so 2T cannot "
                                  "be evaluated") if learned else None}
        elif name == "kv_cache":
            heads = {"llama1": 4, "llama1-gqa": 2, "llama1-mqa": 1}[job["variant"]]
            per = 2 * 2 * heads * 8 * 4
            out[name] = {"bytes_per_token": per, "formula_bytes_per_token": per,
                         "decoded_tokens": 16}
        elif name == "document_first_tokens":
            first = final + (0.4 if job["variant"] == "llama1-packed" else 0.2)
            out[name] = {"first_tokens": 8, "loss_first": first, "loss_rest": final,
                         "loss_all": final + 0.01, "n_first": 64, "n_rest": 900}
    return out


def timing_result(job: dict) -> dict:
    names = [v["variant"] for v in job["variants"]]
    timings = {}
    for name in job["timings"]:
        unit = "tokens/s" if name == "decode" else "ms"
        median = {v: 10.0 + i for i, v in enumerate(names)}
        timings[name] = {"unit": unit, "what": f"{name}: fabricated for the test", "median": median,
                         "samples": {v: [m, m] for v, m in median.items()}}
        if name == "train_step":
            timings[name]["tokens_per_s"] = {v: 256 / (m / 1000) for v, m in median.items()}
    return {"id": job["id"], "kind": "timing", "comparison": job["comparison"], "job": job,
            "threads": 1, "timings": timings}


def final_loss(variant: str, seed: int) -> float:
    """The known final loss (warm-up runs: the base's, unless a test overrides it)."""
    # the warm-up grid's runs (no warm-up, the long warm-up at any lr) share their base's loss
    base = re.sub(r"-(nowarmup|longwarmup|warmup\d+pct).*$", "", variant)
    noise = NOISY.get(base, (0.0,) * 4 if base in REFERENCES else SMALL_NOISE)
    return 2.0 + SEED_OFFSET[seed] + EFFECT[base] + noise[seed]


def fabricate(plan, final=final_loss, diverged=(MQA_DIVERGED,), missing=()) -> dict:
    results = {}
    for job in plan.jobs:
        if job["id"] in missing:
            continue
        if job["kind"] == "timing":
            results[job["id"]] = timing_result(job)
            continue
        loss = final(job["variant"], job["seed"])
        failed = job["id"] in diverged or loss is None
        results[job["id"]] = train_result(job, None if failed else loss, failed,
                                          measures_for(job, loss if loss is not None else 3.0))
    return results


@pytest.fixture(scope="module")
def plan():
    return tour_plan(BUDGET)


@pytest.fixture(scope="module")
def analysis(plan):
    return {c["name"]: c for c in report.analyse(plan, fabricate(plan))}


def pair_of(comparison: dict, parent: str, child: str) -> dict:
    (pair,) = [p for p in comparison["pairs"] if (p["parent"], p["child"]) == (parent, child)]
    return pair


# ---- analyse ---------------------------------------------------------------------------------


def test_known_effects_give_their_verdicts(analysis):
    ffn = analysis["ffn"]
    relu_to_gelu = pair_of(ffn, "gpt2-relu", "gpt2")["final_val_loss"]
    assert relu_to_gelu["mean"] == pytest.approx(-0.05, abs=1e-12)
    assert relu_to_gelu["n"] == 4 and relu_to_gelu["high"] < 0 and relu_to_gelu["verdict"] == BETTER
    gelu_to_swiglu = pair_of(ffn, "gpt2", "gpt2-swiglu")["final_val_loss"]
    assert gelu_to_swiglu["mean"] == pytest.approx(0.05, abs=1e-12)
    assert gelu_to_swiglu["verdict"] == WORSE
    parallel = pair_of(analysis["block"], "gpt2", "gpt2-parallel")["final_val_loss"]
    assert parallel["mean"] == pytest.approx(0.0, abs=1e-12)
    assert parallel["low"] < 0 < parallel["high"] and parallel["verdict"] == NO_DIFFERENCE
    # the variant table: mean of seed offsets + effect, the t interval around it
    (relu,) = [v for v in ffn["variants"] if v["name"] == "gpt2-relu"]
    assert relu["final_val_loss"]["mean"] == pytest.approx(2.0 + 0.15 + 0.05, abs=1e-12)
    loss = relu["final_val_loss"]
    assert loss["low"] < loss["mean"] < loss["high"] and loss["n"] == 4
    assert relu["runs"] == 4 and relu["diverged"] == 0 and relu["parameters"] == 10_009


def test_pairs_follow_the_seed_field_not_the_order(plan, analysis):
    results = fabricate(plan)
    items = list(results.items())
    random.Random(0).shuffle(items)  # each variant's seeds in a different order
    shuffled = dict(items)
    assert {c["name"]: c for c in report.analyse(plan, shuffled)} == analysis


def test_diverged_run_is_left_out_of_its_pair_and_counted(analysis):
    kv = analysis["kv-heads"]
    mqa_pair = pair_of(kv, "llama1", "llama1-mqa")
    assert mqa_pair["final_val_loss"]["n"] == 3  # seed 1's pair dropped
    assert mqa_pair["excluded_diverged"] == 1
    # the three seeds left: noise 0.002, 0.001, −0.002 on an effect of +0.02
    assert mqa_pair["final_val_loss"]["mean"] == pytest.approx(0.02 + 0.001 / 3, abs=1e-12)
    (mqa,) = [v for v in kv["variants"] if v["name"] == "llama1-mqa"]
    assert (mqa["runs"], mqa["diverged"], mqa["final_val_loss"]["n"]) == (4, 1, 3)
    assert pair_of(kv, "llama1", "llama1-gqa")["final_val_loss"]["n"] == 4


def test_the_same_round_ratio_cancels_a_drift_the_medians_keep():
    """The child is 1.1× the parent in two of three rounds; in the middle round the machine
    was busy while the parent ran. The medians (12 vs 30) say 0.4×; the same-round ratio
    reads the 1.1× of the undisturbed rounds."""
    assert report._same_round_ratio([11.0, 12.0, 33.0], [10.0, 30.0, 30.0]) == pytest.approx(1.1)
    assert report._ratio(12.0, 30.0) == pytest.approx(0.4)
    assert report._same_round_ratio([1.0], [1.0, 2.0]) is None  # not the same rounds
    assert report._same_round_ratio(None, [1.0]) is None


def test_timings_ratios_and_tokens_per_s(analysis):
    ffn = analysis["ffn"]
    # medians 10, 11, 12 ms for gpt2, gpt2-relu, gpt2-swiglu; ratio child ÷ parent
    ratios = {(r["parent"], r["child"]): r["ratio"] for r in ffn["timings"]["train_step"]["ratios"]}
    assert ratios[("gpt2-relu", "gpt2")] == pytest.approx(10 / 11)
    assert ratios[("gpt2", "gpt2-swiglu")] == pytest.approx(12 / 10)
    same_round = {(r["parent"], r["child"]): r["same_round_ratio"]
                  for r in ffn["timings"]["train_step"]["ratios"]}
    assert same_round[("gpt2", "gpt2-swiglu")] == pytest.approx(12 / 10)  # every round 12 vs 10
    (gelu,) = [v for v in ffn["variants"] if v["name"] == "gpt2"]
    assert gelu["tokens_per_s"] == pytest.approx(25_600)
    kv = analysis["kv-heads"]["extra"]["kv_cache"]
    rows = {r["variant"]: r for r in kv["rows"]}
    assert rows["llama1-mqa"]["bytes_per_token"] == 128 and rows["llama1-mqa"]["bytes_ratio"] == 0.25
    assert rows["llama1-gqa"]["decode_ratio"] == pytest.approx(11 / 10)
    attention = analysis["attention-pattern"]["extra"]["attention_time"]
    assert attention["seq_len"] == BUDGET.long_seq_len
    assert [r["ratio"] for r in attention["rows"]] == pytest.approx([1.0, 11 / 10])


def test_positions_and_document_mask_extras(analysis):
    extrapolation = analysis["positions"]["extra"]["length_extrapolation"]
    rows = {r["variant"]: r for r in extrapolation["rows"]}
    assert rows["gpt2"]["val_loss_2T"]["mean"] is None and "table" in rows["gpt2"]["note"]
    assert rows["gpt2-rope"]["val_loss_2T"]["mean"] == pytest.approx(2.15 - 0.02 + 0.1, abs=1e-12)
    at_2T = extrapolation["rope_vs_sinusoidal_2T"]
    # rope − sinusoidal at 2T: (−0.02 + 0.1) − (0.01 + 0.6), noise cancels within a seed (same)
    assert (at_2T["parent"], at_2T["child"]) == ("gpt2-sinusoidal", "gpt2-rope")
    assert at_2T["mean"] == pytest.approx(-0.53, abs=1e-12) and at_2T["verdict"] == BETTER
    first = analysis["document-mask"]["extra"]["document_first_tokens"]
    # loss_first: mask (−0.06 + 0.2) − no mask (−0.05 + 0.4) = −0.21
    assert first["loss_first"]["difference"]["mean"] == pytest.approx(-0.21, abs=1e-12)
    assert first["loss_first"]["difference"]["verdict"] == BETTER
    assert first["loss_rest"]["difference"]["mean"] == pytest.approx(-0.01, abs=1e-12)
    assert (first["n_first"], first["n_rest"]) == (64, 900)


# ---- the warm-up rule ------------------------------------------------------------------------


def _cell(base, lr, fails=False, warmup_trains=True, missing=False):
    return dict(base=base, lr=lr, fails=fails, warmup_trains=warmup_trains, missing=missing)


def test_warmup_verdict_rule():
    fine = [_cell(b, lr) for b in WARMUP_BASES for lr in (3e-3, 1e-2)]

    def grid(**changes):  # (base, lr) -> the cell's changed fields
        return [dict(c, **changes.get(f"{c['base']}@{c['lr']:g}", {})) for c in fine]

    assert report.warmup_verdict(fine) == report.WARMUP_NOT_SHOWN
    assert report.warmup_verdict(grid(**{"gpt1@0.003": dict(fails=True)})) == report.WARMUP_SUPPORTED
    # post-LN fails, but its warm-up does not rescue it: not the claim
    assert report.warmup_verdict(grid(**{"gpt1@0.003": dict(fails=True, warmup_trains=False)})) \
        == report.WARMUP_NOT_SUPPORTED
    # both fail at the same lr
    assert report.warmup_verdict(grid(**{"gpt1@0.003": dict(fails=True), "gpt2@0.003": dict(
        fails=True)})) == report.WARMUP_NOT_SUPPORTED
    # rescued at one lr while pre-LN is fine there: supported, whatever happens at another lr
    assert report.warmup_verdict(grid(**{"gpt1@0.003": dict(fails=True), "gpt1@0.01": dict(
        fails=True, warmup_trains=False), "gpt2@0.01": dict(fails=True)})) == report.WARMUP_SUPPORTED
    assert report.warmup_verdict(grid(**{"gpt2@0.01": dict(fails=True)})) == report.WARMUP_CONTRADICTED
    assert report.warmup_verdict(grid(**{"gpt1@0.003": dict(fails=True), "gpt2@0.01": dict(
        missing=True)})) == report.WARMUP_MISSING


STALLED = 3.35  # the unigram loss of the shipped corpus is 3.347: a run ending here stalled


def warmup_case(plan, lag=(), diverge=(), stall=(), stall_warmup=(), missing=()):
    """The warm-up grid when the no-warm-up run of (base, lr) in ``lag`` ends 0.1 above the
    long-warm-up run, in ``diverge`` diverges in seeds 0 and 2, in ``stall`` ends at the
    unigram loss in seeds 1 and 3 (in ``stall_warmup``: its long-warm-up run does, every
    seed), and in ``missing`` has no results."""
    def final(variant, seed):
        for base in WARMUP_BASES:
            for lr in BUDGET.no_warmup_lrs:
                if variant == no_warmup_variant(base, lr).name:
                    if (base, lr) in stall and seed in (1, 3):
                        return STALLED
                    shift = 0.1 if (base, lr) in lag else 0.0
                    return final_loss(variant, seed) + shift + SMALL_NOISE[seed]
                if variant == long_warmup_variant(base, lr, BUDGET).name and (base, lr) in stall_warmup:
                    return STALLED
        return final_loss(variant, seed)

    diverged = {f"{no_warmup_variant(b, lr).name}-seed{s}" for b, lr in diverge for s in (0, 2)}
    gone = {f"{no_warmup_variant(b, lr).name}-seed{s}" for b, lr in missing for s in range(4)}
    results = fabricate(plan, final, diverged=diverged, missing=gone)
    (norm,) = [c for c in report.analyse(plan, results) if c["name"] == "norm-placement"]
    return norm["extra"]["warmup"]


def test_unigram_loss_of_the_shipped_corpus():
    assert report.unigram_loss() == pytest.approx(3.3473, abs=1e-4)


def test_warmup_grid_supported_with_sentences(plan):
    warmup = warmup_case(plan, lag={("gpt2", 1e-2)}, stall={("gpt1", 3e-3)},
                         diverge={("gpt1", 3e-2)}, stall_warmup={("gpt1", 3e-2)})
    assert warmup["verdict"] == report.WARMUP_SUPPORTED
    cells = {(c["base"], c["lr"]): c for c in warmup["cells"]}
    assert cells[("gpt1", 3e-3)]["stalled"] == 2 and cells[("gpt1", 3e-3)]["fails"]
    assert cells[("gpt1", 3e-3)]["warmup_trains"]
    assert cells[("gpt1", 3e-2)]["diverged"] == 2 and not cells[("gpt1", 3e-2)]["warmup_trains"]
    assert cells[("gpt1", 3e-2)]["with_warmup_stalled"] == 4
    lagging = cells[("gpt2", 1e-2)]
    assert lagging["lags"] and not lagging["fails"]
    assert lagging["vs_warmup"]["mean"] == pytest.approx(0.1, abs=1e-12)
    assert warmup["summaries"]["gpt1"] == (
        "post-LN (GPT-1): at lr 3e-3 without warm-up it stalls at the unigram loss in 2/4 seeds; "
        "the warm-up trains every seed; at lr 1e-2 it trains without warm-up, no lag detected; "
        "at lr 3e-2 without warm-up it diverges in 2/4 seeds; with the warm-up too (4/4)")
    assert "at lr 1e-2 it trains without warm-up but lags (+0.100 [+0.097, +0.103])" in \
        warmup["summaries"]["gpt2"]


@pytest.mark.parametrize("case, verdict", [
    (dict(), report.WARMUP_NOT_SHOWN),
    (dict(lag={("gpt2", 1e-2)}), report.WARMUP_NOT_SHOWN),  # a lag is not a failure
    (dict(diverge={("gpt2", 3e-2)}), report.WARMUP_CONTRADICTED),
    (dict(stall={("gpt1", 1e-2)}), report.WARMUP_SUPPORTED),
    (dict(stall={("gpt1", 1e-2)}, stall_warmup={("gpt1", 1e-2)}), report.WARMUP_NOT_SUPPORTED),
    (dict(diverge={("gpt1", 3e-2), ("gpt2", 3e-2)}), report.WARMUP_NOT_SUPPORTED),
    (dict(missing={("gpt2", 3e-3)}, diverge={("gpt1", 3e-2)}), report.WARMUP_MISSING),
])
def test_warmup_grid_outcomes(plan, case, verdict):
    assert warmup_case(plan, **case)["verdict"] == verdict


# ---- the page --------------------------------------------------------------------------------

META = {"cpu": "Test CPU @ 2 GHz", "wall_time_s": 1234.5, "workers": 2, "executor": "local",
        "command": "npformer tour --seeds 4"}


def image_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def assert_links_are_pngs(out: Path, text: str) -> list[str]:
    links = image_links(text)
    for link in links:
        assert link.startswith("figures/") and link.endswith(".png"), link
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    return links


@pytest.fixture(scope="module")
def written(tmp_path_factory, plan):
    out = tmp_path_factory.mktemp("tour")
    results = fabricate(plan)
    path = report.write_report(str(out), plan, results, META)
    return out, Path(path).read_text(encoding="utf-8"), results


def test_report_has_summary_sections_and_figures(written, plan):
    out, text, _ = written
    assert (out / "report.md").read_text(encoding="utf-8") == text
    summary = text.split("## Summary\n\n")[1].split("\n## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ")][2:]
    n_pairs = sum(len(c.pairs) for c in plan.comparisons)
    assert len(rows) == n_pairs + 3  # + warm-up, 2T, first tokens
    assert any("GeLU" in r and "-0.0500 [" in r and BETTER in r for r in rows)
    assert any("SwiGLU" in r and "+0.0500 [" in r and WORSE in r for r in rows)
    assert any("parallel" in r and NO_DIFFERENCE in r for r in rows)
    assert any("without warm-up" in r and report.WARMUP_NOT_SHOWN in r for r in rows)
    for number, comparison in enumerate(plan.comparisons, start=1):
        assert f"\n## {number}. {comparison.title}\n" in text
        assert f"](figures/{comparison.name}-loss.png)" in text
    assert "## How to read it" in text and "## What this budget can and cannot show" in text
    assert "npformer tour --seeds 4" in text and "Test CPU @ 2 GHz" in text
    assert "median half-width" in text
    links = assert_links_are_pngs(out, text)
    assert {"figures/norm-placement-warmup.png", "figures/positions-2T.png",
            "figures/kv-heads-kv.png"} <= set(links)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_learned_2T_shows_the_note(written):
    _, text, _ = written
    table = text.split("### Length extrapolation")[1].split("\n\n")[1]
    (row,) = [line for line in table.splitlines() if line.startswith("| learned (GPT-2) |")]
    assert row.endswith("| — | learned positions: the table has only T rows, so 2T cannot be "
                        "evaluated |")


def test_results_json_round_trips(written, plan):
    out, _, results = written
    with open(out / "results.json", encoding="utf-8") as f:
        data = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(data["jobs"]) == {job["id"] for job in plan.jobs}
    saved, full = data["jobs"]["gpt2-relu-seed3"], results["gpt2-relu-seed3"]
    assert {k: v for k, v in saved.items() if k != "history"} == \
        {k: v for k, v in full.items() if k != "history"}
    # the history thinned to every validation row, every HISTORY_EVERY-th step and the last
    every = data["history_every"]
    assert saved["history"] == [row for i, row in enumerate(full["history"])
                                if "val_loss" in row or row["step"] % every == 0
                                or i == len(full["history"]) - 1]
    assert 1 < len(saved["history"]) < len(full["history"])
    assert [c["name"] for c in data["comparisons"]] == [c.name for c in plan.comparisons]
    assert data["budget"]["seeds"] == 4 and data["meta"] == META and data["cpu"] == META["cpu"]
    assert data["comparisons"] == report.analyse(plan, results)


def test_partial_results_still_write_with_dashes(tmp_path):
    plan = tour_plan(BUDGET, only=["ffn", "kv-heads", "positions"])
    results = fabricate(plan, missing={"timing-ffn", "gpt2-swiglu-seed2",
                                       "llama1-mqa-seed0", "llama1-mqa-seed2", "llama1-mqa-seed3"})
    del results["timing-kv-heads"]["timings"]["decode"]  # a timing the job did not produce
    for seed in range(4):
        results[f"llama1-gqa-seed{seed}"]["measures"] = {}  # a measure absent
    (ffn,) = [c for c in report.analyse(plan, results) if c["name"] == "ffn"]
    swiglu = pair_of(ffn, "gpt2", "gpt2-swiglu")["final_val_loss"]  # seeds 0, 1, 3 pair by seed
    assert swiglu["n"] == 3
    assert swiglu["mean"] == pytest.approx(0.05 + (0.002 - 0.001 - 0.002) / 3, abs=1e-12)
    assert ffn["timings"] == {} and all(v["tokens_per_s"] is None for v in ffn["variants"])
    text = Path(report.write_report(str(tmp_path), plan, results, {})).read_text(encoding="utf-8")
    assert "The timing job `timing-ffn` has no result yet" in text
    assert "The timing job `timing-kv-heads` has no decode timing: shown as —." in text
    assert "No KV-cache measure yet for GQA (Llama 2): shown as —." in text
    (gqa_kv,) = [line for line in text.split("### KV cache")[1].splitlines()
                 if line.startswith("| GQA (Llama 2) |")]
    assert gqa_kv == "| GQA (Llama 2) | — | — | — | — | — |"
    assert "11 of 12 training runs have results" in text
    (mqa_pair,) = [line for line in text.splitlines() if line.startswith("| MHA (Llama 1) → MQA")]
    assert CANNOT_COMPARE in mqa_pair  # seed 1 diverged, the other three are missing
    assert "—" in mqa_pair
    assert_links_are_pngs(tmp_path, text)
    # nothing at all: every section still there
    empty = tmp_path / "empty"
    text = Path(report.write_report(str(empty), plan, {}, {})).read_text(encoding="utf-8")
    assert "No finished run yet: no loss-curve figure." in text and image_links(text) == []
    assert "## 3. MHA vs GQA vs MQA" in text


def test_malformed_result_is_a_clear_error(plan):
    results = fabricate(plan)
    del results["gpt2-seed0"]["seed"]
    with pytest.raises(ValueError, match=r"'gpt2-seed0' \(train\): field 'seed' must be of type int"):
        report.analyse(plan, results)
    results = fabricate(plan)
    results["timing-ffn"]["kind"] = "timings"
    with pytest.raises(ValueError, match="'timing-ffn': 'kind' must be 'train' or 'timing'"):
        report.analyse(plan, results)


def test_bad_out_dir_and_malformed_timing_are_clear_errors(plan, tmp_path):
    results = fabricate(plan)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="taken, but that is a file"):
        report.write_report(str(tmp_path / "taken"), plan, results, META)
    results["timing-ffn"]["timings"]["train_step"]["median"] = [10.0, 11.0]
    with pytest.raises(ValueError, match=r"'timing-ffn' \(timing\): timings\['train_step'\] must "):
        report.write_report(str(tmp_path / "out"), plan, results, META)


def test_report_builds_with_mkdocs_strict(written, tmp_path):
    """The page and its figures inside a copy of the guide's configuration (as docs/tour/):
    strict mode fails on a broken image link or a malformed page."""
    import mkdocs.config as mkdocs_config  # the test extra installs mkdocs (as tests/test_docs.py)
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.exceptions import Abort

    out, _, _ = written
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs" / "javascripts", docs / "javascripts")
    (docs / "index.md").write_text("# Home\n\nSee [the tour](tour/report.md).\n", encoding="utf-8")
    shutil.copytree(out, docs / "tour")
    config = mkdocs_config.load_config(
        config_file=str(REPO / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True,
        docs_dir=str(docs), nav=[{"Home": "index.md"}, {"Tour": "tour/report.md"}])
    mkdocs_build(config)
    html = (tmp_path / "site" / "tour" / "report" / "index.html").read_text(encoding="utf-8")
    assert html.count("<table>") >= 10 and 'src="../figures/ffn-loss.png"' in html
    (docs / "tour" / "figures" / "ffn-loss.png").unlink()  # the same build fails on a lost figure
    with pytest.raises(Abort, match="strict mode"):
        mkdocs_build(mkdocs_config.load_config(
            config_file=str(REPO / "mkdocs.yml"), site_dir=str(tmp_path / "site2"), strict=True,
            docs_dir=str(docs), nav=[{"Home": "index.md"}, {"Tour": "tour/report.md"}]))
