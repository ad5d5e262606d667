"""The softmax study's design: the model, the variants, the budget and the jobs.

One GPT-2-style decoder (the ``gpt2`` preset: pre-LN LayerNorm with biases, tanh-GeLU FFN,
learned positions, tied embeddings, float32) is trained five times per seed, once per
attention variant; nothing else differs:

=========  ===========================================================================
softmax    the baseline: p_j = exp(z_j) / Σ_k exp(z_k)
softmax1   softmax₁ (Miller 2023): p_j = exp(z_j) / (1 + Σ_k exp(z_k)), a phantom key
           with logit 0 and value 0
sink       a learned per-head sink logit s_h (gpt-oss): p_j = exp(z_j) / (exp(s_h) +
           Σ_k exp(z_k)), s_h initialised to 0 (so it starts as softmax₁)
clipped    clipped softmax (Bondarenko et al. 2023) with a length-aware stretch for causal
           rows: p = clip((1 − γ_i)·softmax(z) + γ_i, 0, 1), γ_i = −α / n_i, n_i the keys row
           i sees (i + 1)
gated      gated attention (Bondarenko et al. 2023): head h's output times σ(x_h·w_h + b_h),
           x_h the head's slice of the attention input, b_h = logit(0.25) at init
=========  ===========================================================================

Pairing: seed s fixes the shared initial weights (a variant's extra parameters — sinks, gate
weights — are drawn after the shared ones, so they do not shift them) and the batch order, so
the five runs of seed s differ only in the attention variant, and every comparison with the
baseline is a paired difference over seeds (:mod:`npformer.tour.stats`).

Every run gets the same token budget and recipe (AdamW, peak ``lr``, linear warm-up for
``warmup_fraction`` of the steps, cosine decay to lr/10, weight decay, gradient clipping at
1), and is measured (:mod:`npformer.study.jobs`) at the steps of ``measure_steps``: at
initialisation, during training, and at the end.

Why the clipped variant's α: with a per-row γ_i = −α/n_i a key is clipped to exactly 0 when
its weight is below α/(n_i + α), about α times the uniform weight 1/n_i; a head can then
attend to "nothing but one key" with finite logits, the mechanism Bondarenko et al. want.
But a row whose weights are all near uniform — every row at initialisation, when the scores
are ≈ 0 — is clipped to all zeros for α > 1 (then (1 + α/n)/n − α/n < 0), and a clipped
weight passes no gradient: attention would never start to learn. So α < 1: the study uses
α = ``clip_alpha`` (0.5: keys below about half the uniform weight are dropped), and says so.
The OPT setting of the paper, a fixed γ = −12/T, also clips every near-uniform row longer
than ~12 keys at initialisation; in a causal model only the first rows learn at first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from ..tour.plan import RunLengths

PRESET = "gpt2"  # the model every variant starts from (npformer.presets)


@dataclass(frozen=True)
class StudyBudget(RunLengths):
    """Sizes, lengths and measurement schedule of a study. ``QUICK`` checks the machinery (CI);
    ``DEFAULT`` is the committed report's budget (docs/study/softmax/)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int  # T
    batch_size: int  # B: each step trains on B·T tokens
    steps: int
    seeds: int
    measure_steps: Tuple[int, ...]  # loss and outlier metrics measured here (0 = at init)
    quantize_steps: Tuple[int, ...]  # and simulated int8 here too (a subset; ends at steps)
    metric_batches: int  # validation batches (B, T) for the outlier metrics and every loss
    calibration_batches: int  # training-split batches that calibrate the activation ranges
    lr: float = 3e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    clip_alpha: float = 0.5  # the clipped variant's length-aware γ_i = −α / n_i
    eval_interval: int = 100  # the trainer's own validation loss, for the history
    eval_batches: int = 8
    dtype: str = "float32"
    checkpoints: int = 8  # per run: how far back a killed job restarts
    threads: int = 1  # per job; the study runs jobs side by side instead

    @property
    def control_step(self) -> int:
        """The early step the positive control compares the end of training with: the first
        measurement after initialisation (at initialisation the residual stream is the
        0.02-scale embeddings, so growth from there says nothing about outliers)."""
        return min(s for s in self.measure_steps if s > 0)

    def replace(self, **changes) -> "StudyBudget":
        return dataclasses.replace(self, **changes)

    def with_steps(self, steps: int) -> "StudyBudget":
        """The same schedule stretched to ``steps``: every measured step scaled in proportion
        (rounded, duplicates dropped), the last one at ``steps``."""
        def scale(schedule):
            return tuple(sorted({round(s * steps / self.steps) for s in schedule} | {steps}))

        return self.replace(steps=steps, measure_steps=scale(self.measure_steps),
                            quantize_steps=scale(self.quantize_steps))

    def validate(self) -> None:
        steps = list(self.measure_steps)
        if steps != sorted(set(steps)) or not steps or steps[-1] != self.steps or steps[0] < 0:
            raise ValueError(f"measure_steps must be increasing, ≥ 0 and end at steps="
                             f"{self.steps}, got {self.measure_steps}")
        if not set(self.quantize_steps) <= set(steps) or self.steps not in self.quantize_steps:
            raise ValueError(f"quantize_steps must be measured steps and include the last one "
                             f"({self.steps}), got {self.quantize_steps}")
        if not any(s > 0 for s in steps[:-1]):
            raise ValueError("measure_steps needs an early step between 0 and the last one "
                             f"(the positive control's reference), got {self.measure_steps}")
        if self.seeds < 2:
            raise ValueError(f"a paired study needs at least 2 seeds, got seeds={self.seeds}")


QUICK = StudyBudget(name="quick", d_model=32, n_layers=2, n_heads=4, seq_len=32, batch_size=8,
                    steps=40, seeds=2, measure_steps=(0, 10, 40), quantize_steps=(10, 40),
                    metric_batches=2,
                    calibration_batches=2, eval_interval=20, eval_batches=2, checkpoints=2)
DEFAULT = StudyBudget(name="default", d_model=128, n_layers=4, n_heads=4, seq_len=128,
                      batch_size=16, steps=1000, seeds=5,
                      measure_steps=(0, 125, 250, 500, 750, 1000),
                      quantize_steps=(125, 500, 1000), metric_batches=6, calibration_batches=4)
BUDGETS = {b.name: b for b in (QUICK, DEFAULT)}


@dataclass(frozen=True)
class StudyVariant:
    name: str
    label: str  # as the report writes it
    overrides: Tuple[Tuple[str, object], ...] = ()  # config fields changed on the baseline

    def model_overrides(self, budget: StudyBudget) -> Dict[str, object]:
        overrides = dict(d_model=budget.d_model, n_layers=budget.n_layers, n_heads=budget.n_heads)
        for key, value in self.overrides:
            overrides[key] = budget.clip_alpha if value == "budget.clip_alpha" else value
        return overrides


BASELINE = "softmax"
VARIANTS: Tuple[StudyVariant, ...] = (
    StudyVariant("softmax", "softmax (baseline)"),
    StudyVariant("softmax1", "softmax₁ (off by one)", (("softmax", "softmax1"),)),
    StudyVariant("sink", "learned sink logit", (("softmax", "sink"),)),
    StudyVariant("clipped", "clipped softmax, length-aware γ",
                 (("softmax", "clipped"), ("clip_alpha", "budget.clip_alpha"))),
    StudyVariant("gated", "gated attention", (("attention_gate", True),)),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class StudyPlan:
    budget: StudyBudget
    variants: Tuple[StudyVariant, ...]
    jobs: List[dict] = field(default_factory=list)


def study_job(variant: StudyVariant, budget: StudyBudget, seed: int) -> dict:
    """One training run with its measurements, as a JSON-able job (``jobs.run_study_job``)."""
    return dict(
        id=f"{variant.name}-seed{seed}", kind="study", variant=variant.name, seed=seed,
        model_overrides=variant.model_overrides(budget),
        train=dict(preset=PRESET, steps=budget.steps, batch_size=budget.batch_size,
                   seq_len=budget.seq_len, lr=budget.lr, min_lr=budget.lr / 10,
                   warmup_steps=budget.warmup_steps, weight_decay=budget.weight_decay,
                   grad_clip=1.0, seed=seed, eval_interval=budget.eval_interval,
                   eval_batches=budget.eval_batches,
                   checkpoint_interval=max(1, budget.steps // budget.checkpoints),
                   dtype=budget.dtype),
        measure_steps=list(budget.measure_steps), quantize_steps=list(budget.quantize_steps),
        metric_batches=budget.metric_batches,
        calibration_batches=budget.calibration_batches, threads=budget.threads)


def study_plan(budget: StudyBudget) -> StudyPlan:
    """Every variant × seeds 0..seeds−1, seed-major (an interrupted study has whole seeds)."""
    budget.validate()
    plan = StudyPlan(budget, VARIANTS)
    for seed in range(budget.seeds):
        plan.jobs.extend(study_job(variant, budget, seed) for variant in VARIANTS)
    return plan
