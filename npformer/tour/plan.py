"""What the tour trains: the comparisons, their variants, the matched sizes, the budgets, the jobs.

Each comparison is one step of the lineage measured against its parent: a BASE config (a
preset at the tour's size) and variants that each change only the switch the step changed,
so a difference in loss belongs to that switch and not to the other changes a paper made at
the same time. Where a preset is exactly one switch away from its parent (GPT-1 → GPT-2, the
pre-LN step; GPT-2 → GPT-3, the banded layers) the presets themselves are trained.

Equal budget, paired seeds
--------------------------
Every run of a tour sees the same number of tokens (``steps × batch_size × seq_len``) with
the same optimiser (AdamW, warm-up then cosine decay to lr/10, weight decay 0.1, gradient
clip 1.0) and the same peak learning rate; seed s fixes the batch order (the samplers are
seeded by s) and the initial weights, so the runs of seed s form a PAIR across variants:
their difference in loss is free of the batch-order noise that the seeds share.

Matched size: every variant's parameter count lies within ±5 % of its comparison's
reference (the first variant listed). The rule: a variant whose switch changes the count
(SwiGLU's third matrix, fewer K/V heads, a position table) gets the FFN width d_ff — a
multiple of 8 — that brings its total parameter count closest to the reference's; the other
switches keep the preset's d_ff. ``check_matched_sizes`` asserts the ±5 %.

A job is one variant × one seed (``kind="train"``), or one comparison's side-by-side timing
(``kind="timing"``: the variants of a comparison timed alternately in one process, so their
ratio is measured under the same conditions). Jobs are plain JSON dicts, so a local worker
process and a Dask worker run exactly the same thing (``npformer.tour.jobs.run_job``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..models.stats import parameter_count
from ..presets import preset_config

SIZE_TOLERANCE = 0.05  # matched sizes: every variant within ±5 % of its reference's parameters
D_FF_STEP = 8  # matched sizes: d_ff is searched over multiples of this


class RunLengths:
    """What a budget with ``steps``, ``batch_size``, ``seq_len`` and ``warmup_fraction`` says
    about each run (the tour's and the softmax study's budgets)."""

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))

    @property
    def tokens(self) -> int:
        """Training tokens per run: the equal budget."""
        return self.steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class Budget(RunLengths):
    """The sizes and lengths of a tour. ``QUICK`` checks the machinery in CI; ``DEFAULT`` is
    the committed report's budget (docs/tour/)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int  # T, the training length; positions are also evaluated at 2T
    batch_size: int
    steps: int
    seeds: int
    lr: float = 3e-3  # the peak learning rate of every run (warm-up sensitivity adds others)
    warmup_fraction: float = 0.05  # warm-up steps = this × steps (at least 1)
    # post-LN vs pre-LN: each trained at these peak lrs without warm-up and with a long one
    no_warmup_lrs: Tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    long_warmup_fraction: float = 0.25
    eval_interval: int = 50
    eval_batches: int = 8
    dtype: str = "float32"
    first_tokens: int = 16  # document mask: the loss of each document's first tokens
    long_seq_len: int = 1024  # dense vs banded: attention timed at this length
    decode_tokens: int = 128  # MHA/GQA/MQA: tokens decoded with the KV cache, timed
    timing_repeats: int = 15  # side-by-side timings: median of this many alternating repeats
    checkpoints: int = 4  # per run: how far back a killed job restarts (each save costs ~0.3 s)
    threads: int = 1  # threads per job (numba and BLAS); the tour runs jobs in parallel instead

    @property
    def window(self) -> int:
        """The banded layers' window (GPT-3's alternation): half the training length."""
        return self.seq_len // 2

    def replace(self, **changes) -> "Budget":
        return dataclasses.replace(self, **changes)


QUICK = Budget(name="quick", d_model=32, n_layers=2, n_heads=4, seq_len=32, batch_size=8,
               steps=30, seeds=2, eval_interval=10, eval_batches=2, first_tokens=8,
               long_seq_len=128, decode_tokens=16, timing_repeats=3, checkpoints=1)
DEFAULT = Budget(name="default", d_model=64, n_layers=4, n_heads=4, seq_len=128, batch_size=16,
                 steps=600, seeds=4, eval_interval=50, eval_batches=16)
BUDGETS = {b.name: b for b in (QUICK, DEFAULT)}


@dataclass(frozen=True)
class Variant:
    """One model and training recipe: a preset, the switches changed on it, and whether it
    trains with warm-up (and at which peak lr; None = the budget's)."""

    name: str  # unique in the tour, also the run directory's prefix: "gpt2-swiglu"
    label: str  # for tables and legends: "SwiGLU"
    preset: str
    overrides: Tuple[Tuple[str, object], ...] = ()  # config fields changed on the preset
    match_size_to: Optional[str] = None  # a variant whose parameter count this one matches
    warmup: bool = True
    warmup_fraction: Optional[float] = None  # None: the budget's (5 %); norm-placement's long one
    lr: Optional[float] = None
    packed_documents: bool = False  # train and evaluate on packed documents (document mask)

    def model_overrides(self, budget: Budget) -> Dict[str, object]:
        """Config overrides at the budget's size (before the matched-size d_ff)."""
        sizes = dict(d_model=budget.d_model, n_layers=budget.n_layers, n_heads=budget.n_heads)
        fields = dict(self.overrides)
        if fields.get("n_kv_heads") is not None and fields["n_kv_heads"] > 1:
            fields["n_kv_heads"] = budget.n_heads // 2  # grouped-query: 2 query heads per K/V head
        if "local" in preset_config(self.preset, **fields).attention_pattern:
            fields["window"] = budget.window
        return {**sizes, **fields}


@dataclass(frozen=True)
class Pair:
    """parent → child: the effect reported is child − parent (negative = the child is better)."""

    parent: str
    child: str


@dataclass(frozen=True)
class Comparison:
    name: str  # for --only: "ffn"
    title: str  # "ReLU vs GeLU vs SwiGLU"
    step: str  # where in the lineage: "GPT-1 (GeLU), PaLM (SwiGLU)"
    claim: str  # what the papers claimed, in one sentence
    variants: Tuple[str, ...]  # the reference (size-matched to) first
    pairs: Tuple[Pair, ...]
    measures: Tuple[str, ...] = ()  # extra measurements of every training run (jobs.MEASURES)
    timings: Tuple[str, ...] = ("train_step",)  # side-by-side timings (jobs.TIMINGS)


def _v(name, label, preset, match=None, **overrides) -> Variant:
    return Variant(name, label, preset, tuple(sorted(overrides.items())), match_size_to=match)


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    # GPT-1 → GPT-2: post-LN → pre-LN (+ the final norm and the scaled residual init that come
    # with it); also both with a long warm-up (a quarter of the steps), the recipe post-LN needs
    _v("gpt1", "post-LN (GPT-1)", "gpt1"),
    _v("gpt2", "pre-LN (GPT-2)", "gpt2"),
    dataclasses.replace(_v("gpt1-longwarmup", "post-LN (GPT-1), 25 % warm-up", "gpt1"),
                        warmup_fraction=0.25),
    dataclasses.replace(_v("gpt2-longwarmup", "pre-LN (GPT-2), 25 % warm-up", "gpt2"),
                        warmup_fraction=0.25),
    # the feed-forward, on GPT-2 (the GeLU FFN of GPT-1/2 is the gpt2 run)
    _v("gpt2-relu", "ReLU", "gpt2", ffn="relu"),
    _v("gpt2-swiglu", "SwiGLU", "gpt2", match="gpt2", ffn="swiglu", ffn_bias=False),
    # positions, on GPT-2 (learned = the gpt2 run)
    # sinusoidal positions come with the 2017 √C scale of the token embeddings: without it the
    # positions (entries of size ~0.7) swamp embeddings initialised at std 0.02
    _v("gpt2-sinusoidal", "sinusoidal (×√C embeddings)", "gpt2", match="gpt2",
       positions="sinusoidal", scale_embeddings=True),
    _v("gpt2-rope", "RoPE", "gpt2", match="gpt2", positions="rope"),
    # GPT-J/PaLM's parallel block, on GPT-2
    _v("gpt2-parallel", "parallel (GPT-J)", "gpt2", match="gpt2", block="parallel",
       parallel_norms=1),
    # GPT-3: GPT-2 with alternating dense and banded layers
    _v("gpt3", "dense/banded (GPT-3)", "gpt3"),
    # the K/V heads and the norm, on Llama 1 (MHA, RMSNorm)
    _v("llama1", "MHA (Llama 1)", "llama1"),
    _v("llama1-gqa", "GQA (Llama 2)", "llama1", match="llama1", n_kv_heads=2),
    _v("llama1-mqa", "MQA (PaLM)", "llama1", match="llama1", n_kv_heads=1),
    _v("llama1-layernorm", "LayerNorm, no bias (PaLM)", "llama1", norm="layernorm"),
    # Llama 3's document mask, both trained and evaluated on the same packed documents
    dataclasses.replace(_v("llama1-packed", "packed, no mask", "llama1"), packed_documents=True),
    dataclasses.replace(_v("llama1-docmask", "packed + document mask (Llama 3)", "llama1",
                           document_mask=True), packed_documents=True),
]}


def no_warmup_variant(base: str, lr: float) -> Variant:
    """The warm-up sensitivity runs: ``base`` trained at peak ``lr`` from step 1."""
    return dataclasses.replace(VARIANTS[base], name=f"{base}-nowarmup-lr{lr:g}",
                               label=f"{VARIANTS[base].label}, no warm-up, lr {lr:g}",
                               warmup=False, lr=lr)


def long_warmup_variant(base: str, lr: float, budget: "Budget") -> Variant:
    """The warm-up sensitivity's reference at peak ``lr``: ``base`` with the long warm-up
    (``budget.long_warmup_fraction`` of the steps); at the budget's lr, ``<base>-longwarmup``."""
    if lr == budget.lr:
        return VARIANTS[f"{base}-longwarmup"]
    fraction = budget.long_warmup_fraction
    return dataclasses.replace(VARIANTS[base], name=f"{base}-warmup{fraction:.0%}-lr{lr:g}".replace("%", "pct"),
                               label=f"{VARIANTS[base].label}, {fraction:.0%} warm-up, lr {lr:g}",
                               warmup_fraction=fraction, lr=lr)


COMPARISONS: Tuple[Comparison, ...] = (
    Comparison("norm-placement", "post-LN vs pre-LN", "GPT-1 → GPT-2",
               "pre-LN trains without a learning-rate warm-up and at least as well; post-LN "
               "needs warm-up (Xiong et al. 2020)",
               ("gpt1", "gpt2", "gpt1-longwarmup", "gpt2-longwarmup"),
               (Pair("gpt1", "gpt2"), Pair("gpt1-longwarmup", "gpt2-longwarmup"))),
    Comparison("ffn", "ReLU vs GeLU vs SwiGLU", "2017 (ReLU) → GPT-1 (GeLU) → PaLM (SwiGLU)",
               "GeLU beats ReLU, and SwiGLU beats GeLU at equal parameters (Shazeer 2020)",
               ("gpt2", "gpt2-relu", "gpt2-swiglu"),
               (Pair("gpt2-relu", "gpt2"), Pair("gpt2", "gpt2-swiglu"))),
    Comparison("positions", "sinusoidal vs learned vs RoPE", "2017 → GPT-1 → GPT-J",
               "learned positions match sinusoidal ones; RoPE beats both, and unlike a learned "
               "table it can run past the training length",
               ("gpt2", "gpt2-sinusoidal", "gpt2-rope"),
               (Pair("gpt2-sinusoidal", "gpt2"), Pair("gpt2", "gpt2-rope")),
               measures=("length_extrapolation",)),
    Comparison("kv-heads", "MHA vs GQA vs MQA", "Llama 1 (MHA) → PaLM (MQA), Llama 2 (GQA)",
               "sharing K/V heads costs little loss and shrinks the KV cache and the decode "
               "time (Shazeer 2019; Ainslie et al. 2023)",
               ("llama1", "llama1-gqa", "llama1-mqa"),
               (Pair("llama1", "llama1-gqa"), Pair("llama1", "llama1-mqa")),
               measures=("kv_cache",), timings=("train_step", "decode")),
    Comparison("block", "sequential vs parallel block", "GPT-Neo → GPT-J, PaLM",
               "the parallel block trains faster per step at a small cost in loss at small "
               "scale (Wang & Komatsuzaki 2021; Chowdhery et al. 2022)",
               ("gpt2", "gpt2-parallel"), (Pair("gpt2", "gpt2-parallel"),)),
    Comparison("norm", "LayerNorm vs RMSNorm", "PaLM → Llama 1",
               "RMSNorm matches LayerNorm's loss and is cheaper (Zhang & Sennrich 2019)",
               ("llama1", "llama1-layernorm"), (Pair("llama1-layernorm", "llama1"),)),
    Comparison("attention-pattern", "dense vs alternating banded attention", "GPT-2 → GPT-3",
               "banded (local) layers cost little loss and less attention time at long "
               "sequences (Child et al. 2019; Brown et al. 2020)",
               ("gpt2", "gpt3"), (Pair("gpt2", "gpt3"),), timings=("train_step", "attention")),
    Comparison("document-mask", "document mask on packed documents", "Llama 2 → Llama 3",
               "on packed documents, masking attention across documents helps the first tokens "
               "of each document (Llama Team 2024)",
               ("llama1-packed", "llama1-docmask"), (Pair("llama1-packed", "llama1-docmask"),),
               measures=("document_first_tokens",)),
)
COMPARISON_NAMES = tuple(c.name for c in COMPARISONS)
WARMUP_BASES = ("gpt1", "gpt2")  # the warm-up sensitivity grid of "norm-placement"


def get_comparisons(only: Optional[Sequence[str]] = None) -> Tuple[Comparison, ...]:
    """The comparisons named by --only (all when None), in the tour's order."""
    if only is None:
        return COMPARISONS
    unknown = [name for name in only if name not in COMPARISON_NAMES]
    if unknown or not only:
        raise ValueError(f"--only: unknown comparison(s) {unknown or '(none given)'}; valid names: "
                         f"{list(COMPARISON_NAMES)}")
    return tuple(c for c in COMPARISONS if c.name in only)


def matched_d_ff(variant: Variant, budget: Budget) -> Optional[int]:
    """The matched-size rule: None (the preset's d_ff) unless the variant matches another's
    size; then the multiple of 8 giving the parameter count closest to the reference's (the
    smaller d_ff on a tie)."""
    if variant.match_size_to is None:
        return None
    reference = parameter_count(model_config(VARIANTS[variant.match_size_to], budget, vocab_size=65))
    base = model_config(variant, budget, vocab_size=65, d_ff=None)
    best, best_gap = None, None
    for d_ff in range(D_FF_STEP, 16 * budget.d_model + 1, D_FF_STEP):
        gap = abs(parameter_count(base.replace(d_ff=d_ff)) - reference)
        if best_gap is None or gap < best_gap:
            best, best_gap = d_ff, gap
    return best


def sized_overrides(variant: Variant, budget: Budget) -> Dict[str, object]:
    """The variant's config overrides at the budget's size, with the matched-size d_ff."""
    overrides = variant.model_overrides(budget)
    d_ff = matched_d_ff(variant, budget)
    if d_ff is not None:
        overrides["d_ff"] = d_ff
    return overrides


def model_config(variant: Variant, budget: Budget, vocab_size: int, **extra):
    """The variant's ModelConfig at the budget's size (what its training run builds)."""
    # (matched_d_ff itself asks for d_ff=None: the preset's width, before the rule)
    overrides = variant.model_overrides(budget) if "d_ff" in extra else sized_overrides(variant, budget)
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return preset_config(variant.preset, vocab_size=vocab_size, max_seq_len=budget.seq_len,
                         dtype=budget.dtype, dropout=0.0, **overrides)


def check_matched_sizes(comparison: Comparison, budget: Budget, vocab_size: int = 65) -> Dict[str, int]:
    """Every variant's parameter count, after asserting each is within ±5 % of the first's."""
    counts = {name: parameter_count(model_config(VARIANTS[name], budget, vocab_size))
              for name in comparison.variants}
    reference = counts[comparison.variants[0]]
    for name, count in counts.items():
        if abs(count - reference) > SIZE_TOLERANCE * reference:
            raise AssertionError(f"{comparison.name}: {name} has {count} parameters, more than "
                                 f"{SIZE_TOLERANCE:.0%} from {comparison.variants[0]}'s {reference}")
    return counts


@dataclass
class Plan:
    budget: Budget
    comparisons: Tuple[Comparison, ...]
    variants: Dict[str, Variant] = field(default_factory=dict)  # every variant trained
    jobs: List[dict] = field(default_factory=list)  # training jobs first, then the timings


def variant_job(variant: Variant, budget: Budget, seed: int, measures: Sequence[str]) -> dict:
    """One training run as a JSON-able job (what ``jobs.run_job`` executes)."""
    overrides = sized_overrides(variant, budget)
    lr = budget.lr if variant.lr is None else variant.lr
    fraction = budget.warmup_fraction if variant.warmup_fraction is None else variant.warmup_fraction
    return dict(
        id=f"{variant.name}-seed{seed}", kind="train", variant=variant.name, seed=seed,
        preset=variant.preset, model_overrides=overrides,
        train=dict(preset=variant.preset, steps=budget.steps, batch_size=budget.batch_size,
                   seq_len=budget.seq_len, lr=lr, min_lr=lr / 10,
                   warmup_steps=max(1, round(fraction * budget.steps)) if variant.warmup else 0,
                   weight_decay=0.1, grad_clip=1.0, seed=seed, eval_interval=budget.eval_interval,
                   eval_batches=budget.eval_batches, checkpoint_interval=max(1, budget.steps // budget.checkpoints),
                   dtype=budget.dtype, packed_documents=variant.packed_documents),
        measures=sorted(measures), first_tokens=budget.first_tokens, threads=budget.threads)


def timing_job(comparison: Comparison, budget: Budget) -> dict:
    """The comparison's variants timed side by side in one process (``jobs.run_job``)."""
    variants = []
    for name in comparison.variants:
        variant = VARIANTS[name]
        entry = dict(variant=name, preset=variant.preset,
                     model_overrides=sized_overrides(variant, budget),
                     packed_documents=variant.packed_documents)
        if any({**v, "variant": name} == entry for v in variants):
            continue  # the same model with another training recipe (a longer warm-up): timed once
        variants.append(entry)
    return dict(id=f"timing-{comparison.name}", kind="timing", comparison=comparison.name,
                variants=variants, timings=list(comparison.timings), dtype=budget.dtype,
                batch_size=budget.batch_size, seq_len=budget.seq_len,
                long_seq_len=budget.long_seq_len, decode_tokens=budget.decode_tokens,
                repeats=budget.timing_repeats, threads=budget.threads)


def tour_plan(budget: Budget, only: Optional[Sequence[str]] = None) -> Plan:
    """Every job of a tour: each comparison's variants × seeds 0..seeds−1 (a variant shared by
    two comparisons is trained once), the warm-up grid with "norm-placement", then one timing
    job per comparison."""
    comparisons = get_comparisons(only)
    plan = Plan(budget, comparisons)
    measures: Dict[str, set] = {}
    for comparison in comparisons:
        check_matched_sizes(comparison, budget)
        names = list(comparison.variants)
        if comparison.name == "norm-placement":
            for base in WARMUP_BASES:
                for lr in budget.no_warmup_lrs:
                    for variant in (no_warmup_variant(base, lr), long_warmup_variant(base, lr, budget)):
                        plan.variants[variant.name] = variant
                        names.append(variant.name)
        for name in names:
            plan.variants.setdefault(name, VARIANTS.get(name))
            measures.setdefault(name, set()).update(comparison.measures)
    for seed in range(budget.seeds):
        for name, variant in plan.variants.items():
            plan.jobs.append(variant_job(variant, budget, seed, measures[name]))
    plan.jobs.extend(timing_job(comparison, budget) for comparison in comparisons)
    return plan
