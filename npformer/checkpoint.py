"""Training checkpoints that survive a kill at any moment, and load without running code.

Layout of a run directory::

    run/
      config.json              the model config            (written once, atomically)
      tokenizer.json           the tokenizer               (written once, atomically)
      train.json               the training options        (written once, atomically)
      checkpoints/step-000400/ model.safetensors, optimizer.safetensors, state.json
      latest.json              {"step": 400, "path": "checkpoints/step-000400"}
      log.csv, log.json, loss.png

A checkpoint is written into a temporary directory, fsynced, renamed to its final name, and
only then does ``latest.json`` (replaced atomically) point at it. A kill before the rename
leaves a stray temporary directory and the previous pointer; a kill after it leaves a
complete checkpoint. Either way ``latest.json`` names a complete one. Older checkpoints are
deleted after the pointer moves (the last ``keep`` stay).

Weights and optimizer moments are safetensors; everything else is JSON. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

from .config import ModelConfig
from .interop.safetensors_file import load_file, save_file, write_atomically


def write_json(path: str, data) -> None:
    """``json.dump`` to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomically(path, [(json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")])


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def save_checkpoint(run_dir: str, step: int, model_tensors: Dict[str, np.ndarray],
                    optimizer_tensors: Dict[str, np.ndarray], state: dict, keep: int = 2) -> str:
    """Write one checkpoint of ``run_dir`` and point ``latest.json`` at it. Returns its path."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    staging = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        save_file(model_tensors, os.path.join(staging, "model.safetensors"))
        save_file(optimizer_tensors, os.path.join(staging, "optimizer.safetensors"))
        write_json(os.path.join(staging, "state.json"), {**state, "step": step})
        if os.path.exists(final):  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(root)
    write_json(os.path.join(run_dir, "latest.json"), {"step": step, "path": f"checkpoints/{name}"})
    _prune(root, keep, name)
    return final


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep: int, current: str) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for stray in (d for d in os.listdir(root) if d.startswith(".tmp-")):
        shutil.rmtree(os.path.join(root, stray), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The directory ``latest.json`` points at, or None when the run has no checkpoint."""
    pointer = os.path.join(run_dir, "latest.json")
    if not os.path.isfile(pointer):
        return None
    target = os.path.join(run_dir, read_json(pointer)["path"])
    if not os.path.isdir(target):
        raise ValueError(f"{pointer} points at {target}, which does not exist")
    return target


def load_checkpoint(run_dir: str) -> Tuple[ModelConfig, dict, Dict[str, np.ndarray],
                                           Dict[str, np.ndarray], dict]:
    """(model config, tokenizer dict, model tensors, optimizer tensors, state) of the latest
    checkpoint of ``run_dir``."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is not a directory (no training run there)")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(f"{run_dir} has no checkpoint (no latest.json); train into it first")
    config = ModelConfig.from_dict(read_json(os.path.join(run_dir, "config.json")))
    tokenizer = read_json(os.path.join(run_dir, "tokenizer.json"))
    model_tensors = load_file(os.path.join(path, "model.safetensors"))
    optimizer_tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state = read_json(os.path.join(path, "state.json"))
    return config, tokenizer, model_tensors, optimizer_tensors, state


def assign_parameters(model, tensors: Dict[str, np.ndarray]) -> None:
    """Copy ``tensors`` into the model's parameters; names and shapes must match exactly."""
    params = model.parameters()
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model's config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise ValueError(f"checkpoint tensor {name} has shape {value.shape}, the model's "
                             f"config needs {params[name].shape}")
        params[name][...] = value
