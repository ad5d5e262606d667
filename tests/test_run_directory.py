"""The files of a run directory are checked against each other when a run is loaded or
resumed; a missing latest.json recovers from the newest complete checkpoint; one process at a
time owns a run (run/.lock); --resume of a finished run exits cleanly; repeated kill -9 at
random moments still resumes to exactly the uninterrupted result.

Decided here (and in checkpoint.py's docstring): a latest.json that points at a missing or
corrupt checkpoint is refused — no kill can cause that, so it is damage to show, not to hide —
and the error names the newest complete older checkpoint and how to continue from it
(delete latest.json, which is then recovered from that checkpoint).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import tiny_train_options
from npformer import checkpoint as ckpt
from npformer._validate import NonFiniteError
from npformer.cli import main
from npformer.train import Trainer


def _options(tmp_path, name="run", **changes):
    """The shared tiny run, checkpointing every 2 steps (more checkpoints to damage)."""
    return tiny_train_options(tmp_path, name, **{"checkpoint_interval": 2, **changes})


def _trainer(options, **kwargs):
    messages = []
    trainer = Trainer(options, progress=False, log=messages.append, **kwargs)
    return trainer, messages


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 8-step run every resumed run must equal."""
    trainer, _ = _trainer(_options(tmp_path_factory.mktemp("straight")))
    trainer.run()
    return trainer


def _stopped_at_6(tmp_path, name="run"):
    """A run stopped after step 6: checkpoints step-000004 and step-000006, latest → 6."""
    trainer, _ = _trainer(_options(tmp_path, name, stop_after=6))
    trainer.run()
    return trainer.run_dir


def _assert_equal_runs(a, b):
    assert a.step == b.step
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]  # float64, bit for bit
    for name, value in b.model.parameters().items():
        assert np.array_equal(a.model.parameters()[name], value), name


def _checkpoint(run, step):
    return os.path.join(run, "checkpoints", f"step-{step:06d}")


# ---- latest.json missing, or pointing at a broken checkpoint --------------------------------


def test_missing_latest_json_recovers_from_the_newest_complete_checkpoint(tmp_path, straight):
    run = _stopped_at_6(tmp_path)
    os.unlink(os.path.join(run, "latest.json"))
    resumed, messages = _trainer(_options(tmp_path), resume=True)
    assert resumed.step == 6
    assert any("latest.json is missing; recovered from the newest complete checkpoint" in m
               and "step-000006" in m for m in messages), messages
    resumed.run()
    _assert_equal_runs(resumed, straight)


def test_missing_latest_json_skips_an_incomplete_newest_checkpoint(tmp_path, straight):
    run = _stopped_at_6(tmp_path)
    os.unlink(os.path.join(run, "latest.json"))
    os.unlink(os.path.join(_checkpoint(run, 6), "optimizer.safetensors"))
    resumed, messages = _trainer(_options(tmp_path), resume=True)
    assert resumed.step == 4
    assert any("step-000004 (step 4); skipped" in m and "step-000006" in m
               and "optimizer.safetensors does not exist" in m for m in messages), messages
    resumed.run()
    _assert_equal_runs(resumed, straight)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_latest_json_pointing_at_a_broken_checkpoint_is_refused_with_the_way_out(tmp_path, straight, damage):
    run = _stopped_at_6(tmp_path)
    if damage == "corrupt":
        path = os.path.join(_checkpoint(run, 6), "model.safetensors")
        blob = bytearray(open(path, "rb").read())
        blob[-1] ^= 0x01
        open(path, "wb").write(bytes(blob))
        problem = r"step-000006/model.safetensors: tensor '.*' does not match its checksum"
    else:
        shutil.rmtree(_checkpoint(run, 6))
        problem = r"latest.json points at .*step-000006, which does not exist"
    with pytest.raises(ValueError, match=problem + r".*The newest complete older checkpoint is "
                       r".*step-000004 \(step 4\); to continue from it, delete .*latest.json"):
        _trainer(_options(tmp_path), resume=True)
    os.unlink(os.path.join(run, "latest.json"))  # the way out the message gives
    resumed, messages = _trainer(_options(tmp_path), resume=True)
    assert resumed.step == 4 and any("recovered" in m for m in messages)
    resumed.run()
    _assert_equal_runs(resumed, straight)


# ---- the files of a run checked against each other ------------------------------------------


def _rewrite_json(path, change):
    data = json.load(open(path))
    change(data)
    ckpt.write_json(path, data)


def _edit(run, name, change):
    path = os.path.join(run, name)
    if change is None:
        os.unlink(path)
    elif isinstance(change, str):
        open(path, "w").write(change)
    else:
        _rewrite_json(path, change)


@pytest.mark.parametrize("name, change, message", [
    ("latest.json", "{not json", r"latest.json is not valid JSON"),
    ("latest.json", lambda d: d.pop("path"), r"latest.json has no 'path' entry"),
    ("latest.json", lambda d: d.pop("step"), r"latest.json has no 'step' entry"),
    ("latest.json", lambda d: d.update(step="6"), r"latest.json: 'step' must be a int, got '6'"),
    ("latest.json", lambda d: d.update(step=4), r"latest.json is inconsistent: step 4 but path "
                                                 r"'checkpoints/step-000006'"),
    ("latest.json", "[6]", r"latest.json must hold a JSON object, got list"),
    ("train.json", lambda d: d.pop("seq_len"), r"train.json has no 'seq_len' entry"),
    ("train.json", "", r"train.json is not valid JSON"),
    ("config.json", "[]", r"config.json must hold a JSON object"),
    ("config.json", lambda d: d.update(colour="blue"), r"config.json is not a valid model config "
                                                       r"\(unknown config field\(s\) \['colour'\]\)"),
    ("config.json", lambda d: d.update(n_layers=2), r"config.json is not the config the weights in "
                                                    r".*step-000006/model.safetensors were trained "
                                                    r"with: n_layers=2 \(trained with 1\)"),
    ("tokenizer.json", lambda d: d.update(chars=d["chars"][:-1]), r"tokenizer.json has a vocabulary of "
                                                                  r"64 tokens but .*config.json has "
                                                                  r"vocab_size=65"),
    ("tokenizer.json", lambda d: d.update(chars=d["chars"].replace("a", "") + "~"),
     r"tokenizer.json is not the tokenizer the weights in .*step-000006/model.safetensors were "
     r"trained with: chars differs from character 39 on: 'bcdefghijklm' \(trained with 'abcdefghijkl'\)"),
    ("tokenizer.json", None, r"tokenizer.json does not exist"),
    ("checkpoints/step-000006/state.json", lambda d: d.pop("sampler"),
     r"step-000006/state.json has no 'sampler' entry"),
    ("checkpoints/step-000006/state.json", lambda d: d.pop("dropout_rng"),
     r"step-000006/state.json has no 'dropout_rng' entry"),
    ("checkpoints/step-000006/state.json", lambda d: d["sampler"].update(position=3),
     r"step-000006/state.json does not match the checksum recorded in .*step-000006/model.safetensors"),
    ("checkpoints/step-000006/state.json", "{", r"step-000006/state.json is not valid JSON"),
])
def test_a_damaged_or_mismatched_run_file_is_a_one_line_error_naming_it(tmp_path, name, change, message):
    run = _stopped_at_6(tmp_path)
    _edit(run, name, change)
    with pytest.raises(ValueError, match=message) as caught:
        _trainer(_options(tmp_path), resume=True)
    assert "\n" not in str(caught.value) and name.split("/")[-1] in str(caught.value)
    assert not os.path.exists(os.path.join(run, ".lock"))  # the failed resume let go of its lock


@pytest.mark.parametrize("source, file, message", [
    (4, "optimizer.safetensors", r"step-000006/optimizer.safetensors records step '4', but it is "
                                 r"in the checkpoint of step 6"),
    (4, "model.safetensors", r"step-000006/model.safetensors records step '4'"),
    (4, "state.json", r"step-000006/state.json has step 4, but it is in the checkpoint of step 6"),
])
def test_files_of_another_checkpoint_are_refused(tmp_path, source, file, message):
    run = _stopped_at_6(tmp_path)
    shutil.copy(os.path.join(_checkpoint(run, source), file), os.path.join(_checkpoint(run, 6), file))
    with pytest.raises(ValueError, match=message):
        ckpt.load_checkpoint(run)


def test_an_optimizer_of_another_run_is_refused(tmp_path):
    """Same sizes, same step, a valid file with valid records — but not this run's: the model
    file records the SHA-256 of the optimizer's records, which binds the two."""
    run = _stopped_at_6(tmp_path)
    trainer, _ = _trainer(_options(tmp_path, "other", stop_after=6, seed=1))
    trainer.run()
    shutil.copy(os.path.join(_checkpoint(trainer.run_dir, 6), "optimizer.safetensors"),
                os.path.join(_checkpoint(run, 6), "optimizer.safetensors"))
    with pytest.raises(ValueError, match=r"step-000006/optimizer.safetensors is not the optimizer "
                                         r"state saved with .*step-000006/model.safetensors"):
        ckpt.load_checkpoint(run)


# ---- weights that must not load -------------------------------------------------------------


def _write_run(tmp_path, model_tensors, dtype="float64"):
    from npformer.presets import tiny_config

    run = tmp_path / "handmade"
    run.mkdir()
    config = tiny_config("gpt2", vocab_size=256, dtype=dtype).to_dict()
    ckpt.write_json(str(run / "config.json"), config)
    ckpt.write_json(str(run / "tokenizer.json"), {"kind": "byte"})
    optimizer = {"step": np.array(1, np.int64)}
    ckpt.save_checkpoint(str(run), 1, model_tensors, optimizer, {}, config=config,
                         tokenizer={"kind": "byte"})
    return str(run)


def test_a_nan_in_a_loaded_weight_names_the_tensor_and_the_file(tmp_path):
    weight = np.ones((2, 3))
    weight[1, 2] = np.nan
    run = _write_run(tmp_path, {"head.weight": weight, "norm.weight": np.ones(3)})
    with pytest.raises(NonFiniteError, match=r"step-000001/model.safetensors: tensor 'head.weight' "
                                             r"contains 1 NaN or infinite value"):
        ckpt.load_checkpoint(run)


@pytest.mark.parametrize("tensor, message", [
    (np.ones((2, 3), np.int64), r"tensor 'w' has dtype int64; weights and optimizer moments must "
                                r"be float32 or float64"),
    (np.ones((2, 3), np.float16), r"tensor 'w' has dtype float16"),
    (np.ones((2, 3), np.float32), r"tensor 'w' is float32, but the model config has dtype float64"),
])
def test_non_float_or_other_dtype_weights_are_refused(tmp_path, tensor, message):
    run = _write_run(tmp_path, {"w": tensor})
    with pytest.raises(ValueError, match=r"model.safetensors: " + message):
        ckpt.load_checkpoint(run)


def test_a_checkpoint_without_records_is_refused(tmp_path):
    """A file written by another tool (or an npformer before checksums): nothing to verify it
    with, so it is not trusted as a training checkpoint."""
    from npformer.interop.safetensors_file import save_file

    run = _stopped_at_6(tmp_path)
    path = os.path.join(_checkpoint(run, 6), "model.safetensors")
    save_file(ckpt.load_checkpoint(run)[2], path)
    with pytest.raises(ValueError, match=r"step-000006/model.safetensors is not an npformer "
                                         r"training checkpoint file .*no checksums"):
        ckpt.load_checkpoint(run)


# ---- --resume of a finished run -------------------------------------------------------------


CLI = ["--preset", "gpt2", "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--d-model",
       "16", "--n-layers", "1", "--n-heads", "2", "--dtype", "float64", "--checkpoint-interval",
       "3", "--eval-interval", "3", "--eval-batches", "2", "--no-progress", "--sample-tokens", "0"]


def test_resume_of_a_finished_run_exits_cleanly_with_a_message(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run] + CLI) == 0
    before = open(os.path.join(run, "latest.json")).read()
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume"] + CLI) == 0
    out = capsys.readouterr().out
    assert "already reached step 6 (--steps 6): nothing to train; pass a larger --steps" in out
    assert "step 6: train loss" in out
    assert "tokens/s" not in out  # no speed claimed for zero steps trained
    assert open(os.path.join(run, "latest.json")).read() == before
    assert not os.path.exists(os.path.join(run, ".lock"))


# ---- one process per run directory ----------------------------------------------------------


def test_a_second_trainer_in_the_same_process_is_refused_until_the_first_finishes(tmp_path):
    run = _stopped_at_6(tmp_path)
    first, _ = _trainer(_options(tmp_path), resume=True)
    with pytest.raises(ValueError, match=rf"{run} is in use by another npformer process "
                                         rf"\(pid {os.getpid()} on .*lock file .*\.lock\)"):
        _trainer(_options(tmp_path), resume=True)
    first.run()
    assert not os.path.exists(os.path.join(run, ".lock"))
    second, _ = _trainer(_options(tmp_path, steps=10), resume=True)
    assert second.step == 8


def _wait_for(condition, process, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the training process exited before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_a_running_process_owns_its_run_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["--out", run, "--steps", "100000"] + CLI[2:]
    process = subprocess.Popen([sys.executable, "-m", "npformer", "train"] + args,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: os.path.isfile(os.path.join(run, "latest.json")), process, "checkpoint")
        lock = json.load(open(os.path.join(run, ".lock")))
        assert lock["pid"] == process.pid
        owned = rf"is in use by another npformer process \(pid {process.pid} on "
        with pytest.raises(ValueError, match=owned):
            _trainer(_options(tmp_path, steps=100000), resume=True)
        # --overwrite must not delete a run that is being written
        with pytest.raises(ValueError, match=owned):
            _trainer(_options(tmp_path), overwrite=True)
        assert os.path.isfile(os.path.join(run, "train.json"))
        assert main(["train", "--resume"] + args) == 2
        assert f"pid {process.pid}" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.load(open(os.path.join(run, ".lock")))["pid"] == process.pid  # left behind
    resumed, messages = _trainer(_options(tmp_path, steps=ckpt.load_checkpoint(run)[4]["step"] + 3,
                                          checkpoint_interval=3, eval_interval=3), resume=True)
    assert any(f"took over the stale lock of pid {process.pid}" in m for m in messages), messages
    assert json.load(open(os.path.join(run, ".lock")))["pid"] == os.getpid()
    resumed.run()
    assert not os.path.exists(os.path.join(run, ".lock"))


# ---- kill -9 at random moments --------------------------------------------------------------


def test_repeated_kills_at_random_moments_resume_to_the_uninterrupted_result(tmp_path):
    """Three SIGKILLs at random moments of a run that checkpoints every step (so many land in
    the middle of a save), each followed by --resume in a new process; the final run equals one
    that was never killed: losses, weights and optimizer state, bit for bit."""
    args = ["--preset", "gpt2", "--steps", "40", "--batch-size", "4", "--seq-len", "16",
            "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--dtype", "float64",
            "--checkpoint-interval", "1", "--eval-interval", "20", "--eval-batches", "2",
            "--lr", "1e-2", "--warmup-steps", "2", "--no-progress", "--sample-tokens", "0"]
    killed = str(tmp_path / "killed")
    rng = np.random.default_rng(2026)
    steps_at_kill = []
    for attempt in range(3):
        resume = ["--resume"] if attempt else []
        before = ckpt.load_checkpoint(killed)[4]["step"] if attempt else 0
        process = subprocess.Popen([sys.executable, "-m", "npformer", "train", "--out", killed]
                                   + resume + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def progressed():
            try:
                return json.load(open(os.path.join(killed, "latest.json")))["step"] > before
            except (OSError, ValueError):
                return False

        _wait_for(progressed, process, "new checkpoint")
        time.sleep(float(rng.uniform(0.0, 0.4)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps_at_kill.append(ckpt.load_checkpoint(killed)[4]["step"])  # loadable whatever the moment
    assert main(["train", "--out", killed, "--resume"] + args) == 0
    assert main(["train", "--out", str(tmp_path / "straight")] + args) == 0
    _, _, killed_model, killed_optimizer, killed_state = ckpt.load_checkpoint(killed)
    _, _, model, optimizer, state = ckpt.load_checkpoint(str(tmp_path / "straight"))
    assert killed_state["step"] == state["step"] == 40 and steps_at_kill == sorted(steps_at_kill)
    assert [r["loss"] for r in killed_state["history"]] == [r["loss"] for r in state["history"]]
    for ours, theirs in ((killed_model, model), (killed_optimizer, optimizer)):
        assert sorted(ours) == sorted(theirs)
        for name in theirs:
            assert np.array_equal(ours[name], theirs[name]), name
