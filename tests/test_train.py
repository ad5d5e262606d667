"""The training loop: every preset learns, runs are reproducible and resumable bit for bit,
a kill at any moment leaves a loadable run, and bad input is refused before anything is
overwritten.

Runs are tiny (C = 12..16, 1–2 layers, B·T = 8·16 tokens) so the whole file takes seconds;
float64 where exact equality of losses is the claim.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import TINY_MODEL, tiny_train_options
from npformer import checkpoint as ckpt
from npformer.cli import main
from npformer.presets import preset_names, tiny_overrides
from npformer.train import Trainer, TrainingDiverged, load_trained

TINY = TINY_MODEL
_options = tiny_train_options


def _train(options, **kwargs):
    trainer = Trainer(options, progress=False, **kwargs)
    summary = trainer.run()
    return trainer, summary


def _losses(trainer):
    return [row["loss"] for row in trainer.history]


# ---- every preset learns -------------------------------------------------------------


def _tiny_sizes(name):
    sizes = {k: v for k, v in tiny_overrides(name).items() if k not in ("vocab_size", "max_seq_len")}
    return sizes


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_lowers_the_loss_in_50_steps(tmp_path, name):
    options = _options(tmp_path, preset=name, steps=50, batch_size=8, lr=1e-2, warmup_steps=5,
                       dtype="float32", eval_interval=50, eval_batches=4, checkpoint_interval=50,
                       model_overrides=_tiny_sizes(name))
    trainer = Trainer(options, progress=False)
    before = trainer.evaluate()  # validation loss of the initial weights
    summary = trainer.run()
    losses = _losses(trainer)
    assert all(np.isfinite(losses))
    # random init gives ~ln 65 = 4.17 nats; 50 steps must clearly improve on both measures
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, (name, losses[:5], losses[-5:])
    assert summary["val_loss"] < before - 0.3, (name, before, summary["val_loss"])


# ---- reproducibility and resume ------------------------------------------------------


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    first, _ = _train(_options(tmp_path, "a"))
    second, _ = _train(_options(tmp_path, "b"))
    third, _ = _train(_options(tmp_path, "c", seed=1))
    assert _losses(first) == _losses(second)
    assert _losses(first) != _losses(third)


@pytest.mark.parametrize("preset, extra", [
    ("gpt2", dict(model_overrides=dict(TINY, dropout=0.1))),  # the dropout generator resumes too
    ("llama3", {}),  # packed documents: the packed sampler resumes
    ("transformer-2017", {}),  # sequence to sequence
])
def test_n_steps_equal_half_plus_resumed_half(tmp_path, preset, extra):
    straight, _ = _train(_options(tmp_path, "straight", preset=preset, **extra))
    _train(_options(tmp_path, "halves", preset=preset, stop_after=4, **extra))
    resumed, _ = _train(_options(tmp_path, "halves", preset=preset, **extra), resume=True)
    assert resumed.step == 8
    assert _losses(resumed) == _losses(straight)  # float64, bit for bit
    assert [r.get("val_loss") for r in resumed.history] == [r.get("val_loss") for r in straight.history]
    for name, value in straight.model.parameters().items():
        assert np.array_equal(value, resumed.model.parameters()[name]), name


def test_outputs_of_a_run(tmp_path):
    trainer, summary = _train(_options(tmp_path))
    run = trainer.run_dir
    for name in ("config.json", "tokenizer.json", "train.json", "log.csv", "log.json",
                 "loss.png", "latest.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    log = json.load(open(os.path.join(run, "log.json")))
    assert [row["step"] for row in log] == list(range(1, 9))
    assert [row["step"] for row in log if "val_loss" in row] == [4, 8]
    csv_lines = open(os.path.join(run, "log.csv")).read().splitlines()
    assert csv_lines[0] == "step,loss,val_loss,lr,grad_norm,tokens_per_s" and len(csv_lines) == 9
    # the warm-up then cosine schedule: lr rises for 2 steps, then falls to lr / 10
    lrs = [row["lr"] for row in log]
    assert lrs[0] < lrs[1] == pytest.approx(1e-2) and lrs[-1] < lrs[2]
    model, tokenizer = load_trained(run)
    for name, value in trainer.model.parameters().items():
        assert np.array_equal(model.parameters()[name], value), name
    assert tokenizer.vocab_size == 65 and summary["val_loss"] == log[-1]["val_loss"]


def test_a_kill_during_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real `npformer train` process after its first checkpoint; --resume then
    finishes the run with exactly the losses and weights of a run that was never killed."""
    args = ["--preset", "gpt2", "--steps", "60", "--batch-size", "4", "--seq-len", "16",
            "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--dtype", "float64",
            "--checkpoint-interval", "5", "--eval-interval", "30", "--eval-batches", "2",
            "--lr", "1e-2", "--warmup-steps", "2", "--no-progress", "--sample-tokens", "0"]
    killed = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, "-m", "npformer", "train", "--out", killed] + args,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.isfile(os.path.join(killed, "latest.json")) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of later steps (or saves)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = ckpt.load_checkpoint(killed)[4]["step"]  # loadable whatever the moment
    assert main(["train", "--out", killed, "--resume"] + args) == 0
    assert main(["train", "--out", str(tmp_path / "straight")] + args) == 0
    _, _, killed_tensors, killed_optimizer, killed_state = ckpt.load_checkpoint(killed)
    _, _, straight_tensors, straight_optimizer, straight_state = ckpt.load_checkpoint(str(tmp_path / "straight"))
    assert killed_state["step"] == straight_state["step"] == 60 and step_at_kill >= 5
    assert [r["loss"] for r in killed_state["history"]] == [r["loss"] for r in straight_state["history"]]
    for name in straight_tensors:
        assert np.array_equal(killed_tensors[name], straight_tensors[name]), name
    for name in straight_optimizer:
        assert np.array_equal(killed_optimizer[name], straight_optimizer[name]), name


# ---- divergence and bad input --------------------------------------------------------


def _poison_forward(trainer, monkeypatch, step: int, training: bool, failure: str = "nan_logits"):
    """From step ``step`` on, the model's forward in training (or validation) mode puts a NaN
    into its logits, or raises the NonFiniteError a layer raises on NaN activations."""
    from npformer._validate import NonFiniteError

    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        logits = forward(*args, **kwargs)
        if trainer.step == step and trainer.model.training == training:
            if failure == "refused_activations":
                raise NonFiniteError("x contains NaN")
            logits = logits.copy()
            logits[0, 0, 0] = np.nan
        return logits

    monkeypatch.setattr(trainer.model, "forward", poisoned)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_options(tmp_path, steps=12), progress=False)
    _poison_forward(trainer, monkeypatch, step=6, training=True)
    with pytest.raises(TrainingDiverged, match=r"the loss became NaN or infinite.*logits.* at step 7.*step-000004"):
        trainer.run()
    assert ckpt.load_checkpoint(trainer.run_dir)[4]["step"] == 4
    model, _ = load_trained(trainer.run_dir)
    assert all(np.isfinite(v).all() for v in model.parameters().values())


@pytest.mark.parametrize("failure", ["nan_logits", "refused_activations"])
def test_a_divergence_found_by_the_validation_is_a_divergence_of_that_step(tmp_path, monkeypatch,
                                                                           failure):
    """Weights blown up by step 4 can first show in its validation: NaN logits, or a layer
    refusing NaN activations (a NonFiniteError). Either is a TrainingDiverged naming the
    validation after step 4 (not step 5, not a raw NonFiniteError)."""
    trainer = Trainer(_options(tmp_path, steps=12), progress=False)
    _poison_forward(trainer, monkeypatch, step=4, training=False, failure=failure)
    with pytest.raises(TrainingDiverged, match=r"in the validation after step 4; stopped"):
        trainer.run()
    assert [row["step"] for row in trainer.history] == [1, 2, 3]


def test_nan_from_divergence_is_reported_by_the_cli(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "20", "--batch-size", "2",
                 "--seq-len", "8", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
                 "--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", "--no-progress",
                 "--sample-tokens", "0", "--checkpoint-interval", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "the loss became" in err and "lower --lr" in err


@pytest.mark.parametrize("changes, message", [
    (dict(preset="gpt5"), "unknown preset"),
    (dict(steps=0), "steps must be an integer"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(tokenizer="bpe"), "tokenizer must be 'char' or 'byte'"),
    (dict(model_overrides=dict(TINY, n_heads=3)), "n_heads"),
])
def test_bad_options_are_clear_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        Trainer(_options(tmp_path, **changes), progress=False)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x00\x01\x02binary\xff", "binary|UTF-8"),
])
def test_bad_data_files_are_refused(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        Trainer(_options(tmp_path, data=str(path)), progress=False)


def test_any_text_file_can_be_the_corpus(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    trainer, _ = _train(_options(tmp_path, data=str(path)))
    assert trainer.tokenizer.vocab_size == len(set(path.read_text()))


def test_resume_errors_overwrite_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(_options(tmp_path, "missing"), resume=True, progress=False)
    trainer, _ = _train(_options(tmp_path))
    run = trainer.run_dir
    before = {name: open(os.path.join(run, name), "rb").read()
              for name in ("config.json", "latest.json", "log.json", "train.json")}
    with pytest.raises(ValueError, match="already exists"):  # a new run into a used directory
        Trainer(_options(tmp_path), progress=False)
    with pytest.raises(ValueError, match="d_model=16, not 32"):  # a checkpoint of another config
        Trainer(_options(tmp_path, model_overrides=dict(TINY, d_model=32)), resume=True, progress=False)
    with pytest.raises(ValueError, match="seq_len=16, not 32"):
        Trainer(_options(tmp_path, seq_len=32), resume=True, progress=False)
    with pytest.raises(ValueError, match="n_heads"):  # a bad size, even with --overwrite
        Trainer(_options(tmp_path, model_overrides=dict(TINY, n_heads=5)), overwrite=True, progress=False)
    after = {name: open(os.path.join(run, name), "rb").read() for name in before}
    assert after == before
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a training run directory"):
        Trainer(_options(tmp_path, "not_a_run"), overwrite=True, progress=False)
    assert (other / "precious.txt").read_text() == "keep me"


def test_a_checkpoint_of_another_config_is_refused_when_loading(tmp_path):
    trainer, _ = _train(_options(tmp_path))
    config = json.load(open(os.path.join(trainer.run_dir, "config.json")))
    config["d_model"] = 32
    ckpt.write_json(os.path.join(trainer.run_dir, "config.json"), config)
    with pytest.raises(ValueError, match=r"run/config.json is not the config the weights in .*"
                                         r"step-000008/model.safetensors were trained with: "
                                         r"d_model=32 \(trained with 16\)"):
        load_trained(trainer.run_dir)


# ---- the CLI: train then sample ------------------------------------------------------


def test_cli_train_then_sample_with_and_without_the_cache(tmp_path, capsys):
    run = str(tmp_path / "run")
    code = main(["train", "--preset", "llama2", "--out", run, "--steps", "6", "--batch-size", "2",
                 "--seq-len", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "4",
                 "--n-kv-heads", "2", "--no-progress", "--sample-tokens", "20", "--prompt", "KING:"])
    out = capsys.readouterr().out
    assert code == 0 and "validation loss" in out and "tokens/s" in out and "\nKING:" in out
    sample = ["sample", "--ckpt", run, "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3",
              "--top-k", "5"]
    assert main(sample) == 0
    cached = capsys.readouterr().out
    assert main(sample + ["--no-cache"]) == 0
    uncached = capsys.readouterr().out
    assert cached == uncached and cached.startswith("ROMEO:") and len(cached.rstrip("\n")) == 46
    assert main(["sample", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["train", "--preset", "gpt5", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown preset" in capsys.readouterr().err


# ---- packed documents without the mask (the tour's document-mask comparison) ----------


def test_packed_documents_without_the_mask_see_the_mask_runs_batches(tmp_path):
    """packed_documents=True trains a mask-less model on the same packed batches as the
    document-mask run (same sampler, same seed), and does not hand it the doc_ids: its
    losses differ from the masked run's only through the mask."""
    sizes = _tiny_sizes("llama2")
    masked, _ = _train(_options(tmp_path, "masked", preset="llama2",
                                model_overrides=dict(sizes, document_mask=True)))
    packed, _ = _train(_options(tmp_path, "packed", preset="llama2", packed_documents=True,
                                model_overrides=sizes))
    plain, _ = _train(_options(tmp_path, "plain", preset="llama2", model_overrides=sizes))
    assert masked.train_sampler.kind == packed.train_sampler.kind == "packed"
    assert plain.train_sampler.kind != "packed"
    assert masked.train_sampler.state_dict() == packed.train_sampler.state_dict()
    assert _losses(packed) != _losses(masked)  # the mask changes the model, not the data
    assert _losses(packed) != _losses(plain)  # the data is the packed documents'
    # the first step's batch is the same for both, so the doc_ids are all that differs:
    # feeding the masked model's first batch to a fresh mask-less model matches its loss
    first = Trainer(_options(tmp_path, "again", preset="llama2", packed_documents=True,
                             model_overrides=sizes), progress=False)
    assert first.train_step()["loss"] == packed.history[0]["loss"]


def test_packed_documents_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="packed_documents must be True or False"):
        Trainer(_options(tmp_path, packed_documents="yes"), progress=False)
