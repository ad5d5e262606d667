"""A finished (or partly finished) tour as numbers, figures and a page: ``report.md``,
``figures/*.png`` and ``results.json``.

``analyse(plan, results)`` reads the job results (the schema of jobs.py and timing.py: one
dict per job id) and returns one dict per comparison of the plan:

- ``variants``: each variant's parameter count, its final validation loss over seeds (mean
  and the t interval of ``stats.mean_interval``), how many runs finished and how many
  diverged, and its training tokens/s from the comparison's side-by-side timing job;
- ``pairs``: for each parent → child, ``stats.paired_difference`` of the final validation
  loss, seed s against seed s (a diverged or missing run drops its pair, and is counted);
- ``timings``: the timing job's medians, with the ratio child/parent of each pair's medians;
- ``extra``: what the comparison measures beyond the loss (the warm-up grid of
  "norm-placement", the 2T evaluation of "positions", the KV cache of "kv-heads", the long
  attention time of "attention-pattern", the first-token loss of "document-mask").

Nothing missing is an error: a comparison whose runs or timing job have not finished yet is
analysed from what there is, and the page prints "—" with a note. A result that does not
follow the schema (a train result without its seed, say) is a ValueError naming the job and
the field.

The warm-up rule (``warmup_verdict``), applied mechanically. For each base (post-LN, pre-LN)
and each learning rate of ``budget.no_warmup_lrs``, the base is trained without warm-up and
with a long warm-up (``budget.long_warmup_fraction`` of the steps) at that same peak lr. A
run FAILS when it diverges or STALLS: its final validation loss is within 0.1 nats of the
unigram loss (each character predicted by its frequency: the model learned next to nothing
from context). A no-warm-up cell LAGS when the paired difference "no warm-up − long
warm-up, same lr" has its 95 % interval entirely above 0. Then:

- a cell with fewer runs than seeds → "cannot tell yet (runs missing)";
- at some lr, post-LN fails without warm-up, its long warm-up trains every seed, and pre-LN
  does not fail without warm-up (it may lag) → "supported";
- otherwise, at some lr pre-LN fails without warm-up and post-LN does not → "contradicted";
- otherwise, post-LN fails without warm-up at no lr → "not shown at this budget";
- otherwise → "not supported" (wherever post-LN fails, the warm-up does not rescue it or
  pre-LN fails too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import checkpoint as ckpt
from .._plotting import pyplot, save_png
from ..models.stats import parameter_count
from .plan import (VARIANTS, WARMUP_BASES, Comparison, Plan, long_warmup_variant, model_config,
                   no_warmup_variant)
from .stats import BETTER, CANNOT_COMPARE, NO_DIFFERENCE, WORSE, mean_interval, paired_difference

DASH = "—"
VOCAB_SIZE = 65  # the character vocabulary of tiny Shakespeare: parameter counts of runs not yet done

# the warm-up verdicts (module docstring)
WARMUP_SUPPORTED = "supported"
WARMUP_NOT_SHOWN = "not shown at this budget"
WARMUP_CONTRADICTED = "contradicted"
WARMUP_NOT_SUPPORTED = "not supported"
WARMUP_MISSING = "cannot tell yet (runs missing)"

_TRAIN_FIELDS = {"variant": str, "seed": int, "diverged": bool, "history": list}
_TIMING_FIELDS = {"comparison": str, "timings": dict}


# ---- reading the results ---------------------------------------------------------------------


def _check_results(results: Dict[str, dict]) -> None:
    """Every result is a dict with the schema's fields of its kind (a ValueError naming the
    job id and the field otherwise)."""
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict of job id -> result, got {type(results).__name__}")
    for job_id, result in results.items():
        if not isinstance(result, dict):
            raise ValueError(f"result {job_id!r} must be a dict, got {type(result).__name__}")
        kind = result.get("kind")
        if kind not in ("train", "timing"):
            raise ValueError(f"result {job_id!r}: 'kind' must be 'train' or 'timing', got {kind!r}")
        fields = _TRAIN_FIELDS if kind == "train" else _TIMING_FIELDS
        for key, expected in fields.items():
            value = result.get(key)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"result {job_id!r} ({kind}): field {key!r} must be of type "
                                 f"{expected.__name__}, got {value!r:.60}")
        if kind == "timing":
            for name, entry in result["timings"].items():
                if not isinstance(entry, dict) or not isinstance(entry.get("median"), dict):
                    raise ValueError(f"result {job_id!r} (timing): timings[{name!r}] must be a dict "
                                     f"with a 'median' dict of variant -> value, got {entry!r:.60}")
        if kind == "train":
            loss = result.get("final_val_loss")
            if loss is not None and not isinstance(loss, (int, float)):
                raise ValueError(f"result {job_id!r} (train): field 'final_val_loss' must be a "
                                 f"number or null, got {loss!r:.60}")


def _finite(x) -> Optional[float]:
    """x as a float, or None when it is missing or not finite (NaN never reaches the page)."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_safe(value):
    """NaN and ±inf → None, tuples → lists, recursively (results.json is strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    return value


class _Runs:
    """The train results of a tour, by variant and seed."""

    def __init__(self, plan: Plan, results: Dict[str, dict]):
        self.seeds = list(range(plan.budget.seeds))
        self.by_variant: Dict[str, Dict[int, dict]] = {}
        self.timings: Dict[str, dict] = {}
        for result in results.values():
            if result["kind"] == "train":
                self.by_variant.setdefault(result["variant"], {})[result["seed"]] = result
            else:
                self.timings[result["comparison"]] = result

    def runs(self, variant: str) -> List[dict]:
        found = self.by_variant.get(variant, {})
        return [found[s] for s in self.seeds if s in found]

    def by_seed(self, variant: str, value) -> List[Optional[float]]:
        """value(result) for seed 0..seeds−1 (None where the run is missing or diverged)."""
        found = self.by_variant.get(variant, {})
        out = []
        for s in self.seeds:
            result = found.get(s)
            out.append(None if result is None or result["diverged"] else _finite(value(result)))
        return out

    def final_losses(self, variant: str) -> List[Optional[float]]:
        return self.by_seed(variant, lambda r: r.get("final_val_loss"))

    def measure(self, variant: str, measure: str, key: str) -> List[Optional[float]]:
        return self.by_seed(variant, lambda r: (r.get("measures") or {}).get(measure, {}).get(key))


def _interval(values: Sequence[Optional[float]]) -> dict:
    mean, low, high = mean_interval([v for v in values if v is not None])
    return {"mean": _finite(mean), "low": _finite(low), "high": _finite(high),
            "n": sum(v is not None for v in values)}


def _parameters(plan: Plan, runs: _Runs, name: str) -> Optional[int]:
    """The parameter count a run reported; before any run finished, the count of the config it
    will build (at the 65-character vocabulary)."""
    for result in runs.runs(name):
        if isinstance(result.get("parameters"), int):
            return result["parameters"]
    variant = plan.variants.get(name) or VARIANTS.get(name)
    if variant is None:
        return None
    return parameter_count(model_config(variant, plan.budget, vocab_size=VOCAB_SIZE))


# A variant shared by several comparisons is named for its role in each: the gpt2 run is the
# GeLU of "ffn", the learned positions of "positions", the sequential block of "block".
ROLE_LABELS = {
    "ffn": {"gpt2": "GeLU (GPT-2)"},
    "positions": {"gpt2": "learned (GPT-2)"},
    "block": {"gpt2": "sequential (GPT-2)"},
    "attention-pattern": {"gpt2": "dense (GPT-2)"},
    "norm": {"llama1": "RMSNorm (Llama 1)"},
}


def _label(plan: Plan, name: str, comparison: str = "") -> str:
    """The variant's label in the comparison (its role there), else the plan's label."""
    if name in ROLE_LABELS.get(comparison, {}):
        return ROLE_LABELS[comparison][name]
    variant = plan.variants.get(name) or VARIANTS.get(name)
    return variant.label if variant is not None else name


def _timing_value(timing: Optional[dict], name: str, variant: str, key: str = "median"):
    if timing is None:
        return None
    return _finite(((timing.get("timings") or {}).get(name) or {}).get(key, {}).get(variant))


def _ratio(numerator, denominator) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ---- the analysis ----------------------------------------------------------------------------


def analyse(plan: Plan, results: Dict[str, dict]) -> List[dict]:
    """One dict per comparison of ``plan.comparisons`` (module docstring); JSON-safe (a NaN
    of stats, e.g. a pair that cannot be compared, is None)."""
    _check_results(results)
    runs = _Runs(plan, results)
    return [_json_safe(_analyse_comparison(plan, runs, comparison))
            for comparison in plan.comparisons]


def _analyse_comparison(plan: Plan, runs: _Runs, comparison: Comparison) -> dict:
    timing = runs.timings.get(comparison.name)
    variants = []
    for name in comparison.variants:
        done = runs.runs(name)
        variants.append(dict(
            name=name, label=_label(plan, name, comparison.name),
            parameters=_parameters(plan, runs, name),
            final_val_loss=_interval(runs.final_losses(name)),
            runs=len(done), diverged=sum(bool(r["diverged"]) for r in done),
            tokens_per_s=_timing_value(timing, "train_step", name, "tokens_per_s")))
    pairs = []
    for pair in comparison.pairs:
        parent, child = runs.final_losses(pair.parent), runs.final_losses(pair.child)
        difference = paired_difference(parent, child)
        pairs.append(dict(
            parent=pair.parent, child=pair.child,
            parent_label=_label(plan, pair.parent, comparison.name),
            child_label=_label(plan, pair.child, comparison.name),
            final_val_loss=difference.to_dict(),
            excluded_diverged=_diverged_in_pairs(runs, pair.parent, pair.child)))
    return dict(name=comparison.name, title=comparison.title, step=comparison.step,
                claim=comparison.claim, variants=variants, pairs=pairs,
                timing_job=f"timing-{comparison.name}",
                timings=_timings(comparison, timing), extra=_extra(plan, runs, comparison, timing))


def _diverged_in_pairs(runs: _Runs, *variants: str) -> int:
    return sum(bool(r["diverged"]) for name in variants for r in runs.runs(name))


def _timings(comparison: Comparison, timing: Optional[dict]) -> Dict[str, dict]:
    """The timing job's entries, each with the ratio child/parent of the medians per pair
    (None until the timing job has run)."""
    if timing is None:
        return {}
    out = {}
    for name, entry in (timing.get("timings") or {}).items():
        entry = dict(entry)
        median = entry.get("median") or {}
        samples = entry.get("samples") or {}
        entry["ratios"] = [dict(parent=p.parent, child=p.child,
                                ratio=_ratio(_finite(median.get(p.child)),
                                             _finite(median.get(p.parent))),
                                same_round_ratio=_same_round_ratio(samples.get(p.child),
                                                                   samples.get(p.parent)))
                           for p in comparison.pairs]
        out[name] = entry
    return out


def _same_round_ratio(child: Optional[list], parent: Optional[list]) -> Optional[float]:
    """The median over rounds r of child[r] / parent[r]. The timing job runs every variant
    once per round, moments apart, so a round's ratio cancels the machine's slower drift
    (another process, a clock change) that the ratio of the two medians keeps."""
    if not child or not parent or len(child) != len(parent):
        return None
    ratios = [c / p for c, p in zip(child, parent)
              if _finite(c) is not None and _finite(p) is not None and p > 0]
    return float(np.median(ratios)) if ratios else None


def _extra(plan: Plan, runs: _Runs, comparison: Comparison, timing: Optional[dict]) -> dict:
    if comparison.name == "norm-placement":
        return {"warmup": warmup_grid(plan, runs)}
    if comparison.name == "positions":
        return {"length_extrapolation": _length_extrapolation(plan, runs, comparison)}
    if comparison.name == "kv-heads":
        return {"kv_cache": _kv_cache(plan, runs, comparison, timing)}
    if comparison.name == "attention-pattern":
        return {"attention_time": _timed_against_reference(plan, comparison, timing, "attention")
                | {"seq_len": plan.budget.long_seq_len}}
    if comparison.name == "document-mask":
        return {"document_first_tokens": _document_first_tokens(plan, runs, comparison)}
    return {}


def _lr(x: float) -> str:
    """3e-3, 1e-2, 1.5e-3: a learning rate as people write it."""
    mantissa, exponent = f"{x:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


STALL_MARGIN = 0.1  # a run "stalls" when its final loss is within this of the unigram loss


@functools.lru_cache(maxsize=1)
def unigram_loss() -> float:
    """The validation loss (nats/token) of the unigram model: each character predicted with its
    frequency in the training split of the shipped corpus (3.35 for tiny Shakespeare). A run
    whose final loss is within STALL_MARGIN of it learned next to nothing from context."""
    from ..dataset import CharTokenizer, load_text, split_train_val

    text = load_text()
    tokenizer = CharTokenizer(text)
    train, val = split_train_val(tokenizer.encode(text))
    frequency = np.bincount(train, minlength=tokenizer.vocab_size) / len(train)  # (V,)
    return float(-np.mean(np.log(np.maximum(frequency[val], np.finfo(np.float64).tiny))))


def _failed(runs: _Runs, variant: str) -> Tuple[int, int, int]:
    """(runs, diverged, stalled) of a variant: a stalled run ended within STALL_MARGIN of the
    unigram loss."""
    done = runs.runs(variant)
    diverged = sum(bool(r["diverged"]) for r in done)
    stalled = sum(1 for r in done if not r["diverged"] and r.get("final_val_loss") is not None
                  and r["final_val_loss"] > unigram_loss() - STALL_MARGIN)
    return len(done), diverged, stalled


def warmup_grid(plan: Plan, runs: _Runs) -> dict:
    """The warm-up sensitivity of "norm-placement": per base and lr, the final loss without
    warm-up and with the long warm-up, the diverged and stalled runs of each, the paired
    difference of the two; a sentence per base and the verdict of the module docstring's rule."""
    budget = plan.budget
    cells, sentences = [], {}
    for base in WARMUP_BASES:
        parts = []
        for lr in sorted(budget.no_warmup_lrs):
            variant, warmed = no_warmup_variant(base, lr), long_warmup_variant(base, lr, budget)
            n, diverged, stalled = _failed(runs, variant.name)
            n_w, diverged_w, stalled_w = _failed(runs, warmed.name)
            difference = paired_difference(runs.final_losses(warmed.name),
                                           runs.final_losses(variant.name))
            lags = difference.verdict == WORSE
            fails = diverged + stalled > 0
            cells.append(dict(
                base=base, label=_label(plan, base), lr=lr, variant=variant.name,
                final_val_loss=_interval(runs.final_losses(variant.name)), runs=n,
                diverged=diverged, stalled=stalled, warmup_variant=warmed.name,
                with_warmup=_interval(runs.final_losses(warmed.name)), with_warmup_runs=n_w,
                with_warmup_diverged=diverged_w, with_warmup_stalled=stalled_w,
                vs_warmup=difference.to_dict(), lags=lags,
                fails=fails, warmup_trains=n_w > 0 and diverged_w + stalled_w == 0,
                missing=n < budget.seeds or n_w < budget.seeds))
            what = []
            if diverged:
                what.append(f"diverges in {diverged}/{n}")
            if stalled:
                what.append(f"stalls at the unigram loss in {stalled}/{n}")
            if what:
                rescued = ("the warm-up trains every seed" if n_w and not diverged_w + stalled_w
                           else f"with the warm-up too ({diverged_w + stalled_w}/{n_w})")
                parts.append(f"at lr {_lr(lr)} without warm-up it {' and '.join(what)} seeds; "
                             f"{rescued}")
            elif lags:
                parts.append(f"at lr {_lr(lr)} it trains without warm-up but lags "
                             f"({_effect(difference.to_dict(), 3)})")
            else:
                parts.append(f"at lr {_lr(lr)} it trains without warm-up, no lag detected")
        sentences[base] = f"{_label(plan, base)}: " + "; ".join(parts)
    return dict(long_warmup_fraction=budget.long_warmup_fraction, unigram_loss=unigram_loss(),
                stall_margin=STALL_MARGIN, lrs=sorted(budget.no_warmup_lrs), cells=cells,
                summaries=sentences, verdict=warmup_verdict(cells))


def warmup_verdict(cells: Sequence[dict]) -> str:
    """The claim "post-LN needs warm-up, pre-LN trains without it", read from the grid's cells
    (each: base, lr, fails = a no-warm-up run diverged or stalled, warmup_trains = every
    long-warm-up run trained, missing). The rule is the module docstring's."""
    post, pre = WARMUP_BASES
    if any(c["missing"] for c in cells):
        return WARMUP_MISSING
    by_lr: Dict[float, Dict[str, dict]] = {}
    for c in cells:
        by_lr.setdefault(c["lr"], {})[c["base"]] = c
    if any(g[post]["fails"] and g[post]["warmup_trains"] and not g[pre]["fails"]
           for g in by_lr.values()):
        return WARMUP_SUPPORTED
    if any(g[pre]["fails"] and not g[post]["fails"] for g in by_lr.values()):
        return WARMUP_CONTRADICTED
    if not any(g[post]["fails"] for g in by_lr.values()):
        return WARMUP_NOT_SHOWN
    return WARMUP_NOT_SUPPORTED


def _variant_with(comparison: Comparison, field: str, value) -> Optional[str]:
    """The comparison's variant whose overrides set ``field`` to ``value``."""
    for name in comparison.variants:
        if dict(VARIANTS[name].overrides).get(field) == value:
            return name
    return None


def _first_measure(runs: _Runs, variant: str, measure: str, key: str):
    for result in runs.runs(variant):
        value = ((result.get("measures") or {}).get(measure) or {}).get(key)
        if value is not None:
            return value
    return None


def _length_extrapolation(plan: Plan, runs: _Runs, comparison: Comparison) -> dict:
    rows = []
    for name in comparison.variants:
        at_2T = runs.measure(name, "length_extrapolation", "val_loss_2T")
        note = _first_measure(runs, name, "length_extrapolation", "note")
        rows.append(dict(variant=name, label=_label(plan, name, comparison.name),
                         val_loss_T=_interval(runs.measure(name, "length_extrapolation", "val_loss_T")),
                         val_loss_2T=_interval(at_2T), note=note))
    sinusoidal = _variant_with(comparison, "positions", "sinusoidal")
    rope = _variant_with(comparison, "positions", "rope")
    difference = paired_difference(runs.measure(sinusoidal, "length_extrapolation", "val_loss_2T"),
                                   runs.measure(rope, "length_extrapolation", "val_loss_2T"))
    return dict(seq_len=plan.budget.seq_len, rows=rows,
                rope_vs_sinusoidal_2T=dict(parent=sinusoidal, child=rope, **difference.to_dict()))


def _timed_against_reference(plan: Plan, comparison: Comparison, timing: Optional[dict],
                             name: str) -> dict:
    """A timing's median per variant and its ratio to the comparison's reference (first)."""
    reference = comparison.variants[0]
    entry = ((timing or {}).get("timings") or {}).get(name) or {}
    rows = [dict(variant=v, label=_label(plan, v, comparison.name),
                 median=_timing_value(timing, name, v),
                 ratio=_ratio(_timing_value(timing, name, v), _timing_value(timing, name, reference)))
            for v in comparison.variants]
    return dict(timing=name, unit=entry.get("unit"), what=entry.get("what"), reference=reference,
                rows=rows)


def _kv_cache(plan: Plan, runs: _Runs, comparison: Comparison, timing: Optional[dict]) -> dict:
    decode = _timed_against_reference(plan, comparison, timing, "decode")
    reference = comparison.variants[0]
    reference_bytes = _first_measure(runs, reference, "kv_cache", "bytes_per_token")
    rows = []
    for name, decoded in zip(comparison.variants, decode["rows"]):
        measured = _first_measure(runs, name, "kv_cache", "bytes_per_token")
        rows.append(dict(variant=name, label=_label(plan, name, comparison.name),
                         bytes_per_token=measured,
                         formula_bytes_per_token=_first_measure(runs, name, "kv_cache",
                                                                "formula_bytes_per_token"),
                         bytes_ratio=_ratio(measured, reference_bytes),
                         decode_median=decoded["median"], decode_ratio=decoded["ratio"]))
    return dict(reference=reference, decode_unit=decode["unit"], decode_what=decode["what"],
                rows=rows)


def _document_first_tokens(plan: Plan, runs: _Runs, comparison: Comparison) -> dict:
    pair = comparison.pairs[0]
    out = dict(parent=pair.parent, child=pair.child, first_tokens=plan.budget.first_tokens)
    for key in ("loss_first", "loss_rest"):
        parent = runs.measure(pair.parent, "document_first_tokens", key)
        child = runs.measure(pair.child, "document_first_tokens", key)
        out[key] = dict(parent=_interval(parent), child=_interval(child),
                        difference=paired_difference(parent, child).to_dict())
    for key in ("n_first", "n_rest"):
        out[key] = _first_measure(runs, pair.parent, "document_first_tokens", key)
    return out


# ---- formatting ------------------------------------------------------------------------------


def _loss(x) -> str:
    return DASH if x is None else f"{x:.3f}"


def _loss_interval(summary: Optional[dict]) -> str:
    """0.123 [0.110, 0.136]; 0.123 with one value; — with none."""
    if not summary or summary.get("mean") is None:
        return DASH
    if summary.get("low") is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def _signed(x, digits: int) -> str:
    """+0.0123; a value that rounds to zero is +0.0000, never -0.0000."""
    return DASH if x is None else f"{round(x, digits) + 0.0:+.{digits}f}"


def _effect(difference: dict, digits: int = 4) -> str:
    """+0.0123 [+0.0050, +0.0196]: the mean and its interval (the mean alone below 2 pairs)."""
    if difference.get("mean") is None:
        return DASH
    if difference.get("low") is None:
        return _signed(difference["mean"], digits)
    return (f"{_signed(difference['mean'], digits)} [{_signed(difference['low'], digits)}, "
            f"{_signed(difference['high'], digits)}]")


def _count(x) -> str:
    return DASH if x is None else f"{int(round(x)):,}"


def _ms(x) -> str:
    return DASH if x is None else f"{x:.1f}"


def _times(ratio) -> str:
    return DASH if ratio is None else f"×{ratio:.2f}"


def _measured(value, unit: Optional[str]) -> str:
    """A timing median in its unit: ms with 1 decimal, tokens/s as an integer."""
    if value is None:
        return DASH
    return _ms(value) if unit == "ms" else _count(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _verdict(difference: dict) -> str:
    verdict = difference.get("verdict") or CANNOT_COMPARE
    if verdict == CANNOT_COMPARE:
        return f"{CANNOT_COMPARE} ({difference.get('n', 0)} complete pairs)"
    return verdict


# ---- figures ---------------------------------------------------------------------------------




def _curves(runs: List[dict], key: str, smooth: int = 1):
    """(steps, mean, low, high) of ``key`` over the runs' histories (min–max band);
    the training loss is smoothed by a trailing moving average of ``smooth`` steps."""
    by_step: Dict[int, List[float]] = {}
    for result in runs:
        rows = [(row["step"], _finite(row.get(key))) for row in result["history"] if key in row]
        values = [v for _, v in rows]
        if smooth > 1:
            values = [_moving_mean(values, i, smooth) for i in range(len(values))]
        for (step, _), value in zip(rows, values):
            if value is not None:
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return (np.array(steps), np.array([np.mean(v) for v in values]),
            np.array([min(v) for v in values]), np.array([max(v) for v in values]))


def _moving_mean(values: List[Optional[float]], i: int, window: int) -> Optional[float]:
    recent = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
    return float(np.mean(recent)) if recent and values[i] is not None else None


def _paired_curve(reference: List[dict], runs: List[dict]):
    """(steps, mean, low, high) of the validation loss of ``runs`` minus the reference's, seed
    by seed (the paired difference the tables report, along the training); min–max band."""
    by_seed = {r["seed"]: {row["step"]: _finite(row.get("val_loss")) for row in r["history"]}
               for r in reference}
    by_step: Dict[int, List[float]] = {}
    for result in runs:
        mine = by_seed.get(result["seed"], {})
        for row in result["history"]:
            value, base = _finite(row.get("val_loss")), mine.get(row["step"])
            if value is not None and base is not None:
                by_step.setdefault(row["step"], []).append(value - base)
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return (np.array(steps), np.array([np.mean(v) for v in values]),
            np.array([min(v) for v in values]), np.array([max(v) for v in values]))


def _loss_figure(path: str, plan: Plan, runs: _Runs, comparison: Comparison) -> bool:
    """Three panels against step, one colour per variant, diverged runs left out: the
    validation loss (mean over seeds, min–max band), its paired difference to the reference
    (the first variant, seed by seed) and the smoothed training loss. False when no run has
    finished."""
    finished = {name: [r for r in runs.runs(name) if not r["diverged"]] for name in comparison.variants}
    if not any(finished.values()):
        return False
    plt = pyplot()
    figure, (val_axes, diff_axes, train_axes) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    smooth = max(1, plan.budget.steps // 20)
    reference = comparison.variants[0]
    for i, (name, done) in enumerate(finished.items()):
        if not done:
            continue
        excluded = len(runs.runs(name)) - len(done)
        label = _label(plan, name, comparison.name)
        if excluded:
            label += f" ({excluded} diverged, left out)"
        curves = [(val_axes, _curves(done, "val_loss"), "o"),
                  (train_axes, _curves(done, "loss", smooth), None)]
        if name != reference and finished[reference]:
            curves.append((diff_axes, _paired_curve(finished[reference], done), "o"))
        for axes, (steps, mean, low, high), marker in curves:
            if len(steps) == 0:
                continue
            axes.plot(steps, mean, marker=marker, markersize=3, lw=1.2, color=f"C{i}", label=label)
            axes.fill_between(steps, low, high, color=f"C{i}", alpha=0.2, lw=0)
    diff_axes.axhline(0.0, color="black", lw=0.8)
    reference_label = _label(plan, reference, comparison.name)
    val_axes.set_ylabel("validation loss (nats/token)")
    diff_axes.set_ylabel(f"validation loss − {reference_label}'s (nats/token)", fontsize=9)
    train_axes.set_ylabel("training loss (nats/token)"
                          + (f", mean of {smooth} steps" if smooth > 1 else ""))
    titles = ("validation loss", f"paired difference to {reference_label}", "training loss")
    for axes, what in zip((val_axes, diff_axes, train_axes), titles):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.set_title(f"{what}\n(mean over seeds, band: min–max)", fontsize=9)
        if axes.lines:
            axes.legend(fontsize=8)
    figure.suptitle(comparison.title, fontsize=11)
    figure.tight_layout()
    save_png(figure, path)
    return True


def _warmup_figure(path: str, warmup: dict, plan: Plan) -> bool:
    """Final validation loss vs peak lr, per base: without warm-up (solid, t interval as
    error bars) and with the long warm-up (dashed); diverged runs marked ×."""
    cells = warmup["cells"]
    if not any(c["runs"] for c in cells):
        return False
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    finite_losses = [c["final_val_loss"]["mean"] for c in cells
                     if c["final_val_loss"]["mean"] is not None]
    top = max(finite_losses) if finite_losses else 1.0
    for i, base in enumerate(WARMUP_BASES):
        mine = [c for c in cells if c["base"] == base]
        color = f"C{i}"
        have = [c for c in mine if c["final_val_loss"]["mean"] is not None]
        if have:
            means = np.array([c["final_val_loss"]["mean"] for c in have])
            lows = np.array([c["final_val_loss"]["low"] if c["final_val_loss"]["low"] is not None
                             else c["final_val_loss"]["mean"] for c in have])
            highs = np.array([c["final_val_loss"]["high"] if c["final_val_loss"]["high"] is not None
                              else c["final_val_loss"]["mean"] for c in have])
            axes.errorbar([c["lr"] for c in have], means, yerr=[means - lows, highs - means],
                          color=color, marker="o", capsize=3, label=f"{_label(plan, base)}, no warm-up")
        for c in mine:
            if c["diverged"]:
                axes.plot([c["lr"]], [top], marker="x", markersize=10, color=color, ls="none")
                axes.annotate(f"{c['diverged']}/{c['runs']} diverged", (c["lr"], top),
                              textcoords="offset points", xytext=(4, 6 + 10 * i), fontsize=8,
                              color=color)
    for i, base in enumerate(WARMUP_BASES):
        warmed = [c for c in cells if c["base"] == base and c["with_warmup"]["mean"] is not None]
        if warmed:
            axes.plot([c["lr"] for c in warmed], [c["with_warmup"]["mean"] for c in warmed],
                      color=f"C{i}", ls="--", marker="s", lw=1,
                      label=f"{_label(plan, base)}, {warmup['long_warmup_fraction']:.0%} warm-up")
    axes.set_xscale("log")
    axes.set_xticks(warmup["lrs"], [_lr(lr) for lr in warmup["lrs"]])
    axes.minorticks_off()
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("final validation loss (nats/token)")
    axes.axhline(warmup["unigram_loss"], color="grey", ls=":", lw=1,
                 label=f"unigram loss {warmup['unigram_loss']:.2f} (a stalled run ends here)")
    axes.set_title("Warm-up sensitivity: × marks diverged runs", fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, path)
    return True


def _bars(axes, labels, values, ylabel, title, fmt):
    positions = np.arange(len(labels))
    heights = [v if v is not None else 0.0 for v in values]
    axes.bar(positions, heights, color=[f"C{i}" for i in range(len(labels))])
    for x, v in zip(positions, values):
        axes.annotate(fmt(v) if v is not None else "n/a", (x, v if v is not None else 0.0),
                      ha="center", va="bottom", fontsize=8, textcoords="offset points", xytext=(0, 2))
    axes.set_xticks(positions)
    axes.set_xticklabels(labels, fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3, axis="y")


def _positions_figure(path: str, extrapolation: dict) -> bool:
    rows = extrapolation["rows"]
    if not any(r["val_loss_T"]["mean"] is not None for r in rows):
        return False
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4), dpi=100)
    x = np.arange(len(rows))
    T = extrapolation["seq_len"]
    for offset, key, name in ((-0.2, "val_loss_T", f"T = {T}"), (0.2, "val_loss_2T", f"2T = {2 * T}")):
        values = [r[key]["mean"] for r in rows]
        axes.bar(x + offset, [v if v is not None else 0.0 for v in values], width=0.4, label=name)
        for xi, v in zip(x + offset, values):
            axes.annotate(f"{v:.3f}" if v is not None else "n/a", (xi, v if v is not None else 0.0),
                          ha="center", va="bottom", fontsize=8, textcoords="offset points",
                          xytext=(0, 2))
    axes.set_xticks(x)
    axes.set_xticklabels([r["label"] for r in rows], fontsize=9)
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("Positions: loss at the training length T and at 2T (mean over seeds)", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    save_png(figure, path)
    return True


def _kv_figure(path: str, kv: dict) -> bool:
    rows = kv["rows"]
    if not any(r["bytes_per_token"] is not None or r["decode_median"] is not None for r in rows):
        return False
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    labels = [r["label"] for r in rows]
    _bars(left, labels, [r["bytes_per_token"] for r in rows], "KV cache (bytes/token)",
          "KV-cache bytes per token (measured)", lambda v: f"{int(v):,}")
    unit = kv.get("decode_unit") or "tokens/s"
    _bars(right, labels, [r["decode_median"] for r in rows], f"decode ({unit})",
          "Decoding with the KV cache (median)", lambda v: f"{v:,.1f}" if unit == "ms" else f"{v:,.0f}")
    figure.tight_layout()
    save_png(figure, path)
    return True


# ---- the page --------------------------------------------------------------------------------


def _budget_paragraph(plan: Plan, meta: dict, counts: List[int]) -> str:
    b = plan.budget
    wall = meta.get("wall_time_s")
    wall_text = DASH if wall is None else f"{wall / 60:.1f} minutes ({wall:.0f} s)"
    sessions = meta.get("sessions") or []
    if len(sessions) > 1:
        wall_text += f" over {len(sessions)} sessions (the tour was resumed)"
    size = (f"{min(counts):,}–{max(counts):,} parameters" if counts else "parameters: —")
    command = meta.get("command") or DASH
    return (
        f"Every run trains a decoder of d_model {b.d_model}, {b.n_layers} layers and {b.n_heads} "
        f"heads ({size}) on character-level tiny Shakespeare: sequences of T = {b.seq_len} "
        f"tokens, batches of {b.batch_size}, {b.steps} steps, so {b.tokens:,} training tokens "
        f"per run, in {b.dtype}, with {'seed 0' if b.seeds == 1 else f'seeds 0–{b.seeds - 1}'} "
        f"({b.seeds} seeds; budget \"{b.name}\"). The learning-rate rule is the same for every "
        f"run: AdamW at peak lr {_lr(b.lr)}, a linear warm-up over {b.warmup_steps} steps "
        f"({b.warmup_fraction:.0%} of the steps), then cosine decay to lr/10; weight decay 0.1, "
        f"gradient clipping at norm 1.0 (the warm-up grid below changes only the warm-up and the "
        f"peak lr). CPU: {meta.get('cpu') or DASH}; {b.threads} thread per run, "
        f"{meta.get('workers') or DASH} runs at a time ({meta.get('executor') or DASH} executor); "
        f"wall time of the tour: {wall_text}. Reproduce it with `{command}`.\n")


def _summary_rows(plan: Plan, analysis: List[dict]) -> List[list]:
    rows = []
    for comparison in analysis:
        claim = comparison["claim"]
        for pair in comparison["pairs"]:
            difference = pair["final_val_loss"]
            rows.append([f"{comparison['title']}: {pair['parent_label']} → {pair['child_label']}",
                         claim, f"{_effect(difference)} (n = {difference['n']})",
                         _verdict(difference)])
            claim = "(as above)"
        extra = comparison["extra"]
        if "warmup" in extra:
            warmup = extra["warmup"]
            rows.append([f"{comparison['title']}: without warm-up vs a "
                         f"{warmup['long_warmup_fraction']:.0%} warm-up at lr "
                         + ", ".join(_lr(lr) for lr in warmup["lrs"]),
                         "post-LN needs warm-up; pre-LN trains without it",
                         "; ".join(warmup["summaries"][base] for base in WARMUP_BASES),
                         f"claim {warmup['verdict']}"])
        if "length_extrapolation" in extra:
            at_2T = extra["length_extrapolation"]["rope_vs_sinusoidal_2T"]
            T = extra["length_extrapolation"]["seq_len"]
            rows.append([f"{comparison['title']}: loss at 2T = {2 * T}, "
                         f"{_label(plan, at_2T['parent'], 'positions')} → "
                         f"{_label(plan, at_2T['child'], 'positions')}",
                         "RoPE runs past the training length (a learned table cannot)",
                         f"{_effect(at_2T)} (n = {at_2T['n']})", _verdict(at_2T)])
        if "document_first_tokens" in extra:
            first = extra["document_first_tokens"]
            difference = first["loss_first"]["difference"]
            rows.append([f"{comparison['title']}: loss of the first {first['first_tokens']} tokens "
                         "of each document, mask − no mask", "the mask helps the first tokens",
                         f"{_effect(difference)} (n = {difference['n']})", _verdict(difference)])
    return rows


def _how_to_read(plan: Plan) -> str:
    return (
        "## How to read it\n\n"
        "- **Matched sizes.** Each comparison's variants have parameter counts within ±5 % of its "
        "reference (the first variant listed). A switch that changes the count (SwiGLU's third "
        "matrix, fewer K/V heads, a position table) gets the FFN width d_ff, a multiple of 8, "
        "that brings its total closest to the reference's; every other switch keeps the "
        "preset's d_ff. Each section lists the counts.\n"
        "- **Paired seeds.** Seed s fixes the initial weights and the batch order, and every "
        "variant of a comparison trains on the same batches in the same order under seed s. "
        "The effect is the mean over seeds of the paired difference child − parent in final "
        "validation loss (nats per token; negative: the child reaches a lower loss), with the "
        "Student t interval mean ± t(n−1, 0.975) · sd / √n over the n complete pairs (n − 1 "
        "degrees of freedom; it assumes the differences are roughly normal). A diverged run "
        "leaves its pair out and is counted.\n"
        f"- **Verdicts.** \"{BETTER}\": the 95 % interval lies entirely below 0; \"{WORSE}\": "
        f"entirely above 0; \"{NO_DIFFERENCE}\": it contains 0; \"{CANNOT_COMPARE}\": fewer "
        f"than 2 complete pairs. \"{NO_DIFFERENCE}\" is not \"no difference\": it means an "
        "effect, if there is one, is smaller than this budget can resolve.\n"
        "- **Timings** come from one side-by-side job per comparison: its variants timed "
        f"alternately in one process ({plan.budget.timing_repeats} repeats, median), so their "
        "ratio is measured under the same conditions. A ratio is child ÷ parent (or variant ÷ "
        "reference): for milliseconds below 1 is faster, for tokens/s above 1 is faster. Pair "
        "tables give two: the ratio of the medians, and the same-round ratio (the median over "
        "rounds of the two variants' times in that round, which ran moments apart: it cancels "
        "a drift of the machine's speed that the medians keep).\n\n")


def _variants_section(comparison: dict, notes: List[str]) -> str:
    timing_names = list(comparison["timings"])
    reference = comparison["variants"][0]
    header = ["variant", "parameters", "final val loss (nats/token), mean [95 % interval]",
              "runs (diverged)", "train-step tokens/s (timing job)"]
    for name in timing_names:
        header.append(f"{name} median ({comparison['timings'][name].get('unit', '?')}), "
                      f"ratio to {reference['label']}")
    rows = []
    for variant in comparison["variants"]:
        row = [variant["label"], _count(variant["parameters"]),
               _loss_interval(variant["final_val_loss"]),
               f"{variant['runs']} ({variant['diverged']})", _count(variant["tokens_per_s"])]
        for name in timing_names:
            entry = comparison["timings"][name]
            median = _finite((entry.get("median") or {}).get(variant["name"]))
            base = _finite((entry.get("median") or {}).get(reference["name"]))
            row.append(f"{_measured(median, entry.get('unit'))} ({_times(_ratio(median, base))})")
        rows.append(row)
    if not comparison["timings"]:
        notes.append(f"The timing job `{comparison['timing_job']}` has no result yet: timings are "
                     f"shown as {DASH}.")
    text = _table(header, rows)
    for name in timing_names:
        what = comparison["timings"][name].get("what")
        if what:
            text += f"\n`{name}`: {what}\n"
    return text


def _pairs_section(comparison: dict) -> str:
    timing_names = list(comparison["timings"])
    header = ["parent → child", "effect child − parent (nats), mean [95 % interval]", "n pairs",
              "diverged runs left out", "verdict"]
    header += [f"{name} ratio child ÷ parent (medians; same-round)" for name in timing_names]
    rows = []
    for i, pair in enumerate(comparison["pairs"]):
        difference = pair["final_val_loss"]
        row = [f"{pair['parent_label']} → {pair['child_label']}", _effect(difference),
               difference["n"], pair["excluded_diverged"], _verdict(difference)]
        row += [f"{_times(r['ratio'])}; {_times(r.get('same_round_ratio'))}"
                for r in (comparison["timings"][name]["ratios"][i] for name in timing_names)]
        rows.append(row)
    return _table(header, rows)


def _warmup_section(plan: Plan, warmup: dict) -> str:
    long = f"{warmup['long_warmup_fraction']:.0%} warm-up"
    header = ["model", "peak lr", "final val loss, no warm-up (runs, diverged, stalled)",
              f"final val loss, {long} (runs, diverged, stalled)", f"no warm-up − {long}", "lags"]
    rows = [[cell["label"], _lr(cell["lr"]),
             f"{_loss_interval(cell['final_val_loss'])} ({cell['runs']}, {cell['diverged']}, "
             f"{cell['stalled']})",
             f"{_loss_interval(cell['with_warmup'])} ({cell['with_warmup_runs']}, "
             f"{cell['with_warmup_diverged']}, {cell['with_warmup_stalled']})",
             _effect(cell["vs_warmup"], 3),
             "yes" if cell["lags"] else ("—" if cell["missing"] else "no")]
            for cell in warmup["cells"]]
    text = ("### Warm-up sensitivity\n\n"
            "Each model trained at peak lr "
            f"{', '.join(_lr(x) for x in warmup['lrs'])} twice: without warm-up, and with a "
            f"linear warm-up over {warmup['long_warmup_fraction']:.0%} of the steps (then the same cosine decay), compared "
            "seed by seed at the same lr. A setting **lags** when the 95 % interval of "
            f"\"no warm-up − {long}\" lies entirely above 0; a run **stalls** when its final "
            f"loss is within {warmup['stall_margin']} nats of the unigram loss "
            f"({warmup['unigram_loss']:.3f}: each character predicted by its frequency), i.e. "
            "it learned next to nothing from context; a diverged or stalled run **fails**.\n\n")
    text += _table(header, rows) + "\n"
    text += "".join(f"- {warmup['summaries'][base]}\n" for base in WARMUP_BASES)
    text += (f"\n**Verdict on \"post-LN needs warm-up, pre-LN trains without it\": "
             f"{warmup['verdict']}.** The rule: supported when, at some lr, post-LN fails "
             "without warm-up, its long warm-up trains every seed, and pre-LN does not fail "
             "without warm-up (it may lag); otherwise contradicted when at some lr pre-LN fails "
             "without warm-up and post-LN does not; otherwise not shown when post-LN never fails "
             "without warm-up; otherwise not supported.\n")
    return text


def _positions_section(plan: Plan, extrapolation: dict) -> str:
    T = extrapolation["seq_len"]
    rows = []
    for row in extrapolation["rows"]:
        note = row["note"] or ""
        if row["val_loss_2T"]["mean"] is None and not note:
            note = "no result yet"
        rows.append([row["label"], _loss_interval(row["val_loss_T"]),
                     _loss_interval(row["val_loss_2T"]), note])
    at_2T = extrapolation["rope_vs_sinusoidal_2T"]
    text = (f"### Length extrapolation: evaluated at T = {T} and 2T = {2 * T}\n\n"
            + _table(["positions", f"val loss at T = {T}", f"val loss at 2T = {2 * T}", "note"], rows)
            + f"\n{_label(plan, at_2T['child'], 'positions')} − "
            f"{_label(plan, at_2T['parent'], 'positions')} at 2T: "
            f"{_effect(at_2T)} (n = {at_2T['n']}): {_verdict(at_2T)}.\n")
    return text


def _kv_section(kv: dict) -> str:
    unit = kv.get("decode_unit") or "?"
    rows = [[r["label"], _count(r["bytes_per_token"]), _count(r["formula_bytes_per_token"]),
             _times(r["bytes_ratio"]), _measured(r["decode_median"], unit), _times(r["decode_ratio"])]
            for r in kv["rows"]]
    text = ("### KV cache and decoding\n\n"
            + _table(["variant", "KV bytes/token (measured)", "2·L·K·D·itemsize",
                      "bytes ratio to MHA", f"decode median ({unit})", "decode ratio to MHA"], rows))
    if kv.get("decode_what"):
        text += f"\n`decode`: {kv['decode_what']}\n"
    return text


def _attention_time_section(attention: dict) -> str:
    unit = attention.get("unit") or "?"
    rows = [[r["label"], _measured(r["median"], unit), _times(r["ratio"])] for r in attention["rows"]]
    text = (f"### Attention time at a long sequence (T = {attention['seq_len']})\n\n"
            + _table(["variant", f"attention median ({unit})", "ratio to dense"], rows))
    if attention.get("what"):
        text += f"\n`attention`: {attention['what']}\n"
    return text


def _document_section(plan: Plan, first: dict) -> str:
    rows = []
    for key, what in (("loss_first", f"first {first['first_tokens']} tokens of each document"),
                      ("loss_rest", "the rest of those documents")):
        entry = first[key]
        rows.append([what, _loss_interval(entry["parent"]), _loss_interval(entry["child"]),
                     _effect(entry["difference"]), entry["difference"]["n"],
                     _verdict(entry["difference"])])
    return (f"### The first tokens of each document\n\nValidation loss of the tokens of every "
            "document that starts inside a validation window (not the window's first document), "
            f"per seed: {_count(first['n_first'])} first tokens and {_count(first['n_rest'])} "
            "others.\n\n"
            + _table(["tokens", _label(plan, first["parent"]), _label(plan, first["child"]),
                      "mask − no mask, mean [95 % interval]", "n pairs", "verdict"], rows))


def _closing(plan: Plan, analysis: List[dict], counts: List[int]) -> str:
    b = plan.budget
    halves = [(p["final_val_loss"]["high"] - p["final_val_loss"]["low"]) / 2
              for c in analysis for p in c["pairs"] if p["final_val_loss"]["low"] is not None]
    verdicts = [p["final_val_loss"]["verdict"] for c in analysis for p in c["pairs"]]
    undecided = sum(v == NO_DIFFERENCE for v in verdicts)
    size = f"{min(counts):,}–{max(counts):,}" if counts else DASH
    if halves:
        resolution = (f"The median half-width of the {len(halves)} pair intervals is "
                      f"{float(np.median(halves)):.4f} nats (widest {max(halves):.4f}): an effect "
                      f"smaller than that is not detectable here, and {undecided} of "
                      f"{len(verdicts)} pairs read \"{NO_DIFFERENCE}\".")
    else:
        resolution = "No pair has an interval yet (fewer than 2 complete pairs everywhere)."
    return (
        "## What this budget can and cannot show\n\n"
        f"- **Tiny models, short training.** {size} parameters, {b.steps} steps of "
        f"character-level tiny Shakespeare ({b.tokens:,} tokens per run, {b.seeds} seeds), "
        f"{b.threads} thread per run. The verdicts are about models this size trained this "
        "long; the ranking of switches can change with scale and with training length.\n"
        f"- **Resolution.** {resolution}\n"
        "- **Timings** are ratios measured on this CPU, one thread, at these sizes; another "
        "CPU, more threads or larger matrices change them.\n"
        "- **Not tested here:** claims about scale (SwiGLU or the parallel block at billions of "
        "parameters, GQA's memory savings at long contexts and large batches, banded attention "
        "at thousands of tokens of training context, warm-up at large batch sizes), and any "
        "downstream-task quality; only the validation loss on held-out text is measured.\n")


def _section(plan: Plan, runs: _Runs, comparison: Comparison, analysed: dict, number: int,
             figures_dir: str) -> str:
    notes: List[str] = []
    counts = ", ".join(f"{v['label']} {_count(v['parameters'])}" for v in analysed["variants"])
    text = (f"## {number}. {analysed['title']}\n\n*{analysed['step']}.* "
            f"**Claim:** {analysed['claim']}.\n\n**Parameters** (matched within ±5 % of "
            f"{analysed['variants'][0]['label']}): {counts}.\n\n")
    expected = len(runs.seeds) * len(comparison.variants)
    finished = sum(v["runs"] for v in analysed["variants"])
    if finished < expected:
        notes.append(f"{finished} of {expected} training runs have results; the missing ones "
                     f"are left out (shown as {DASH} where nothing is left).")
    text += _variants_section(analysed, notes) + "\n### Effects\n\n" + _pairs_section(analysed) + "\n"
    extra = analysed["extra"]
    name = comparison.name
    figures = []
    if _loss_figure(os.path.join(figures_dir, f"{name}-loss.png"), plan, runs, comparison):
        figures.append((f"{name}-loss.png", f"{analysed['title']}: loss vs step",
                        "Left: validation loss against step; middle: its difference to "
                        f"{analysed['variants'][0]['label']} seed by seed (the pairs of the table, "
                        "along the training); right: training loss, smoothed. Lines: mean over "
                        "seeds; bands: min–max.\n\n"))
    else:
        notes.append("No finished run yet: no loss-curve figure.")
    if "warmup" in extra:
        text += _warmup_section(plan, extra["warmup"]) + "\n"
        if _warmup_figure(os.path.join(figures_dir, f"{name}-warmup.png"), extra["warmup"], plan):
            figures.append((f"{name}-warmup.png", "final loss vs learning rate without warm-up", ""))
    if "length_extrapolation" in extra:
        text += _positions_section(plan, extra["length_extrapolation"]) + "\n"
        if _positions_figure(os.path.join(figures_dir, f"{name}-2T.png"),
                             extra["length_extrapolation"]):
            figures.append((f"{name}-2T.png", "validation loss at T and 2T", ""))
    if analysed["timings"]:
        absent = [t for t in comparison.timings if t not in analysed["timings"]]
        if absent:
            notes.append(f"The timing job `{analysed['timing_job']}` has no {', '.join(absent)} "
                         f"timing: shown as {DASH}.")
    if "kv_cache" in extra:
        absent = [r["label"] for r in extra["kv_cache"]["rows"] if r["bytes_per_token"] is None]
        if absent:
            notes.append(f"No KV-cache measure yet for {', '.join(absent)}: shown as {DASH}.")
        text += _kv_section(extra["kv_cache"]) + "\n"
        if _kv_figure(os.path.join(figures_dir, f"{name}-kv.png"), extra["kv_cache"]):
            figures.append((f"{name}-kv.png", "KV-cache bytes per token and decode speed", ""))
    if "attention_time" in extra:
        text += _attention_time_section(extra["attention_time"]) + "\n"
    if "document_first_tokens" in extra:
        if extra["document_first_tokens"]["loss_first"]["difference"]["n"] == 0:
            notes.append("No pair of runs with the first-token measure yet: its effect is "
                         f"{DASH}.")
        text += _document_section(plan, extra["document_first_tokens"]) + "\n"
    for file, caption, explanation in figures:
        text += f"![{caption}](figures/{file})\n\n" + explanation
    if notes:
        text += "".join(f"> Note: {note}\n>\n" for note in notes)[:-2] + "\n\n"
    return text


def write_report(out_dir: str, plan: Plan, results: Dict[str, dict], meta: dict) -> str:
    """Write ``out_dir/report.md``, ``out_dir/figures/*.png`` and ``out_dir/results.json``
    (each atomically) from the results so far; return the path of report.md."""
    _check_results(results)
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict (cpu, wall_time_s, workers, executor, command), "
                         f"got {type(meta).__name__}")
    analysis = analyse(plan, results)
    runs = _Runs(plan, results)
    figures_dir = os.path.join(out_dir, "figures")
    for folder in (out_dir, figures_dir):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"the tour's report goes into the directory {folder}, but that is a "
                             "file; pass another --out")
    os.makedirs(figures_dir, exist_ok=True)
    counts = sorted({v["parameters"] for c in analysis for v in c["variants"]
                     if v["parameters"] is not None})
    text = ("# The tour: what each step of the lineage bought\n\n"
            + _budget_paragraph(plan, meta, counts) + "\n## Summary\n\n"
            + _table(["comparison", "claim", "effect child − parent (nats), mean [95 % interval]",
                      "verdict"], _summary_rows(plan, analysis))
            + "\n" + _how_to_read(plan))
    for number, (comparison, analysed) in enumerate(zip(plan.comparisons, analysis), start=1):
        text += _section(plan, runs, comparison, analysed, number, figures_dir)
    text += _closing(plan, analysis, counts)
    path = os.path.join(out_dir, "report.md")
    ckpt.write_atomically(path, [text.encode("utf-8")])
    data = _json_safe(dict(budget=dataclasses.asdict(plan.budget), cpu=meta.get("cpu"), meta=meta,
                           history_every=HISTORY_EVERY, jobs=_thinned(results), comparisons=analysis))
    ckpt.write_atomically(os.path.join(out_dir, "results.json"), [
        json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")])
    return path


# results.json keeps each run's history at every validation step and every HISTORY_EVERY-th
# step (the per-step rows, ~25 MB for a default tour, stay in OUT/jobs/<id>.json)
HISTORY_EVERY = 10


def _thinned(results: Dict[str, dict]) -> Dict[str, dict]:
    thinned = {}
    for job_id, result in results.items():
        if result.get("kind") == "train" and isinstance(result.get("history"), list):
            rows = result["history"]
            keep = [row for i, row in enumerate(rows) if "val_loss" in row
                    or row.get("step", 0) % HISTORY_EVERY == 0 or i == len(rows) - 1]
            result = dict(result, history=keep)
        thinned[job_id] = result
    return thinned
