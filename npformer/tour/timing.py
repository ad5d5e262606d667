"""One comparison's variants timed side by side in one process: ``run_timing_job(job)``.

Performance is measured, not asserted: the variants of a comparison run in the same process,
on the same thread counts, in alternating order, so that the RATIO of their times is what the
report shows — the absolute times belong to this machine and this moment.

The method, for every timing of the job (``job["timings"]``):

1. threads: ``job["threads"]`` for BLAS (threadpoolctl) and numba; numba's previous count is
   restored afterwards;
2. one model per variant, built once (``preset_config(preset, vocab_size=65, ...,
   **model_overrides)``, ``build_model(config, seed=0)``) — the same sizes as its training
   run (the matched d_ff included: the job carries it);
3. warm-up: every variant runs the timed operation ``WARMUP`` times first (numba compiles
   on a first call; the first touch of new memory faults its pages in);
4. rounds: round r runs every variant once, starting at variant r mod n (A B C, B C A,
   C A B, ...), so a drift of the machine (another process, a warming CPU) reaches every
   variant alike and no variant always runs right after the same neighbour; ``gc.collect()``
   before each sample, outside the timed region;
5. the median of each variant's ``repeats`` samples is reported, and every sample, in round
   order: ``samples[a][r]`` and ``samples[b][r]`` ran in the same round r, moments apart, so
   a report may also pair them (per-round ratios) to cancel the machine's slow drift.

The three timings
-----------------
``train_step`` (ms): one step of ``Trainer.train_step`` without its data loading — forward,
the loss (the fused softmax–cross-entropy kernel on ``layer_impl="numba"``, writing
p − onehot(y) over the logits; the functional pair otherwise), ``zero_grad``, backward,
``clip_grad_norm`` (1.0) and an AdamW step (weight decay 0.1, none on norms, biases and
embeddings), on random token batches (B, T) = (batch_size, seq_len), the same batches for
every variant. A model with the document mask gets ``doc_ids`` of a fixed pattern: documents
of T // 4 tokens. ``tokens_per_s`` = B·T / the median step.

``decode`` (tokens/s): :func:`npformer.generate.generate` — greedy (temperature 0), with the
KV cache — writing ``decode_tokens`` tokens from a 1-token prompt, batch 1: one forward per
token, each feeding the one new token and attending over the cached keys and values. A
sample is decode_tokens / its wall time. The model's ``max_seq_len`` is at least
decode_tokens + 1 (``generate`` restarts the cache when its context reaches max_seq_len).

``attention`` (ms): each layer's attention sub-layer alone (``block.attn``: the q/k/v
projections, RoPE where the model has it, the attention core with the layer's own mask —
causal, or causal and banded in a "local" layer — and the output projection), forward then
backward of one random (1, long_seq_len, C) input and output gradient, summed over the
model's layers, inside the model's own fused-path context (``finite_values_checked_once``
on ``layer_impl="numba"``, as within a step). The model is built with max_seq_len =
long_seq_len. GPT-3 alternates dense and local layers: this is where the banded layers'
saving shows.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import numba
import numpy as np

from .._memory import keep_freed_memory_for_reuse
from .._validate import NonFiniteError, check_int, finite_values_checked_once
from ..functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..generate import generate
from ..kernels.cross_entropy import softmax_cross_entropy
from ..models import build_model
from ..optim import AdamW, clip_grad_norm
from ..presets import preset_config
from .jobs import limited_threads

TIMINGS = ("train_step", "decode", "attention")
UNITS = {"train_step": "ms", "decode": "tokens/s", "attention": "ms"}
VOCAB_SIZE = 65  # the shipped Shakespeare's characters, as the tour's training runs
WARMUP = 2  # untimed runs of every variant before the rounds
SEED = 0  # weights (build_model) and the random batches / inputs
# The step's recipe (plan.variant_job): its numbers do not change the step's cost.
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.1, 1.0

_INT_FIELDS = ("batch_size", "seq_len", "long_seq_len", "decode_tokens", "repeats", "threads")


# ---- the job ----------------------------------------------------------------------------


def _check_job(job) -> str:
    """Every field the timing reads, before a model is built; returns the job's label."""
    if not isinstance(job, dict):
        raise ValueError(f"a timing job must be a dict (plan.timing_job), got {type(job).__name__}")
    label = f"timing job {job.get('id', '(no id)')!r}"
    missing = [name for name in ("id", "comparison", "variants", "timings", "dtype", *_INT_FIELDS)
               if name not in job]
    if missing:
        raise ValueError(f"{label}: missing field(s) {missing} (plan.timing_job writes them all)")
    for name in _INT_FIELDS:
        check_int(job[name], f"{label}: {name}", 1)
    if job["threads"] > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"{label}: threads is {job['threads']}, but numba has only "
                         f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS); give at most that")
    timings = job["timings"]
    if not isinstance(timings, (list, tuple)) or not all(t in TIMINGS for t in timings):
        raise ValueError(f"{label}: timings must be a list of names from {list(TIMINGS)}, "
                         f"got {timings!r}")
    if len(set(timings)) != len(timings):
        raise ValueError(f"{label}: timings {timings!r} names one timing twice")
    variants = job["variants"]
    if not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(f"{label}: variants must be a non-empty list, got {variants!r}")
    names = []
    for index, variant in enumerate(variants):
        if not (isinstance(variant, dict) and isinstance(variant.get("variant"), str)
                and isinstance(variant.get("preset"), str)
                and isinstance(variant.get("model_overrides", {}), dict)):
            raise ValueError(f"{label}: variants[{index}] must be a dict with the strings "
                             f"'variant' and 'preset' and a dict 'model_overrides', got {variant!r}")
        names.append(variant["variant"])
    if len(set(names)) != len(names):
        raise ValueError(f"{label}: variant names {names} are not unique")
    return label


def _configs(job: dict, label: str, max_seq_len: int) -> Dict[str, object]:
    """{variant: ModelConfig} at ``max_seq_len``, as its training run builds it otherwise."""
    configs = {}
    for variant in job["variants"]:
        try:
            configs[variant["variant"]] = preset_config(
                variant["preset"], vocab_size=VOCAB_SIZE, max_seq_len=max_seq_len,
                dtype=job["dtype"], dropout=0.0, **variant.get("model_overrides", {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label}: variant {variant['variant']!r}: {error}") from None
        if configs[variant["variant"]].architecture != "decoder":
            raise ValueError(f"{label}: variant {variant['variant']!r} is an encoder-decoder "
                             f"({variant['preset']}); the tour times decoder-only models")
    return configs


def document_ids(batch_size: int, seq_len: int) -> np.ndarray:
    """The fixed packing pattern of a document-mask model: documents of T // 4 tokens
    (at least 1), numbered 0, 1, 2, ... along each row; (B, T) int64."""
    length = max(1, seq_len // 4)
    return np.broadcast_to(np.arange(seq_len) // length, (batch_size, seq_len)).copy()


# ---- alternating rounds -----------------------------------------------------------------


def alternate(runs: Dict[str, Callable[[], float]], repeats: int,
              warmup: int = WARMUP) -> Dict[str, List[float]]:
    """Every run (a call returning its own sample) ``warmup`` times untimed, then ``repeats``
    rounds; round r starts at run r mod n and goes round the list once."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            gc.collect()  # a collection inside a timed region would charge one variant for all
            samples[name].append(float(runs[name]()))
    return samples


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _method(job: dict) -> str:
    return (f"{job['dtype']}, {_threads(job['threads'])}, median of {job['repeats']} "
            f"alternating repeats")


def _result(job: dict, name: str, what: str, samples: Dict[str, List[float]]) -> dict:
    medians = {variant: float(statistics.median(values)) for variant, values in samples.items()}
    for variant, median in medians.items():
        if not (math.isfinite(median) and median > 0):
            raise ValueError(f"timing job {job['id']!r}: {name} of {variant!r} measured {median} "
                             f"(samples {samples[variant]}); a time must be finite and positive")
    return dict(unit=UNITS[name], what=what, median=medians, samples=samples)


# ---- train_step -------------------------------------------------------------------------


class TrainStep:
    """``Trainer.train_step`` without the sampler: forward, loss, zero_grad, backward, clip,
    AdamW, on the batches it is given."""

    def __init__(self, config) -> None:
        self.config = config
        self.model = build_model(config, seed=SEED)
        self.fused = config.layer_impl == "numba"
        self.optimizer = AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                               impl=config.layer_impl)

    def step(self, x: np.ndarray, y: np.ndarray, doc_ids: Optional[np.ndarray]) -> float:
        """One step on x, y (B, T); returns the loss (mirrors Trainer._forward_loss and
        Trainer.train_step)."""
        self.model.train()
        logits = self.model.forward(x, doc_ids=doc_ids if self.config.document_mask else None)
        if self.fused:  # loss and p − onehot(y) in one pass, written over the logits
            loss, dlogits = softmax_cross_entropy(logits, y, dlogits_out=logits)
        else:
            loss, cache = cross_entropy_forward(logits, y)
            dlogits = cross_entropy_backward(1.0, cache)
        loss = float(loss)
        if not math.isfinite(loss):
            raise NonFiniteError(f"the timed training step's loss is {loss} (random tokens, "
                                 f"lr {LR}): the model diverged, so its time means nothing")
        self.model.zero_grad()
        self.model.backward(dlogits)
        grads = self.model.gradients()
        grad_norm = clip_grad_norm(grads, GRAD_CLIP, impl=self.config.layer_impl)
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"the timed training step's gradient norm is {grad_norm}")
        with finite_values_checked_once() if self.fused else contextlib.nullcontext():
            self.optimizer.step(grads, lr=LR)
        return loss


def time_train_step(job: dict, label: str) -> dict:
    B, T = job["batch_size"], job["seq_len"]
    configs = _configs(job, label, max_seq_len=T)
    steps = {name: TrainStep(config) for name, config in configs.items()}
    rng = np.random.default_rng(SEED)
    # the same random batches for every variant: batch i is the i-th step of each
    batches = [rng.integers(0, VOCAB_SIZE, size=(B, T + 1)) for _ in range(WARMUP + job["repeats"])]
    doc_ids = document_ids(B, T)

    def run(step: TrainStep) -> Callable[[], float]:
        count = iter(range(len(batches)))

        def one() -> float:
            tokens = batches[next(count)]
            x, y = tokens[:, :-1].copy(), tokens[:, 1:].copy()  # (B, T) each
            start = time.perf_counter()
            step.step(x, y, doc_ids)
            return (time.perf_counter() - start) * 1e3  # ms
        return one

    samples = alternate({name: run(step) for name, step in steps.items()}, job["repeats"])
    masked = [name for name, config in configs.items() if config.document_mask]
    documents = (f" ({', '.join(masked)}: document mask over documents of {max(1, T // 4)} "
                 "tokens)" if masked else "")
    what = (f"one training step (forward, loss, backward, clip, AdamW) on a batch of {B} × {T} "
            f"random tokens{documents}, {_method(job)}")
    result = _result(job, "train_step", what, samples)
    result["tokens_per_s"] = {name: B * T / (median / 1e3) for name, median in result["median"].items()}
    return result


# ---- decode -----------------------------------------------------------------------------


def time_decode(job: dict, label: str) -> dict:
    n = job["decode_tokens"]
    configs = _configs(job, label, max_seq_len=max(job["seq_len"], n + 1))
    models = {name: build_model(config, seed=SEED) for name, config in configs.items()}
    prompt = [int(np.random.default_rng(SEED).integers(VOCAB_SIZE))]

    def run(model) -> Callable[[], float]:
        def one() -> float:
            start = time.perf_counter()
            new = generate(model, prompt, n, temperature=0.0, use_cache=True)
            elapsed = time.perf_counter() - start
            if len(new) != n:
                raise ValueError(f"{label}: decoding wrote {len(new)} tokens, not {n}")
            return n / elapsed  # tokens/s
        return one

    samples = alternate({name: run(model) for name, model in models.items()}, job["repeats"])
    what = (f"greedy decoding of {n} tokens with the KV cache from a 1-token prompt, batch 1 "
            f"(tokens / wall time), {_method(job)}")
    return _result(job, "decode", what, samples)


# ---- attention --------------------------------------------------------------------------


class AttentionLayers:
    """Every layer's attention sub-layer of one model, forward + backward on one input."""

    def __init__(self, config, long_seq_len: int) -> None:
        self.config = config
        self.model = build_model(config, seed=SEED)
        self.attentions = [block.attn for block in self.model.layers]
        rng = np.random.default_rng(SEED)
        dtype = config.np_dtype
        L, C = long_seq_len, config.d_model
        self.x = rng.standard_normal((1, L, C)).astype(dtype)  # (1, L, C): a normed input
        self.dy = rng.standard_normal((1, L, C)).astype(dtype)  # (1, L, C)
        self.position_ids = np.arange(L)  # (L,), as the decoder passes them
        self.doc_ids = document_ids(1, L) if config.document_mask else None  # (1, L) or None

    def run(self) -> None:
        with self.model._inner_loop():  # the model's own context: the fused path's checks
            for attention in self.attentions:
                _, cache = attention.forward(self.x, doc_ids=self.doc_ids,
                                             position_ids=self.position_ids)
                attention.backward(self.dy, cache)

    def windows(self) -> List[Optional[int]]:
        return [self.config.layer_window(layer) for layer in range(self.config.n_layers)]


def _layer_list(layers: List[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(i) for i in layers)


def time_attention(job: dict, label: str) -> dict:
    L = job["long_seq_len"]
    configs = _configs(job, label, max_seq_len=L)
    layers = {name: AttentionLayers(config, L) for name, config in configs.items()}

    def run(attention: AttentionLayers) -> Callable[[], float]:
        def one() -> float:
            start = time.perf_counter()
            attention.run()
            return (time.perf_counter() - start) * 1e3  # ms
        return one

    samples = alternate({name: run(a) for name, a in layers.items()}, job["repeats"])
    widths = sorted({c.d_model for c in configs.values()})
    depths = sorted({c.n_layers for c in configs.values()})
    banded = []
    for name, attention in layers.items():
        local = [i for i, w in enumerate(attention.windows()) if w is not None]
        if local:
            window = attention.windows()[local[0]]
            banded.append(f"{name}'s {_layer_list([i + 1 for i in local])} of "
                          f"{attention.config.n_layers} banded to a window of {window} keys")
    masks = "; ".join(banded + [f"{'the other' if banded else 'all'} layers causal and dense"])
    rope = [name for name, c in configs.items() if c.positions == "rope"]
    what = (f"forward + backward of each layer's attention sub-layer alone (q/k/v projections"
            f"{', RoPE' if rope else ''}, attention, output projection) on one random "
            f"(1, {L}, {'/'.join(map(str, widths))}) input, summed over the "
            f"{'/'.join(map(str, depths))} layers ({masks}), {_method(job)}")
    return _result(job, "attention", what, samples)


TIMERS = {"train_step": time_train_step, "decode": time_decode, "attention": time_attention}


# ---- the job ----------------------------------------------------------------------------


def run_timing_job(job: dict) -> dict:
    """Time the job's variants side by side (see the module docstring); returns the TIMING
    result: {"id", "kind": "timing", "comparison", "job", "threads", "timings": {name:
    {"unit", "what", "median": {variant: float}, "samples": {variant: [float, ...]}
    [, "tokens_per_s": {variant: float}]}}}."""
    label = _check_job(job)
    threads = job["threads"]
    keep_freed_memory_for_reuse()  # as the Trainer: each step's arrays reuse the last step's memory
    timings = {}
    with limited_threads(threads):
        for name in job["timings"]:
            timings[name] = TIMERS[name](job, label)
            gc.collect()  # the models of one timing go before the next timing's are built
    return dict(id=job["id"], kind="timing", comparison=job["comparison"], job=job,
                threads=threads, timings=timings)
