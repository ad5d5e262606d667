"""The softmax study's analysis and report: report.md, figures/*.png and results.json.

``analyse`` turns the runs' measurements into per-variant summaries, paired differences with
the baseline and the pre-registered verdicts (:mod:`npformer.study.verdict`); ``write_report``
writes them with the figures. Every effect is paired by seed: a variant's value minus the
baseline's of the same seed (losses, costs, masses), or the log of their ratio (∞-norm,
kurtosis, which span orders of magnitude), with a Student t interval over the pairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import checkpoint as ckpt
from .._plotting import pyplot, save_png, save_png_if
from ..tour.report import DASH, _effect, _finite, _interval, _json_safe, _table
from ..tour.stats import paired_difference
from .plan import BASELINE, StudyPlan
from .verdict import CONFIDENCE, RULE_TEXT, log_ratio, positive_control, variant_verdict

QUANT_MODES = ("W8A8", "W8", "A8")
HISTORY_EVERY = 10  # results.json keeps every 10th training step (and every validation)


# ---- reading the measurements ----------------------------------------------------------------


def max_inf_norm(measure: dict) -> Optional[float]:
    return _finite(measure["outliers"]["max_inf_norm"])


def mean_kurtosis(measure: dict) -> Optional[float]:
    return _finite(measure["outliers"]["mean_kurtosis"])


def first_token_mass(measure: dict) -> Optional[float]:
    return _finite(measure["outliers"]["first_token_mass_mean"])


def unassigned_mass(measure: dict) -> Optional[float]:
    return _finite(measure["outliers"]["unassigned_mass_mean"])


def quant_cost(measure: dict, mode: str) -> Optional[float]:
    """The validation-loss increase of ``mode`` over float32, nats."""
    quantized = measure.get("quantized")  # measured at the budget's quantize_steps only
    return None if quantized is None else _finite(quantized["delta"][mode])


def val_loss(measure: dict) -> Optional[float]:
    return _finite(measure["val_loss"])


METRICS = {  # name: (reader, label, paired as a log-ratio?)
    "val_loss": (val_loss, "float32 validation loss (nats)", False),
    "max_inf_norm": (max_inf_norm, "max ∞-norm", True),
    "mean_kurtosis": (mean_kurtosis, "mean kurtosis", True),
    "first_token_mass": (first_token_mass, "attention on the first token", False),
    "unassigned_mass": (unassigned_mass, "attention on no key (sink / clipped)", False),
    **{f"cost_{mode}": ((lambda m, mode=mode: quant_cost(m, mode)),
                        f"{mode} loss increase (nats)", False) for mode in QUANT_MODES},
}


class _Runs:
    """The study's results by variant and seed."""

    def __init__(self, plan: StudyPlan, results: Dict[str, dict]):
        self.plan = plan
        self.seeds = list(range(plan.budget.seeds))
        self.by_variant: Dict[str, Dict[int, dict]] = {}
        for result in results.values():
            self.by_variant.setdefault(result["variant"], {})[result["seed"]] = result

    def values(self, variant: str, metric: str, step: Optional[int] = None) -> List[Optional[float]]:
        """The metric at ``step`` (default: the end) for seeds 0..seeds−1; None where the run
        is missing, diverged, or has no measurement there."""
        step = self.plan.budget.steps if step is None else step
        read = METRICS[metric][0]
        out = []
        for seed in self.seeds:
            result = self.by_variant.get(variant, {}).get(seed)
            measure = None if result is None else (result.get("measures") or {}).get(str(step))
            out.append(None if measure is None or result["diverged"] else read(measure))
        return out

    def measures(self, variant: str, step: int) -> List[dict]:
        found = []
        for seed in self.seeds:
            result = self.by_variant.get(variant, {}).get(seed)
            if result is not None and not result["diverged"]:
                measure = (result.get("measures") or {}).get(str(step))
                if measure is not None:
                    found.append(measure)
        return found

    def finished(self, variant: str) -> int:
        return sum(1 for r in self.by_variant.get(variant, {}).values() if not r["diverged"])

    def diverged(self, variant: str) -> int:
        return sum(1 for r in self.by_variant.get(variant, {}).values() if r["diverged"])


# ---- analysis --------------------------------------------------------------------------------


def analyse(plan: StudyPlan, results: Dict[str, dict]) -> dict:
    """Summaries, paired effects, the positive control and the verdicts."""
    runs = _Runs(plan, results)
    budget = plan.budget
    early, end = budget.control_step, budget.steps
    control = positive_control(
        runs.values(BASELINE, "max_inf_norm", early), runs.values(BASELINE, "max_inf_norm", end),
        runs.values(BASELINE, "mean_kurtosis", early), runs.values(BASELINE, "mean_kurtosis", end),
        runs.values(BASELINE, "cost_W8A8", end))
    variants = []
    for variant in plan.variants:
        entry = dict(name=variant.name, label=variant.label, finished=runs.finished(variant.name),
                     diverged=runs.diverged(variant.name),
                     parameters=_parameters(runs, variant.name),
                     summary={m: _interval(runs.values(variant.name, m)) for m in METRICS},
                     curves=_curves(runs, variant.name))
        if variant.name != BASELINE:
            entry["effects"] = {}
            for metric, (_, _, as_ratio) in METRICS.items():
                base, mine = runs.values(BASELINE, metric), runs.values(variant.name, metric)
                pair = log_ratio(base, mine) if as_ratio else paired_difference(base, mine, CONFIDENCE)
                entry["effects"][metric] = pair.to_dict()
            entry["verdict"] = variant_verdict(
                control, runs.values(BASELINE, "max_inf_norm"), runs.values(variant.name, "max_inf_norm"),
                runs.values(BASELINE, "cost_W8A8"), runs.values(variant.name, "cost_W8A8")).to_dict()
        entry["per_layer_inf_norm"] = _mean_list(
            [m["outliers"]["per_layer_max_inf_norm"] for m in runs.measures(variant.name, end)])
        entry["first_token_map"] = _mean_list(
            [m["outliers"]["first_token_mass"] for m in runs.measures(variant.name, end)])
        variants.append(entry)
    return dict(control=control.to_dict(), variants=variants, rule=RULE_TEXT,
                control_step=early, steps=end)


def _parameters(runs: _Runs, variant: str) -> Optional[int]:
    counts = {r["parameters"] for r in runs.by_variant.get(variant, {}).values()}
    return counts.pop() if len(counts) == 1 else None


def _curves(runs: _Runs, variant: str) -> Dict[str, list]:
    """Per metric: [{step, mean, low, high, n}] over the measured steps."""
    curves = {}
    for metric in ("val_loss", "max_inf_norm", "mean_kurtosis", "first_token_mass",
                   "unassigned_mass", "cost_W8A8"):
        curves[metric] = [dict(step=step, **_interval(runs.values(variant, metric, step)))
                          for step in runs.plan.budget.measure_steps]
    return curves


def _mean_list(arrays: Sequence) -> Optional[list]:
    """The element-wise mean of equally shaped nested lists (None when there are none)."""
    if not arrays:
        return None
    return np.mean(np.array(arrays, dtype=np.float64), axis=0).tolist()


# ---- figures ---------------------------------------------------------------------------------


def _over_training_figure(path: str, plan: StudyPlan, analysis: dict) -> bool:
    plt = pyplot()
    panels = (("max_inf_norm", "max ∞-norm", True), ("mean_kurtosis", "mean kurtosis", True),
              ("cost_W8A8", "W8A8 loss increase (nats)", False),
              ("first_token_mass", "attention on the first token", False),
              ("val_loss", "float32 validation loss", False),
              ("unassigned_mass", "attention on no key", False))
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    drawn = False
    for ax, (metric, title, log) in zip(axes.flat, panels):
        for variant in analysis["variants"]:
            points = [p for p in variant["curves"][metric] if p["mean"] is not None]
            if not points:
                continue
            steps = [p["step"] for p in points]
            ax.plot(steps, [p["mean"] for p in points], marker="o", label=variant["label"])
            band = [p for p in points if p["low"] is not None]
            if band:
                ax.fill_between([p["step"] for p in band], [p["low"] for p in band],
                                [p["high"] for p in band], alpha=0.15)
            drawn = True
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("training step")
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"Measured during training (mean over seeds, {CONFIDENCE:.0%} interval)")
    figure.tight_layout()
    return save_png_if(figure, path, drawn)


def _per_layer_figure(path: str, analysis: dict) -> bool:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for variant in analysis["variants"]:
        values = variant["per_layer_inf_norm"]
        if values:
            ax.plot(range(len(values)), values, marker="o", label=variant["label"])
            drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max ∞-norm of the layer's monitored outputs")
    ax.set_title("Per-layer ∞-norm at the end of training (mean over seeds)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save_png_if(figure, path, drawn)


def _first_token_figure(path: str, analysis: dict) -> bool:
    maps = [(v["label"], np.array(v["first_token_map"])) for v in analysis["variants"]
            if v["first_token_map"] is not None]
    if not maps:
        return False
    plt = pyplot()
    top = max(0.05, max(float(values.max()) for _, values in maps))  # one colour scale for all
    figure, axes = plt.subplots(1, len(maps), figsize=(3.3 * len(maps), 3.8), squeeze=False,
                                constrained_layout=True)
    for ax, (label, values) in zip(axes[0], maps):
        image = ax.imshow(values, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        for (layer, head), value in np.ndenumerate(values):
            ax.text(head, layer, f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if value < top / 2 else "black")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    figure.suptitle("Attention on the first token at the end of training (mean over seeds and "
                    "queries t ≥ 1)")
    save_png(figure, path)
    return True


# ---- the report ------------------------------------------------------------------------------


def _ratio_text(effect: dict) -> str:
    """A log-ratio effect as ×ratio [low, high]."""
    if effect.get("mean") is None or not math.isfinite(effect["mean"]):
        return DASH
    if effect.get("low") is None or not math.isfinite(effect["low"]):
        return f"×{math.exp(effect['mean']):.2f}"
    return (f"×{math.exp(effect['mean']):.2f} [×{math.exp(effect['low']):.2f}, "
            f"×{math.exp(effect['high']):.2f}]")


def _summary_text(summary: dict, digits: int = 3) -> str:
    if summary["mean"] is None:
        return DASH
    if summary["low"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


def _effect_text(metric: str, effect: dict) -> str:
    return _ratio_text(effect) if METRICS[metric][2] else _effect(effect)


def summary_table(analysis: dict) -> str:
    """The verdict table (report and README): each variant's effect on the two ruled metrics."""
    rows = []
    for v in analysis["variants"]:
        if v["name"] == BASELINE:
            continue
        e = v["effects"]
        rows.append([v["label"], _ratio_text(e["max_inf_norm"]), _effect(e["cost_W8A8"]),
                     _effect(e["val_loss"]), v["verdict"]["verdict"]])
    return _table(["variant", "max ∞-norm vs baseline", "W8A8 cost − baseline's (nats)",
                   "float32 loss − baseline's (nats)", "verdict (pre-registered rule)"], rows)


def _control_section(analysis: dict, plan: StudyPlan) -> str:
    control = analysis["control"]
    cost = control["w8a8_cost"]
    lines = ["## 1. Positive control: does the baseline develop outliers?\n",
             f"Baseline (softmax), step {analysis['control_step']} → step {analysis['steps']}, "
             f"paired over seeds:\n",
             f"- max ∞-norm grows {_ratio_text(control['inf_norm_growth'])}",
             f"- mean kurtosis grows {_ratio_text(control['kurtosis_growth'])}",
             f"- W8A8 raises the final validation loss by "
             f"{_summary_text(dict(mean=_finite(cost['mean']), low=_finite(cost['low']), high=_finite(cost['high'])), 4)} nats\n"]
    lines.append("The budget and the control's W8A8 threshold were fixed after a baseline-only "
                 "pilot and before any variant ran (the pilot and the reasoning are in "
                 "`npformer/study/verdict.py`).\n")
    if control["passed"]:
        lines.append("**The control passes**: the baseline develops outliers at this budget, so "
                     "the study can test whether a variant tames them.\n")
    else:
        lines.append("**The control fails** (" + "; ".join(control["reasons"]) + "): at this "
                     "budget the baseline does not develop the outliers the claim is about, so "
                     "the study **cannot test** the claim. Every verdict below is therefore "
                     "\"cannot tell\"; the numbers are reported, but a null here is not a "
                     "refutation.\n")
    return "\n".join(lines) + "\n"


def _variant_table(analysis: dict) -> str:
    header = ["variant", "params"] + [METRICS[m][1] for m in
                                      ("val_loss", "max_inf_norm", "mean_kurtosis", "cost_W8A8",
                                       "cost_W8", "cost_A8", "first_token_mass", "unassigned_mass")]
    rows = []
    for v in analysis["variants"]:
        s = v["summary"]
        rows.append([v["label"], DASH if v["parameters"] is None else f"{v['parameters']:,}",
                     _summary_text(s["val_loss"]), _summary_text(s["max_inf_norm"], 1),
                     _summary_text(s["mean_kurtosis"], 2), _summary_text(s["cost_W8A8"], 4),
                     _summary_text(s["cost_W8"], 4), _summary_text(s["cost_A8"], 4),
                     _summary_text(s["first_token_mass"]), _summary_text(s["unassigned_mass"])])
    return _table(header, rows)


def _effects_table(analysis: dict) -> str:
    metrics = ("val_loss", "max_inf_norm", "mean_kurtosis", "cost_W8A8", "cost_W8", "cost_A8",
               "first_token_mass", "unassigned_mass")
    rows = []
    for v in analysis["variants"]:
        if v["name"] == BASELINE:
            continue
        rows.append([v["label"]] + [_effect_text(m, v["effects"][m]) for m in metrics])
    return _table(["variant − baseline"] + [METRICS[m][1] for m in metrics], rows)


def _budget_paragraph(plan: StudyPlan, meta: dict) -> str:
    b = plan.budget
    wall = meta.get("wall_time_s")
    return (f"Model: the `gpt2` preset (pre-LN LayerNorm, tanh-GeLU, learned positions, tied "
            f"embeddings) at d_model {b.d_model}, {b.n_layers} layers, {b.n_heads} heads, "
            f"{b.dtype}. Data: the shipped Shakespeare, characters. Each run: {b.steps} steps of "
            f"{b.batch_size} × {b.seq_len} tokens ({b.tokens:,} tokens), AdamW peak lr {b.lr:g}, "
            f"{b.warmup_steps} warm-up steps, cosine to lr/10, weight decay {b.weight_decay:g}, "
            f"clipping 1. {len(plan.variants)} variants × {b.seeds} seeds = {len(plan.jobs)} runs, "
            f"measured at steps {', '.join(map(str, b.measure_steps))} (simulated int8 at "
            f"{', '.join(map(str, b.quantize_steps))}) on {b.metric_batches} validation batches "
            f"({b.metric_batches * b.batch_size} sequences, the same for every run); activation "
            f"ranges calibrated on {b.calibration_batches} training batches. "
            f"Clipped softmax: γ_i = −{b.clip_alpha:g}/n_i. Machine: {meta.get('cpu')}, "
            f"{meta.get('cores')} cores; wall time "
            f"{DASH if wall is None else f'{wall / 60:.1f} min'} ({meta.get('executor')}, "
            f"workers {meta.get('workers')}). Command: `{meta.get('command')}`.\n")


def _verdicts_section(analysis: dict) -> str:
    lines = ["## 2. Verdicts\n", "The rule, as fixed in `npformer/study/verdict.py` before the run:\n",
             "```text\n" + analysis["rule"] + "\n```\n", summary_table(analysis)]
    for v in analysis["variants"]:
        if v["name"] != BASELINE:
            lines.append(f"- **{v['label']}: {v['verdict']['verdict']}** — {v['verdict']['reason']}.")
    return "\n".join(lines) + "\n\n"


# Bondarenko et al. 2023, OPT-125m with softmax: W8A8 perplexity 21.18 against 15.84 in
# float (their Table 2), a loss increase of ln(21.18 / 15.84) nats
PUBLISHED_W8A8_COST = math.log(21.18 / 15.84)


def _what_it_shows(analysis: dict, plan: StudyPlan) -> str:
    b = plan.budget
    base = next(v for v in analysis["variants"] if v["name"] == BASELINE)["summary"]
    cost, first = base["cost_W8A8"]["mean"], base["first_token_mass"]["mean"]
    lines = [
        "## 5. What this does and does not show\n",
        f"- Scale: {b.n_layers}-layer, d_model {b.d_model} models trained on {b.tokens:,} "
        "characters. The literature's outliers (Bondarenko et al.: ∞-norms in the hundreds, "
        "kurtosis in the thousands) come from 100M+ parameter models trained on billions of "
        "tokens; the positive control above says whether anything like them appears here, and "
        "the verdicts mean nothing beyond it."]
    if cost is not None:
        lines.append(
            f"- Size of what is being tamed: the baseline's W8A8 cost here is {cost:+.4f} nats "
            f"({100 * math.expm1(cost):.2f} % of perplexity); Bondarenko et al.'s OPT-125m loses "
            f"{PUBLISHED_W8A8_COST:.2f} nats (15.84 → 21.18 perplexity, as the paper reports "
            "it). A \"yes\" or \"no\" here is about "
            + (f"a cost {PUBLISHED_W8A8_COST / cost:.0f} times smaller." if cost > 0
               else "a cost that is not there."))
    if first is not None:
        lines.append(
            f"- Attention sinks: the baseline's heads put {first:.3f} of their attention on the "
            "first token on average (queries t ≥ 1). The variants are designed for heads that "
            "dump their mass on a first or delimiter token to do nothing (the no-op of "
            "Bondarenko et al., the sink of Xiao et al.)"
            + ("; that behaviour barely appears at this scale, so the mechanism the variants "
               "target is mostly absent." if first < 0.1 else "."))
    lines += [
        "- The verdict is about *this* budget and recipe (AdamW, weight decay, pre-LN): Kaul et "
        "al. attribute most outliers to Adam, He et al. to normalisation placement; neither "
        "was varied.",
        "- Quantization is simulated, per tensor, with min/max calibration — the setting in "
        "which outliers hurt most; per-token or percentile calibration would hide part of it.",
        "- The ∞-norm is an extreme value: it depends on how many sequences are evaluated "
        f"({b.metric_batches * b.batch_size} here, the same for every run, so the paired "
        "ratios are fair).",
        f"- The clipped variant (γ_i = −{b.clip_alpha:g}/n_i) assigns part of every row to no "
        "key (the \"attention on no key\" column): its attention output is scaled down, which "
        "the model must compensate; α < 1 because a larger α clips every near-uniform row to "
        "zero at initialisation (npformer/study/plan.py).",
        "- The sink and gated variants have a few more parameters (H per layer; C + H per "
        "layer): listed in the table, far below a size effect."]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, plan: StudyPlan, results: Dict[str, dict], meta: dict) -> str:
    """Write ``out_dir/report.md``, ``figures/*.png`` and ``results.json`` (each atomically)."""
    analysis = analyse(plan, results)
    figures_dir = os.path.join(out_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    figures = []
    for name, draw, caption in (
            ("over_training.png", lambda p: _over_training_figure(p, plan, analysis),
             "Outlier metrics, W8A8 cost, attention masses and loss over training"),
            ("per_layer_inf_norm.png", lambda p: _per_layer_figure(p, analysis),
             "Per-layer ∞-norm at the end"),
            ("first_token_attention.png", lambda p: _first_token_figure(p, analysis),
             "Attention on the first token per layer and head")):
        if draw(os.path.join(figures_dir, name)):
            figures.append(f"![{caption}](figures/{name})\n")
    text = ("# The softmax study: do softmax₁, a learned sink, clipping or gating tame outliers?\n\n"
            + _budget_paragraph(plan, meta) + "\n"
            + _control_section(analysis, plan) + _verdicts_section(analysis)
            + "## 3. Every variant at the end of training (mean [95 % interval] over seeds)\n\n"
            + _variant_table(analysis) + "\n"
            + "## 4. Paired effects against the baseline (mean [95 % interval]; ratios for "
              "∞-norm and kurtosis)\n\n" + _effects_table(analysis) + "\n"
            + "".join(figures) + "\n" + _what_it_shows(analysis, plan))
    path = os.path.join(out_dir, "report.md")
    ckpt.write_atomically(path, [text.encode("utf-8")])
    data = _json_safe(dict(budget=dataclasses.asdict(plan.budget), meta=meta, analysis=analysis,
                           history_every=HISTORY_EVERY, jobs=_thinned(results)))
    ckpt.write_atomically(os.path.join(out_dir, "results.json"), [
        json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")])
    return path


def _thinned(results: Dict[str, dict]) -> Dict[str, dict]:
    """Each run's history at every validation and every HISTORY_EVERY-th step."""
    thinned = {}
    for job_id, result in results.items():
        rows = result.get("history") or []
        keep = [row for i, row in enumerate(rows) if "val_loss" in row
                or row.get("step", 0) % HISTORY_EVERY == 0 or i == len(rows) - 1]
        thinned[job_id] = dict(result, history=keep)
    return thinned
