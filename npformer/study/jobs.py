"""One run of the softmax study: train one variant with one seed, measuring as it goes.

    with limited_threads(job["threads"]):
        trainer = Trainer(...)                                resumed from its checkpoint if any
        for step in job["measure_steps"]:                     0 = at initialisation
            train up to step (a checkpoint is written there)
            measures[step] = measure(trainer.model)           written to runs/<id>/measures/

Every measurement is written atomically to ``<run dir>/measures/step_<N>.json`` the moment
it is taken, and the trainer stops with a checkpoint exactly at each measured step, so a job
killed anywhere resumes from its last checkpoint and re-measures nothing it already has; the
trainer's resume is exact, so the numbers equal an uninterrupted run's.

What one measurement holds (at a step N, model in evaluation mode):

- ``val_loss``: the float32 model's mean next-token loss on the study's evaluation windows;
- ``outliers``: :func:`npformer.study.outliers.outlier_metrics` on those windows (per-module
  ∞-norm and kurtosis, their max and mean, attention mass on the first key and unassigned);
- ``quantized`` (at the steps of ``quantize_steps``): :func:`npformer.study.quantize.
  quantized_losses`, the losses with W8A8, W8 and A8 simulated int8 and their increase over
  float32 (activation ranges calibrated on ``calibration_batches`` windows of the TRAINING
  split, never the evaluation windows).

The evaluation windows are the same for every variant and seed (validation split, a fixed
sampler seed), so every paired difference compares the same tokens. A loss that diverges is a
result (``diverged=True``), as in the tour.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import checkpoint as ckpt
from .._validate import NonFiniteError, check_int
from ..dataset import BatchSampler, load_text, split_train_val
from ..train import Trainer, TrainingDiverged, TrainOptions
from ..tour.jobs import _check_same_run, check_job_id, limited_threads, mean_nll, run_result
from .outliers import outlier_metrics
from .quantize import quantized_losses

EVAL_SEED = 20231212  # the evaluation windows' sampler seed: one set for every run
CALIBRATION_SEED = 7  # the calibration windows' (training split)
JOB_KEYS = ("id", "kind", "variant", "seed", "model_overrides", "train", "measure_steps",
            "quantize_steps", "metric_batches", "calibration_batches", "threads")
MEASURES_DIR = "measures"


def _check_job(job: dict) -> None:
    if not isinstance(job, dict):
        raise ValueError(f"a study job must be a dict, got {type(job).__name__}")
    missing = [key for key in JOB_KEYS if key not in job]
    if missing:
        raise ValueError(f"study job {job.get('id')!r} lacks the field(s) {missing}; a study job "
                         f"has {list(JOB_KEYS)} (see npformer.study.plan.study_job)")
    if job["kind"] != "study":
        raise ValueError(f"study job {job['id']!r}: field 'kind' must be 'study', got {job['kind']!r}")
    check_job_id(job["id"], "study")
    steps = job["measure_steps"]
    if (not isinstance(steps, list) or not steps or steps != sorted(set(steps))
            or steps[0] < 0 or steps[-1] != job["train"].get("steps")):
        raise ValueError(f"study job {job['id']!r}: measure_steps must be an increasing list of "
                         f"steps ≥ 0 ending at train.steps, got {steps!r}")
    if not isinstance(job["quantize_steps"], list) or not set(job["quantize_steps"]) <= set(steps):
        raise ValueError(f"study job {job['id']!r}: quantize_steps must be a list of measured "
                         f"steps, got {job['quantize_steps']!r}")
    for name in ("metric_batches", "calibration_batches"):
        check_int(job[name], f"study job field {name!r}", 1)


def evaluation_windows(trainer: Trainer, n_batches: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The study's evaluation batches (x, y), each (B, T): validation split, fixed seed."""
    return _windows(trainer, n_batches, split=1, seed=EVAL_SEED)


def calibration_windows(trainer: Trainer, n_batches: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Batches (x, y) of the TRAINING split that calibrate the activation quantizers."""
    return _windows(trainer, n_batches, split=0, seed=CALIBRATION_SEED)


def _windows(trainer: Trainer, n_batches: int, split: int, seed: int):
    options = trainer.options
    stream = split_train_val(trainer.tokenizer.encode(load_text(options.data)))[split]
    sampler = BatchSampler(stream, options.batch_size, options.seq_len, seed)
    return [tuple(sampler.next()[:2]) for _ in range(n_batches)]


def measure(model, eval_batches, calibration_batches, quantize: bool) -> dict:
    """The study's measurement of one model (evaluation mode; the model is not changed);
    ``quantize``: also the simulated int8 losses (the costly part: 4 evaluations and 2
    calibrations)."""
    model.eval()
    measured = dict(val_loss=float(mean_nll(model, eval_batches)),
                    outliers=outlier_metrics(model, [x for x, _ in eval_batches]))
    if quantize:
        measured["quantized"] = quantized_losses(model, calibration_batches, eval_batches)
    return measured


def _measure_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, MEASURES_DIR, f"step_{step}.json")


def run_study_job(job: dict, work_dir: str) -> dict:
    """Train (or resume) one study run in ``<work_dir>/runs/<id>``, measuring at every step of
    ``job["measure_steps"]``; returns the result dict (JSON-serialisable)."""
    started = time.perf_counter()
    _check_job(job)
    run_dir = os.path.join(work_dir, "runs", job["id"])
    with limited_threads(job["threads"]):
        options = TrainOptions(**job["train"], out=run_dir,
                               model_overrides=dict(job["model_overrides"]))
        resume = os.path.isdir(run_dir) and ckpt.latest_checkpoint(run_dir) is not None
        if resume:
            _check_same_run(job, run_dir)
        trainer = Trainer(options, resume=resume, overwrite=not resume, progress=False,
                          log=lambda message: None)
        eval_batches = evaluation_windows(trainer, job["metric_batches"])
        calibration = calibration_windows(trainer, job["calibration_batches"])
        first_step, train_started = trainer.step, time.perf_counter()
        measures: Dict[str, dict] = {}
        diverged: Optional[Tuple[int, str]] = None
        for step in job["measure_steps"]:
            path = _measure_path(run_dir, step)
            if os.path.exists(path):
                measures[str(step)] = ckpt.read_json(path)
                continue
            if trainer.step > step:
                raise ValueError(f"study job {job['id']!r}: {run_dir} is at step {trainer.step} "
                                 f"but has no measurement of step {step}; remove the run "
                                 "directory to start it again")
            try:
                if trainer.step < step:  # train up to the measured step, with a checkpoint there
                    trainer.options = dataclasses.replace(
                        options, stop_after=step if step < options.steps else None)
                    trainer.run()
                measured = measure(trainer.model, eval_batches, calibration,
                                   step in job["quantize_steps"])
            except (TrainingDiverged, NonFiniteError) as error:
                done = trainer.history[-1]["step"] if trainer.history else 0
                diverged = (done + 1, str(error))
                break
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ckpt.write_json(path, measured)
            measures[str(step)] = measured
        seconds_training = time.perf_counter() - train_started
    tokens = (trainer.step - first_step) * options.batch_size * options.seq_len
    final = measures.get(str(job["measure_steps"][-1])) if diverged is None else None
    return dict(
        run_result(job, "study", trainer, diverged),
        final_val_loss=None if final is None else final["val_loss"],
        measures=measures,
        tokens_per_s=float(tokens / max(seconds_training, 1e-9)),
        seconds=float(time.perf_counter() - started))
