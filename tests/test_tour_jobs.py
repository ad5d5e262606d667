"""``npformer.tour.jobs``: one tour job (a JSON dict) trained, resumed, measured, reproduced."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numba
import numpy as np
import pytest

from npformer._validate import NonFiniteError
from npformer.models import build_model
from npformer.models.stats import parameter_count
from npformer.presets import preset_config
from npformer.train import Trainer, TrainOptions
from npformer.tour import jobs, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = plan.QUICK.replace(steps=6, seeds=1, eval_interval=3, eval_batches=2)
TIMES = ("seconds", "tokens_per_s")


def _job(variant: str, budget=TINY, measures=(), seed=0) -> dict:
    return plan.variant_job(plan.VARIANTS[variant], budget, seed, measures)


def _without_times(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in TIMES}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each job run once for the module: {name: (job, result, work_dir)}."""
    work = tmp_path_factory.mktemp("tour")
    jobs_by_name = {
        "rope32": _job("gpt2-rope", measures=jobs.MEASURES),
        "docmask64": _job("llama1-docmask", TINY.replace(dtype="float64"), jobs.MEASURES),
        "gpt2": _job("gpt2", measures=["length_extrapolation"]),
        "sinusoidal": _job("gpt2-sinusoidal", measures=["length_extrapolation"]),
        "rope64": _job("gpt2-rope", TINY.replace(dtype="float64"), ["length_extrapolation"]),
    }
    return {name: (job, jobs.run_job(job, str(work / name)), str(work / name))
            for name, job in jobs_by_name.items()}


# ---- the result ------------------------------------------------------------------------------


def test_a_train_result_has_the_schema(results):
    job, result, _ = results["rope32"]
    assert json.loads(json.dumps(result)) == result  # JSON as it stands (no tuple, no NaN)
    assert result["job"] == job and result["id"] == job["id"] and result["kind"] == "train"
    assert (result["variant"], result["seed"]) == ("gpt2-rope", 0)
    assert result["parameters"] == parameter_count(plan.model_config(
        plan.VARIANTS["gpt2-rope"], TINY, vocab_size=65))
    assert result["diverged"] is False and result["diverged_at_step"] is None
    assert result["divergence"] is None
    assert [row["step"] for row in result["history"]] == list(range(1, TINY.steps + 1))
    assert all(set(row) == {"step", "loss", "lr", "grad_norm"} | ({"val_loss"} if row["step"] % 3 == 0
                                                                   else set())
               for row in result["history"])
    assert result["final_val_loss"] == result["history"][-1]["val_loss"]
    assert result["tokens_per_s"] > 0 and result["seconds"] > 0
    assert set(result["measures"]) == set(jobs.MEASURES)


@pytest.mark.parametrize("name", ["rope32", "docmask64"])
def test_the_same_job_gives_the_same_result_bit_for_bit(results, tmp_path, name):
    job, first, _ = results[name]
    again = jobs.run_job(copy.deepcopy(job), str(tmp_path))
    assert _without_times(again) == _without_times(first)  # floats compared with ==


def test_a_fresh_process_gives_the_same_result_bit_for_bit(results, tmp_path):
    job, first, _ = results["rope32"]
    script = ("import json, sys; from npformer.tour.jobs import run_job; "
              "print(json.dumps(run_job(json.loads(sys.argv[1]), sys.argv[2])))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(job), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _without_times(json.loads(done.stdout)) == _without_times(json.loads(json.dumps(first)))


def test_a_killed_job_resumes_to_the_uninterrupted_result(results, tmp_path, monkeypatch):
    job, uninterrupted, _ = results["rope32"]
    killed = copy.deepcopy(job)
    killed["train"]["stop_after"] = 3  # what a kill after the step-3 checkpoint leaves
    partial = jobs.run_job(killed, str(tmp_path))
    assert [row["step"] for row in partial["history"]] == [1, 2, 3]
    resumed_flags = []
    real_trainer = jobs.Trainer

    def spying_trainer(options, **kwargs):
        resumed_flags.append(kwargs["resume"])
        return real_trainer(options, **kwargs)

    monkeypatch.setattr(jobs, "Trainer", spying_trainer)
    resumed = jobs.run_job(job, str(tmp_path))
    assert resumed_flags == [True]  # it continued the run, it did not start again
    assert _without_times(resumed) == _without_times(uninterrupted)


def test_a_run_directory_is_resumed_only_by_its_own_job(results, tmp_path):
    job, _, _ = results["rope32"]
    killed = copy.deepcopy(job)
    killed["train"]["stop_after"] = 2
    jobs.run_job(killed, str(tmp_path))
    other = copy.deepcopy(job)
    other["train"]["lr"] = 1e-3  # the trainer itself would resume it with the new lr
    with pytest.raises(ValueError, match=r"other options lr=0\.003 \(the job has 0\.001\)"):
        jobs.run_job(other, str(tmp_path))


# ---- divergence ------------------------------------------------------------------------------


def test_a_diverged_run_is_a_result_not_an_error(tmp_path):
    job = _job("llama1", measures=["kv_cache"])
    job["train"].update(lr=1e3, min_lr=1e2, grad_clip=0.0, warmup_steps=0)
    result = jobs.run_job(job, str(tmp_path))
    assert json.loads(json.dumps(result)) == result
    assert result["diverged"] is True and result["final_val_loss"] is None
    assert result["measures"] == {"kv_cache": None}
    step = result["diverged_at_step"]
    # the rows of the steps before the divergence, and none after
    assert [row["step"] for row in result["history"]] == list(range(1, step))
    assert all(np.isfinite(row["loss"]) for row in result["history"])
    assert "NaN or infinite" in result["divergence"]
    # run again: resumed from the last good checkpoint, it diverges at the same step
    again = jobs.run_job(job, str(tmp_path))
    assert (again["diverged_at_step"], again["history"]) == (step, result["history"])


@pytest.mark.parametrize("where", ["train step", "validation"])
def test_the_diverged_step_is_the_first_without_a_history_row(tmp_path, monkeypatch, where):
    """Step 4's training step diverges (the trainer's TrainingDiverged), or step 3's
    validation forward meets blown-up activations (a layer's NonFiniteError, which the
    trainer's evaluate lets through): both are results naming that step."""
    if where == "train step":
        real_step = Trainer.train_step

        def train_step(self):
            if self.step == 3:
                raise self._diverged("NaN (a test)")
            return real_step(self)

        monkeypatch.setattr(Trainer, "train_step", train_step)
    else:
        real_evaluate = Trainer.evaluate

        def evaluate(self):
            if self.step == 3:
                raise NonFiniteError("layernorm: the variance of x overflows float32 (a test)")
            return real_evaluate(self)

        monkeypatch.setattr(Trainer, "evaluate", evaluate)
    result = jobs.run_job(_job("gpt2", measures=["length_extrapolation"]), str(tmp_path))
    step = 4 if where == "train step" else 3
    assert (result["diverged"], result["diverged_at_step"]) == (True, step)
    assert [row["step"] for row in result["history"]] == list(range(1, step))
    assert result["final_val_loss"] is None and result["measures"] == {"length_extrapolation": None}
    if where == "train step":
        assert "the loss became NaN (a test) at step 4;" in result["divergence"]
    else:
        assert result["divergence"].startswith("the validation loss after step 3 could not be "
                                               "computed: NaN or infinite inside the model")


# ---- length_extrapolation --------------------------------------------------------------------


def test_learned_positions_have_no_loss_at_2T(results):
    measure = results["gpt2"][1]["measures"]["length_extrapolation"]
    assert measure["seq_len"] == TINY.seq_len and measure["val_loss_2T"] is None
    assert "learned positions" in measure["note"] and "(32, 32) → (64, 32)" in measure["note"]
    assert np.isfinite(measure["val_loss_T"])


@pytest.mark.parametrize("name", ["sinusoidal", "rope32", "rope64"])
def test_sinusoidal_and_rope_are_evaluated_at_2T(results, name):
    measure = results[name][1]["measures"]["length_extrapolation"]
    assert measure["note"] is None
    assert np.isfinite(measure["val_loss_2T"]) and measure["val_loss_2T"] != measure["val_loss_T"]


def _trainer_of(job, work_dir) -> Trainer:
    """The finished run reopened: its final weights, and the trainer's own evaluate()."""
    options = TrainOptions(**job["train"], out=os.path.join(work_dir, "runs", job["id"]),
                           model_overrides=job["model_overrides"])
    return Trainer(options, resume=True, progress=False, log=lambda message: None)


@pytest.mark.parametrize("name, rtol", [("rope64", 1e-12), ("rope32", 1e-6)])
def test_the_loss_at_T_is_the_trainers_validation_loss(results, name, rtol):
    job, result, work_dir = results[name]
    trainer = _trainer_of(job, work_dir)
    measure = result["measures"]["length_extrapolation"]
    # the same batches (the trainer's validation sampler) through the trainer's loss
    np.testing.assert_allclose(measure["val_loss_T"], trainer.evaluate(), rtol=rtol, atol=0)
    validation = jobs.ValidationData.of(trainer)
    x, y = validation.sampler(False, TINY.batch_size, TINY.seq_len, job["seed"] + 1).next()
    x0, y0 = trainer._val_sampler().next()
    assert (x == x0).all() and (y == y0).all()


def test_the_model_at_2T_holds_the_trained_weights(results):
    """Positions 0..T−1 of the rebuilt model give the trained model's logits: the weights were
    assigned and RoPE's angles do not depend on max_seq_len (a fresh model would differ)."""
    job, _, work_dir = results["rope64"]
    model = _trainer_of(job, work_dir).model.eval()
    long_model = jobs.model_at_length(model, 2 * TINY.seq_len)
    assert long_model.config.max_seq_len == 2 * TINY.seq_len
    ids = np.arange(TINY.seq_len)[None] % model.config.vocab_size  # (1, T)
    np.testing.assert_allclose(long_model.eval().forward(ids), model.forward(ids), rtol=1e-12, atol=1e-12)
    fresh = build_model(long_model.config, seed=0).eval()
    assert np.abs(fresh.forward(ids) - model.forward(ids)).max() > 1e-3


# ---- kv_cache --------------------------------------------------------------------------------


def test_kv_cache_bytes_measured_equal_the_formula_and_shrink_with_fewer_kv_heads(results):
    measured = {}
    for name in ("llama1", "llama1-gqa", "llama1-mqa"):
        config = plan.model_config(plan.VARIANTS[name], TINY, vocab_size=65)
        measure = jobs.kv_cache_bytes(build_model(config), prompt_id=3, n_tokens=TINY.seq_len)
        assert measure["bytes_per_token"] == measure["formula_bytes_per_token"]
        assert measure["formula_bytes_per_token"] == 2 * config.n_layers * config.kv_heads \
            * config.head_size * 4  # float32
        assert measure["decoded_tokens"] == TINY.seq_len
        measured[name] = measure["bytes_per_token"]
    assert measured["llama1-mqa"] < measured["llama1-gqa"] < measured["llama1"]
    assert measured["llama1"] == TINY.n_heads * measured["llama1-mqa"]  # H K/V heads against 1
    in_job = results["docmask64"][1]["measures"]["kv_cache"]  # float64: 8 bytes an entry
    assert in_job["bytes_per_token"] == in_job["formula_bytes_per_token"] == 2 * measured["llama1"]


# ---- document_first_tokens -------------------------------------------------------------------


def _brute_force_masks(doc_ids, k):
    first, rest = np.zeros(doc_ids.shape, bool), np.zeros(doc_ids.shape, bool)
    for b, row in enumerate(doc_ids):
        for t, d in enumerate(row):
            if d == 0:
                continue
            offset = t - list(row).index(d)  # the document's first position in the row
            (first if offset < k else rest)[b, t] = True
    return first, rest


def test_document_masks_select_the_first_k_positions_of_documents_started_inside():
    doc_ids = np.array([[0, 0, 1, 1, 1, 1, 2, 2],
                        [0, 1, 2, 2, 2, 2, 2, 3],
                        [0, 0, 0, 0, 0, 0, 0, 0]])
    first, rest = jobs.document_position_masks(doc_ids, 2)
    np.testing.assert_array_equal(first, [[0, 0, 1, 1, 0, 0, 1, 1],
                                          [0, 1, 1, 1, 0, 0, 0, 1],
                                          [0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rest, [[0, 0, 0, 0, 1, 1, 0, 0],
                                         [0, 0, 0, 0, 1, 1, 1, 0],
                                         [0, 0, 0, 0, 0, 0, 0, 0]])
    rng = np.random.default_rng(0)
    for k in (1, 3, 8):
        starts = rng.random((6, 40)) < 0.15
        starts[:, 0] = False
        doc_ids = np.cumsum(starts, axis=1)  # how PackedBatchSampler numbers them
        for got, want in zip(jobs.document_position_masks(doc_ids, k), _brute_force_masks(doc_ids, k)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="never decrease"):
        jobs.document_position_masks(np.array([[0, 1, 0]]), 2)


def _docmask_model(document_mask: bool):
    config = preset_config("llama1", vocab_size=13, d_model=16, n_layers=2, n_heads=4,
                           max_seq_len=24, dtype="float64", dropout=0.0, document_mask=document_mask,
                           init_std=0.2)  # large weights: attention far from uniform
    return build_model(config, seed=5).eval()


def test_with_the_document_mask_a_documents_first_tokens_see_no_other_document():
    """Document B packed after A (from position j) has, under the mask, the NLL of B run
    alone from position 0 (RoPE is relative; the mask hides A). Without the mask, or if the
    measure forgot to pass doc_ids, its first tokens see A and the NLL differs."""
    rng = np.random.default_rng(1)
    T, j, k = 24, 9, 4
    x = rng.integers(0, 13, (1, T))  # (1, T): A = x[:, :j], B = x[:, j:]
    y = rng.integers(0, 13, (1, T))
    doc_ids = np.array([[0] * j + [1] * (T - j)])
    masked = _docmask_model(True)
    alone = jobs.token_nll(masked, (x[:, j:], y[:, j:]))  # (1, T − j) B from position 0
    measure = jobs.document_token_losses(masked, [(x, y, doc_ids)], k)
    assert (measure["n_first"], measure["n_rest"]) == (k, T - j - k)
    np.testing.assert_allclose(measure["loss_first"], alone[0, :k].mean(), rtol=1e-12)
    np.testing.assert_allclose(measure["loss_rest"], alone[0, k:].mean(), rtol=1e-12)
    packed = jobs.token_nll(masked, (x, y, doc_ids))
    np.testing.assert_allclose(measure["loss_all"], packed.mean(), rtol=1e-12)
    # the same weights without the mask: B's first tokens now attend to A
    unmasked = _docmask_model(False)
    assert all(np.array_equal(a, b) for a, b in zip(unmasked.parameters().values(),
                                                    masked.parameters().values()))
    without = jobs.document_token_losses(unmasked, [(x, y, doc_ids)], k)
    assert abs(without["loss_first"] - measure["loss_first"]) > 1e-3


def test_document_first_tokens_in_a_job_counts_and_agrees_with_all(results):
    measure = results["docmask64"][1]["measures"]["document_first_tokens"]
    assert measure["first_tokens"] == TINY.first_tokens
    assert measure["n_first"] > 0 and measure["n_rest"] >= 0
    assert measure["n_first"] + measure["n_rest"] <= TINY.eval_batches * TINY.batch_size * TINY.seq_len
    assert np.isfinite([measure["loss_first"], measure["loss_all"]]).all()


# ---- threads, dispatch, bad jobs -------------------------------------------------------------


def test_threads_are_limited_inside_and_restored_after():
    before = numba.get_num_threads()
    with jobs.limited_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError), jobs.limited_threads(1):
        raise RuntimeError("a failing job")
    assert numba.get_num_threads() == before
    with pytest.raises(ValueError, match="'threads' must be an integer"):
        with jobs.limited_threads(0):
            pass


def test_a_timing_job_goes_to_run_timing_job(monkeypatch, tmp_path):
    fake = types.ModuleType("npformer.tour.timing")
    fake.run_timing_job = lambda job: {"timed": job["id"]}
    monkeypatch.setitem(sys.modules, "npformer.tour.timing", fake)
    job = plan.timing_job(plan.COMPARISONS[0], TINY)
    assert jobs.run_job(job, str(tmp_path)) == {"timed": job["id"]}


@pytest.mark.parametrize("change, message", [
    (lambda job: job.update(kind="tarin"), "'kind' must be 'train' or 'timing'"),
    (lambda job: job.pop("train"), r"lacks the field\(s\) \['train'\]"),
    (lambda job: job["train"].update(out="elsewhere"), r"unknown option\(s\) \['out'\]"),
    (lambda job: job.update(measures=["kv-cache"]), "'measures' must be a list of names"),
    (lambda job: job.update(measures="kv_cache"), "'measures' must be a list of names"),
    (lambda job: job.update(threads=0), "'threads' must be an integer"),
    (lambda job: job.update(id="../escape"), "usable as a directory"),
])
def test_a_bad_job_is_a_clear_error(tmp_path, change, message):
    job = _job("gpt2")
    change(job)
    with pytest.raises(ValueError, match=message):
        jobs.run_job(job, str(tmp_path))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
