"""Training checkpoints: complete or absent, never half-written; JSON + safetensors only."""

import json
import os

import numpy as np
import pytest

from npformer import checkpoint as ckpt
from npformer.models import build_model
from npformer.presets import tiny_config


CONFIG = tiny_config("llama2", vocab_size=256)
TOKENIZER = {"kind": "byte"}


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt.write_json(str(run / "config.json"), CONFIG.to_dict())
    ckpt.write_json(str(run / "tokenizer.json"), TOKENIZER)
    return str(run), CONFIG


def _save(run, step, value):
    model = {"w": np.full((2, 3), value), "b": np.arange(3.0)}
    optimizer = {"step": np.array(step, np.int64), "exp_avg.w": np.full((2, 3), -value)}
    return ckpt.save_checkpoint(run, step, model, optimizer, {"sampler": {"pos": step}},
                                config=CONFIG.to_dict(), tokenizer=TOKENIZER)


def test_round_trip_and_latest_pointer(tmp_path):
    run, config = _run_dir(tmp_path)
    _save(run, 10, 1.5)
    _save(run, 20, 2.5)
    loaded_config, tokenizer, model, optimizer, state = ckpt.load_checkpoint(run)
    assert loaded_config == config and tokenizer == {"kind": "byte"}
    assert np.array_equal(model["w"], np.full((2, 3), 2.5)) and int(optimizer["step"]) == 20
    assert state == {"sampler": {"pos": 20}, "step": 20}
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 20


def test_old_checkpoints_are_pruned(tmp_path):
    run, _ = _run_dir(tmp_path)
    for step in (1, 2, 3, 4):
        _save(run, step, float(step))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000003", "step-000004"]


@pytest.mark.parametrize("fail_at", ["optimizer", "rename", "pointer"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, fail_at):
    run, _ = _run_dir(tmp_path)
    _save(run, 10, 1.5)
    real_save_file, real_rename, real_write = ckpt.save_file, os.rename, ckpt.write_atomically

    def save_file(tensors, path, metadata=None):
        if fail_at == "optimizer" and path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt  # the process is stopped mid-checkpoint
        return real_save_file(tensors, path, metadata)

    def rename(src, dst):
        if fail_at == "rename":
            raise KeyboardInterrupt
        return real_rename(src, dst)

    def write_atomically(path, chunks):
        if fail_at == "pointer" and path.endswith("latest.json"):
            raise KeyboardInterrupt
        return real_write(path, chunks)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(ckpt, "write_atomically", write_atomically)
    with pytest.raises(KeyboardInterrupt):
        _save(run, 20, 2.5)
    monkeypatch.undo()
    _, _, model, optimizer, state = ckpt.load_checkpoint(run)
    assert state["step"] == 10 and np.array_equal(model["w"], np.full((2, 3), 1.5))
    strays = [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith(".tmp")]
    assert strays == []


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        ckpt.load_checkpoint(str(tmp_path / "missing"))
    run, _ = _run_dir(tmp_path)
    with pytest.raises(ValueError, match="has no checkpoint"):
        ckpt.load_checkpoint(run)
    (tmp_path / "run" / "latest.json").write_text('{"step": 3, "path": "checkpoints/step-000003"}')
    with pytest.raises(ValueError, match="step-000003, which does not exist. No older checkpoint"):
        ckpt.load_checkpoint(run)


def test_parameters_from_another_config_are_refused():
    small = build_model(tiny_config("gpt2"))
    other = build_model(tiny_config("gpt2", d_model=16, head_dim=8))
    with pytest.raises(ValueError, match="shape"):
        ckpt.assign_parameters(small, other.parameters())
    with pytest.raises(ValueError, match="does not match the model's config"):
        ckpt.assign_parameters(small, build_model(tiny_config("llama2")).parameters())
    ckpt.assign_parameters(small, {k: v + 1 for k, v in small.parameters().items()})
