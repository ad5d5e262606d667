"""One job of the tour: a JSON dict in, a JSON dict out (``run_job``).

Every tour worker — a local process or a Dask worker — runs exactly this function, so a job
means the same thing wherever it runs. ``kind="timing"`` goes to
:func:`npformer.tour.timing.run_timing_job`; ``kind="train"`` (built by
:func:`npformer.tour.plan.variant_job`) trains one variant with one seed and measures it:

    with limited_threads(job["threads"]):                  numba and BLAS, restored afterwards
        trainer = Trainer(TrainOptions(**job["train"], out=<work_dir>/runs/<id>, ...))
        trainer.run()                                       resumed if the run has a checkpoint
        measures = {name: MEASURE(trainer.model, ...) for name in job["measures"]}

A job killed mid-way leaves checkpoints in its run directory; running it again resumes from
the latest one, and the trainer guarantees that a resumed run gives the same numbers, bit for
bit, as an uninterrupted one. A loss that becomes NaN or infinite (``TrainingDiverged``) is a
RESULT — ``diverged=True``, the step, the message, the history so far, no final loss, no
measures — because "this recipe diverges" is one of the things the tour reports (post-LN
without warm-up). Any other exception propagates: it is a bug or a bad job, not a finding.

Reproducibility: the same job gives the same result bit for bit (float32 and float64), in
the same process or a fresh one, apart from ``seconds`` and ``tokens_per_s``: training is
the trainer's deterministic loop, every sampler is seeded from the job's seed, greedy
decoding has no randomness, and every loss below is reduced in float64 in a fixed order.
The job runs with ``job["threads"]`` threads (the tour runs one-thread jobs side by side).

The measurements
----------------
Every loss here is the per-token negative log-likelihood of the next token, from the
model's logits z (B, T, V) in evaluation mode, computed in float64 with a stable log-softmax
(:func:`npformer.functional.cross_entropy.cross_entropy_forward`, ``reduction="none"``):

    nll[b, t] = log Σ_v exp(z[b, t, v] − m) + m − z[b, t, y[b, t]],   m = max_v z[b, t, v]

and a mean over a set of positions is Σ nll / count, summed in float64.

``length_extrapolation`` (positions): the validation loss at the training length T and at
2T, on windows of the trainer's validation split (the same sampler, seeded ``seed + 1``).
At 2T the model is rebuilt with ``max_seq_len = 2T`` and the trained weights assigned to it.
Sinusoidal positions and RoPE have no position parameters (their tables are functions of the
position), so the weights fit unchanged; a learned position table has T rows and nothing for
positions T..2T−1, so ``val_loss_2T`` is null and the note says why.

``kv_cache`` (MHA/GQA/MQA): greedy decoding with the KV cache from a 1-token prompt, one
token per forward, until the cache holds T positions; then the bytes the caches actually hold
(Σ over layers of K's and V's ``nbytes``, each (1, K, T, D)) divided by the T cached tokens,
beside the formula

    bytes per token = 2 (K and V) · L layers · K kv-heads · D head size · itemsize.

``document_first_tokens`` (the document mask): validation windows of packed documents,
exactly as the trainer builds them (blank-line separated documents, the last 10 % by
document, ``PackedBatchSampler(..., seed + 1)``), with ``doc_ids`` passed to the model only
if it has the document mask (as in training). A row's documents are numbered 0, 1, …; the
first (0) began before the window, so neither it nor the mask-free model has seen its start
either way: it is left out of "first" and "rest". Of every document d ≥ 1 (it starts inside
the window), its first k positions are "first" and the later ones "rest"; "all" is every
position. Without the mask the first tokens of a document attend to the previous document;
with it they see only their own document, as if it began the sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, fields
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import checkpoint as ckpt
from .._validate import NonFiniteError, check_int
from ..dataset import (BatchSampler, PackedBatchSampler, load_text, split_documents,
                       split_train_val)
from ..functional.cross_entropy import cross_entropy_forward
from ..generate import draw
from ..models import build_model
from ..models.stats import parameter_count
from ..train import Trainer, TrainingDiverged, TrainOptions

MEASURES = ("document_first_tokens", "kv_cache", "length_extrapolation")
TIMINGS = ("train_step", "decode", "attention")  # timing.run_timing_job's names
HISTORY_KEYS = ("step", "loss", "lr", "grad_norm", "val_loss")  # a result's history row
TRAIN_JOB_KEYS = ("id", "variant", "seed", "model_overrides", "train", "measures", "threads")


# ---- threads ---------------------------------------------------------------------------------


@contextlib.contextmanager
def limited_threads(threads: int):
    """Run the block with ``threads`` threads for BLAS (threadpoolctl) and numba; numba's
    previous count and the BLAS libraries' are restored on the way out, even after an error."""
    import numba
    from threadpoolctl import threadpool_limits

    available = numba.config.NUMBA_NUM_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= available:
        raise ValueError(f"job field 'threads' must be an integer in [1, {available}] (numba's "
                         f"NUMBA_NUM_THREADS on this machine), got {threads!r}")
    before = numba.get_num_threads()
    with threadpool_limits(limits=threads, user_api="blas"):
        numba.set_num_threads(threads)
        try:
            yield
        finally:
            numba.set_num_threads(before)


# ---- the entry point -------------------------------------------------------------------------


def run_job(job: dict, work_dir: str) -> dict:
    """Run one tour job (a dict from :mod:`npformer.tour.plan`) and return its result dict
    (JSON-serialisable; the schema is in the module docstring of this file and in the tour's
    README). Train jobs keep their run directory in ``<work_dir>/runs/<job id>``."""
    if not isinstance(job, dict):
        raise ValueError(f"a tour job must be a dict, got {type(job).__name__}")
    kind = job.get("kind")
    if kind == "timing":
        from .timing import run_timing_job  # imported here: this module works without it

        return run_timing_job(job)
    if kind == "train":
        return run_train_job(job, work_dir)
    raise ValueError(f"job {job.get('id')!r}: field 'kind' must be 'train' or 'timing', got {kind!r}")


def _check_train_job(job: dict) -> None:
    missing = [key for key in TRAIN_JOB_KEYS if key not in job]
    if missing:
        raise ValueError(f"train job {job.get('id')!r} lacks the field(s) {missing}; a train job "
                         f"has {list(TRAIN_JOB_KEYS)} (see npformer.tour.plan.variant_job)")
    if not isinstance(job["train"], dict) or not isinstance(job["model_overrides"], dict):
        raise ValueError(f"train job {job['id']!r}: 'train' and 'model_overrides' must be dicts")
    allowed = {f.name for f in fields(TrainOptions)} - {"out", "model_overrides"}
    unknown = sorted(set(job["train"]) - allowed)
    if unknown:
        raise ValueError(f"train job {job['id']!r}: 'train' has unknown option(s) {unknown}; "
                         f"valid: {sorted(allowed)} (the run directory and the model overrides "
                         "come from the job)")
    if not isinstance(job["measures"], (list, tuple)) or set(job["measures"]) - set(MEASURES):
        raise ValueError(f"train job {job['id']!r}: 'measures' must be a list of names from "
                         f"{list(MEASURES)}, got {job['measures']!r}")
    if "document_first_tokens" in job["measures"]:
        check_int(job.get("first_tokens"), "job field 'first_tokens'", 1)
    check_job_id(job["id"], "train")


def check_job_id(job_id, kind: str) -> None:
    """A job's id names its run directory: a non-empty name, no path separator, not . or .."""
    if not isinstance(job_id, str) or not job_id or os.sep in job_id or job_id in (".", ".."):
        raise ValueError(f"{kind} job id must be a non-empty name usable as a directory, got "
                         f"{job_id!r}")


def run_train_job(job: dict, work_dir: str) -> dict:
    """A ``kind="train"`` job: train (or resume) in ``<work_dir>/runs/<id>``, then measure."""
    started = time.perf_counter()
    _check_train_job(job)
    with limited_threads(job["threads"]):
        trainer, diverged, tokens_per_s = _train(job, os.path.join(work_dir, "runs", job["id"]))
        measures: Dict[str, Optional[dict]] = {}
        if diverged is None and job["measures"]:
            validation = ValidationData.of(trainer)
            for name in job["measures"]:
                measures[name] = _measure(name, trainer, validation, job)
        elif diverged is not None:  # broken weights measure nothing
            measures = {name: None for name in job["measures"]}
    return dict(
        run_result(job, "train", trainer, diverged),
        final_val_loss=None if diverged is not None else _float_or_none(trainer.last_val_loss()),
        tokens_per_s=float(tokens_per_s), seconds=float(time.perf_counter() - started),
        measures=measures)


def run_result(job: dict, kind: str, trainer: Trainer,
               diverged: Optional[Tuple[int, str]]) -> dict:
    """The fields every training result shares (the tour's and the softmax study's): the job,
    the parameter count, the divergence if any, and the trainer's history rows."""
    history = [{key: (int(row[key]) if key == "step" else float(row[key]))
                for key in HISTORY_KEYS if key in row} for row in trainer.history]
    return dict(
        id=job["id"], kind=kind, variant=job["variant"], seed=job["seed"], job=job,
        parameters=int(parameter_count(trainer.config)),
        diverged=diverged is not None,
        diverged_at_step=None if diverged is None else diverged[0],
        divergence=None if diverged is None else diverged[1],
        history=history)


def _float_or_none(value) -> Optional[float]:
    return None if value is None else float(value)


def _train(job: dict, run_dir: str) -> Tuple[Trainer, Optional[Tuple[int, str]], float]:
    """(trainer after its run, (step, message) if the loss diverged else None, tokens/s of
    the steps trained by this call). A run directory holding a checkpoint is resumed."""
    options = TrainOptions(**job["train"], out=run_dir, model_overrides=dict(job["model_overrides"]))
    resume = os.path.isdir(run_dir) and ckpt.latest_checkpoint(run_dir) is not None
    if resume:
        _check_same_run(job, run_dir)
    trainer = Trainer(options, resume=resume, overwrite=not resume, progress=False,
                      log=lambda message: None)
    first_step, started = trainer.step, time.perf_counter()
    diverged = None
    try:
        trainer.run()
    except (TrainingDiverged, NonFiniteError) as error:
        # The step that diverged is the first one without a history row: the trainer appends a
        # step's row after its training step AND its validation (if any) succeeded. (The
        # trainer turns a layer's NonFiniteError into a TrainingDiverged in both training and
        # validation; the NonFiniteError is caught too in case a future path lets one out.)
        step = (trainer.history[-1]["step"] if trainer.history else 0) + 1
        message = str(error) if isinstance(error, TrainingDiverged) else (
            f"the validation loss after step {step} could not be computed: NaN or infinite "
            f"inside the model ({error})")
        diverged = (step, message)
    seconds = time.perf_counter() - started
    tokens = (trainer.step - first_step) * options.batch_size * options.seq_len
    return trainer, diverged, tokens / max(seconds, 1e-9)


def _check_same_run(job: dict, run_dir: str) -> None:
    """A run directory is resumed only by the job that started it: the trainer checks the
    fields that would break the checkpoint (preset, sizes, dtype, seed); a changed lr, number of
    steps or evaluation interval would silently mix two recipes in one history."""
    path = os.path.join(run_dir, "train.json")
    saved = ckpt.read_json(path) if os.path.isfile(path) else {}
    asked = json.loads(json.dumps(dict(job["train"], model_overrides=job["model_overrides"])))
    asked.pop("stop_after", None)  # stopping early is how a kill is simulated, not a recipe
    changed = {key: (saved.get(key), value) for key, value in asked.items() if saved.get(key) != value}
    if changed:
        raise ValueError(f"train job {job['id']!r}: {run_dir} holds a run with other options "
                         + ", ".join(f"{key}={old!r} (the job has {new!r})"
                                     for key, (old, new) in sorted(changed.items()))
                         + "; a job resumes only its own run: remove that directory or use "
                         "another work directory")


def _measure(name: str, trainer: Trainer, validation: "ValidationData", job: dict) -> dict:
    options = trainer.options
    if trainer.config.architecture != "decoder":
        raise ValueError(f"train job {job['id']!r}: the measure {name!r} needs a decoder-only "
                         f"model, not {trainer.config.architecture!r}")
    model = trainer.model.eval()
    B, T, seed, n = options.batch_size, options.seq_len, options.seed + 1, options.eval_batches
    if name == "length_extrapolation":
        return length_extrapolation(model, validation, trainer.packed, B, T, seed, n)
    if name == "kv_cache":
        return kv_cache_bytes(model, prompt_id=int(validation.stream[0]), n_tokens=T)
    return document_first_tokens(model, validation.documents, B, T, seed, n, job["first_tokens"])


# ---- validation data, as the trainer builds it ------------------------------------------------


@dataclass
class ValidationData:
    """The trainer's validation split in both of its forms (``Trainer._build``):

    stream: (N,) the last 10 % of the tokenized text (``split_train_val``);
    documents: the last 10 % of the blank-line separated documents, each (L_i,) tokens.
    """

    stream: np.ndarray
    documents: List[np.ndarray]

    @classmethod
    def of(cls, trainer: Trainer) -> "ValidationData":
        text, tokenizer = load_text(trainer.options.data), trainer.tokenizer
        documents = [tokenizer.encode(d) for d in split_documents(text)]
        return cls(split_train_val(tokenizer.encode(text))[1], documents[int(len(documents) * 0.9):])

    def sampler(self, packed: bool, batch_size: int, seq_len: int, seed: int) -> BatchSampler:
        """The trainer's validation sampler (``seed`` = the run's seed + 1), at any length."""
        if packed:
            return PackedBatchSampler(self.documents, batch_size, seq_len, seed)
        return BatchSampler(self.stream, batch_size, seq_len, seed)


def take(sampler: BatchSampler, n_batches: int) -> Iterator[tuple]:
    """The sampler's next ``n_batches`` batches: (x, y) or (x, y, doc_ids), each (B, T)."""
    for _ in range(n_batches):
        yield sampler.next()


# ---- per-token losses ------------------------------------------------------------------------


def token_nll(model, batch: tuple) -> np.ndarray:
    """nll (B, T) float64: −log p(y[b, t] | x[b, ≤ t]) for a batch (x, y[, doc_ids]) (B, T).

    The model runs in its current mode (call ``model.eval()`` first); ``doc_ids`` reach it only
    if its config has ``document_mask`` (what the trainer does). The log-softmax is the stable
    one, on the logits (B, T, V) converted to float64:
    nll = log Σ_v exp(z_v − m) + m − z_y with m = max_v z_v.
    """
    x, y = batch[0], batch[1]
    doc_ids = batch[2] if len(batch) > 2 and model.config.document_mask else None
    logits = model.forward(x, doc_ids=doc_ids)  # (B, T, V)
    model._last_cache = None  # nothing to backpropagate: free the activations
    nll, _ = cross_entropy_forward(logits.astype(np.float64), y, reduction="none")  # (B, T)
    return nll


def mean_nll(model, batches: Iterable[tuple]) -> float:
    """The mean of :func:`token_nll` over every position of every batch (float64 sums)."""
    total, count = 0.0, 0
    for batch in batches:
        nll = token_nll(model, batch)  # (B, T)
        total += float(np.sum(nll))
        count += nll.size
    return total / count


# ---- length_extrapolation --------------------------------------------------------------------


def length_extrapolation(model, validation: ValidationData, packed: bool, batch_size: int,
                         seq_len: int, seed: int, n_batches: int) -> dict:
    """Validation loss at the training length T = ``seq_len`` and at 2T.

    Both use ``n_batches`` batches of (B, T) and (B, 2T) windows of the validation split from
    the trainer's validation sampler (``seed`` = run seed + 1). At 2T the model is built again
    from its config with ``max_seq_len = 2T`` and the trained weights are assigned to it; a
    parameter whose shape depends on ``max_seq_len`` (the learned position table, (T, C)
    against (2T, C)) makes 2T undefined: ``val_loss_2T`` is None and ``note`` says why.
    """
    T = seq_len
    result = dict(seq_len=T, val_loss_T=mean_nll(
        model, take(validation.sampler(packed, batch_size, T, seed), n_batches)),
        val_loss_2T=None, note=None)
    long_model = model_at_length(model, 2 * T)
    if isinstance(long_model, str):
        result["note"] = long_model
        return result
    result["val_loss_2T"] = mean_nll(
        long_model.eval(), take(validation.sampler(packed, batch_size, 2 * T, seed), n_batches))
    return result


def model_at_length(model, max_seq_len: int):
    """The trained ``model`` rebuilt with ``max_seq_len`` and its weights assigned, or, when a
    weight's shape depends on the length (a learned position table), a note saying why not."""
    config = model.config
    long_model = build_model(config.replace(max_seq_len=max_seq_len), seed=0)
    trained, fresh = model.parameters(), long_model.parameters()
    changed = [name for name in trained if trained[name].shape != fresh[name].shape]
    if changed:
        shapes = ", ".join(f"{name} {trained[name].shape} → {fresh[name].shape}" for name in changed)
        why = (f"learned positions (positions={config.positions!r}): the position table has "
               f"{config.max_seq_len} rows, one per trained position, and none for positions "
               f"{config.max_seq_len}..{max_seq_len - 1}") if config.positions == "learned" else \
            "these weights depend on max_seq_len"
        return f"cannot evaluate at {max_seq_len} positions: {why} ({shapes})"
    ckpt.assign_parameters(long_model, trained)
    return long_model


# ---- kv_cache --------------------------------------------------------------------------------


def kv_cache_bytes(model, prompt_id: int, n_tokens: int) -> dict:
    """Bytes per token of the KV cache, measured and from the formula.

    Greedy decoding from the 1-token prompt ``[prompt_id]``, one token per forward with the
    KV cache, ``n_tokens`` tokens decoded: the caches then hold the prompt and the first
    n_tokens − 1 decoded tokens, S = n_tokens positions, each layer's K and V (1, K, S, D).
    Measured: Σ_layers (K.nbytes + V.nbytes) / S. Formula: 2 · L · K · D · itemsize.
    """
    config = model.config
    n_tokens = check_int(n_tokens, "n_tokens", 1)
    if n_tokens > config.max_seq_len:
        raise ValueError(f"n_tokens={n_tokens} exceeds the model's max_seq_len={config.max_seq_len}")
    model.eval()
    caches = model.new_kv_caches()
    token = prompt_id
    for _ in range(n_tokens):
        logits = model.forward(np.array([[token]]), kv_caches=caches)  # (1, 1, V)
        token = draw(logits[0, -1], 0.0, None, None)  # greedy: no randomness
    cached = {cache.length for cache in caches}
    if cached != {n_tokens}:
        raise AssertionError(f"the KV caches hold {sorted(cached)} positions after decoding "
                             f"{n_tokens} tokens one at a time; each should hold {n_tokens}")
    held = sum(cache.k.nbytes + cache.v.nbytes for cache in caches)  # Σ_layers 2 · S · K · D · itemsize
    formula = 2 * config.n_layers * config.kv_heads * config.head_size * config.np_dtype.itemsize
    return dict(bytes_per_token=int(held // n_tokens), formula_bytes_per_token=int(formula),
                decoded_tokens=int(n_tokens))


# ---- document_first_tokens -------------------------------------------------------------------


def document_position_masks(doc_ids: np.ndarray, first_tokens: int) -> Tuple[np.ndarray, np.ndarray]:
    """(first, rest), each (B, T) bool, from the packed rows' ``doc_ids`` (B, T).

    doc_ids number the documents of each row 0, 1, 2, … from its first position (documents are
    contiguous: non-decreasing along a row, starting at 0). A position t of document d ≥ 1
    lies o = t − start(d) tokens into it; it is "first" if o < k = ``first_tokens`` and "rest"
    otherwise. Document 0 started before the window: in neither mask.
    """
    doc_ids = np.asarray(doc_ids)
    if doc_ids.ndim != 2 or not np.issubdtype(doc_ids.dtype, np.integer):
        raise ValueError(f"doc_ids must be a (B, T) integer array, got {doc_ids.dtype} {doc_ids.shape}")
    if (doc_ids[:, 0] != 0).any() or (np.diff(doc_ids, axis=1) < 0).any():
        raise ValueError("doc_ids must number each row's documents from 0 and never decrease "
                         "along a row (contiguous documents, as PackedBatchSampler builds them)")
    k = check_int(first_tokens, "first_tokens", 1)
    B, T = doc_ids.shape
    t = np.arange(T)  # (T,)
    starts = np.ones((B, T), dtype=bool)  # (B, T) a document begins here (or the row does)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # (B, T) start(d) of t's doc
    offset = t - start_of  # (B, T) o
    inside = doc_ids >= 1  # (B, T) the document started inside the window
    return inside & (offset < k), inside & (offset >= k)


def document_token_losses(model, batches: Iterable[tuple], first_tokens: int) -> dict:
    """``loss_first``, ``loss_rest``, ``loss_all`` (mean NLL, float64) and ``n_first``,
    ``n_rest`` over packed batches (x, y, doc_ids) (B, T); a mean over no position is None."""
    sums = dict(first=0.0, rest=0.0, all=0.0)
    counts = dict(first=0, rest=0, all=0)
    for batch in batches:
        nll = token_nll(model, batch)  # (B, T)
        first, rest = document_position_masks(batch[2], first_tokens)  # (B, T) each
        for name, mask in (("first", first), ("rest", rest), ("all", np.ones_like(first))):
            sums[name] += float(np.sum(nll[mask]))
            counts[name] += int(np.count_nonzero(mask))
    mean = {name: sums[name] / counts[name] if counts[name] else None for name in sums}
    return dict(first_tokens=int(first_tokens), loss_first=mean["first"], loss_rest=mean["rest"],
                loss_all=mean["all"], n_first=counts["first"], n_rest=counts["rest"])


def document_first_tokens(model, documents: Sequence[np.ndarray], batch_size: int, seq_len: int,
                          seed: int, n_batches: int, first_tokens: int) -> dict:
    """:func:`document_token_losses` on ``n_batches`` validation batches of packed documents
    (``PackedBatchSampler(documents, batch_size, seq_len, seed)``, as the trainer's)."""
    sampler = PackedBatchSampler(list(documents), batch_size, seq_len, seed)
    return document_token_losses(model.eval(), take(sampler, n_batches), first_tokens)
