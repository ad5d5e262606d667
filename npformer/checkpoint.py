"""Training checkpoints that survive a kill at any moment, load without running code, and
refuse to load when anything in them was corrupted or does not belong together.

Layout of a run directory::

    run/
      .lock                    {"pid", "host", "started"} of the process training into it
      config.json              the model config            (written once, atomically)
      tokenizer.json           the tokenizer               (written once, atomically)
      train.json               the training options        (rewritten on --resume)
      checkpoints/step-000400/ model.safetensors, optimizer.safetensors, state.json
      latest.json              {"step": 400, "path": "checkpoints/step-000400"}
      log.csv, log.json, loss.png

**A kill never loses a checkpoint.** One is written into a temporary directory, fsynced,
renamed to its final name, and only then does ``latest.json`` (replaced atomically) point at
it. A kill before the rename leaves a stray temporary directory and the previous pointer; a
kill after it leaves a complete checkpoint. Either way ``latest.json`` names a complete one.
Older checkpoints are deleted after the pointer moves (the last ``keep`` stay).

**Nothing corrupted goes unnoticed.** The header metadata of both safetensors files records,
for every tensor, its dtype, shape and the SHA-256 of its bytes, and the checkpoint's step;
``model.safetensors`` also records the model config and the tokenizer it was trained with,
the SHA-256 of ``state.json`` and of the optimizer file's records (binding the three files of
one checkpoint together). Loading verifies all of it: a flipped byte in a tensor, a
truncated file, a header whose names, dtypes, shapes or offsets were edited (the
``safetensors`` parser refuses what does not tile the file; the records refuse the rest), an
edited ``state.json``, a ``config.json`` or ``tokenizer.json`` that is not the one the
weights were trained with — each is a ``ValueError`` naming the file and the tensor or field.

**When latest.json is missing** (a kill between the first checkpoint's rename and the first
pointer write, or a pointer deleted by hand) the newest *complete* checkpoint — all three
files present and verified — is used, and the message says so. **When latest.json points at
a missing or corrupt checkpoint** loading is refused: that is damage no kill can cause, so
silently training on from an older step would hide it. The error names the newest complete
older checkpoint and says how to continue from it (delete ``latest.json``).

Weights and optimizer moments are safetensors; everything else is JSON. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ._validate import FLOAT_DTYPES, check_float
from .config import ModelConfig
from .dataset import tokenizer_from_dict
from .interop.safetensors_file import dtype_name, load_file_with_metadata, save_file, write_atomically

FORMAT = "npformer-checkpoint-1"  # the "format" entry of both files' header metadata
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---- JSON files --------------------------------------------------------------------------


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


def write_json(path: str, data) -> None:
    """``json.dump`` to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomically(path, [_json_bytes(data)])


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def require_keys(data, keys: Dict[str, type], path: str) -> dict:
    """``data`` (read from ``path``) must be a JSON object with each of ``keys`` of its type;
    a one-line ValueError naming the file and the key otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    for key, kind in keys.items():
        if key not in data:
            raise ValueError(f"{path} has no {key!r} entry (it needs {sorted(keys)})")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be a {getattr(kind, '__name__', kind)}, "
                             f"got {value!r:.80}")
    return data


# ---- checksums ---------------------------------------------------------------------------


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _records(tensors: Dict[str, np.ndarray]) -> Dict[str, list]:
    """{name: [safetensors dtype, shape, SHA-256 of the little-endian C-order bytes]}."""
    records = {}
    for name, array in tensors.items():
        kind = dtype_name(array.dtype)
        data = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        records[name] = [kind, list(array.shape), _sha256(data.reshape(-1).view(np.uint8))]
    return records


# ---- saving ------------------------------------------------------------------------------


def save_checkpoint(run_dir: str, step: int, model_tensors: Dict[str, np.ndarray],
                    optimizer_tensors: Dict[str, np.ndarray], state: dict, keep: int = 2, *,
                    config: dict, tokenizer: dict) -> str:
    """Write one checkpoint of ``run_dir`` and point ``latest.json`` at it. Returns its path.

    ``config`` and ``tokenizer`` (their ``to_dict()``) are recorded in the checkpoint, so a
    later load can tell whether ``config.json`` and ``tokenizer.json`` still match it.
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    staging = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        state_bytes = _json_bytes({**state, "step": step})
        write_atomically(os.path.join(staging, "state.json"), [state_bytes])
        common = {"format": FORMAT, "step": str(step)}
        optimizer_records = _canonical(_records(optimizer_tensors))
        save_file(model_tensors, os.path.join(staging, "model.safetensors"), {
            **common, "tensors": _canonical(_records(model_tensors)),
            "config": _canonical(config), "tokenizer": _canonical(tokenizer),
            "state_sha256": _sha256(state_bytes),
            "optimizer_sha256": _sha256(optimizer_records.encode("utf-8"))})
        save_file(optimizer_tensors, os.path.join(staging, "optimizer.safetensors"), {
            **common, "tensors": optimizer_records})
        _fsync_directory(staging)
        if os.path.exists(final):
            # The same step saved again (a run resumed from an older pointer). Move the old
            # one aside first: a kill in between leaves latest.json on that older pointer.
            aside = tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=root)
            os.rename(final, os.path.join(aside, name))
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


def _step_dirs(root: str) -> List[Tuple[int, str]]:
    """(step, name) of every checkpoints/step-* directory, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return sorted(found, reverse=True)


def _prune(root: str, keep: int, current: str) -> None:
    for _, old in (_step_dirs(root)[keep:] if keep > 0 else []):
        if old != current:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for stray in (d for d in os.listdir(root) if d.startswith(".tmp-")):
        shutil.rmtree(os.path.join(root, stray), ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------


def _read_latest(run_dir: str) -> Optional[Tuple[int, str]]:
    """(step, checkpoint directory) that latest.json names, validated; None if it is absent."""
    pointer = os.path.join(run_dir, "latest.json")
    if not os.path.isfile(pointer):
        return None
    latest = require_keys(read_json(pointer), {"step": int, "path": str}, pointer)
    expected = f"checkpoints/step-{latest['step']:06d}"
    if latest["path"] != expected:
        raise ValueError(f"{pointer} is inconsistent: step {latest['step']} but path "
                         f"{latest['path']!r} (expected {expected!r})")
    return latest["step"], os.path.join(run_dir, latest["path"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The directory ``latest.json`` points at, or None when the run has no latest.json."""
    found = _read_latest(run_dir)
    if found is None:
        return None
    if not os.path.isdir(found[1]):
        raise ValueError(f"{os.path.join(run_dir, 'latest.json')} points at {found[1]}, which "
                         "does not exist")
    return found[1]


def _verify_tensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str],
                    step: int) -> None:
    """The header metadata's records against the tensors the parser returned."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an npformer training checkpoint file (its header "
                         f"metadata has format {metadata.get('format')!r}, expected {FORMAT!r}; "
                         "no checksums to verify it with)")
    if metadata.get("step") != str(step):
        raise ValueError(f"{path} records step {metadata.get('step')!r}, but it is in the "
                         f"checkpoint of step {step}")
    try:
        records = json.loads(metadata.get("tensors", ""))
        if not isinstance(records, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: the header metadata's tensor records are damaged") from None
    missing, extra = sorted(set(records) - set(tensors)), sorted(set(tensors) - set(records))
    if missing or extra:
        raise ValueError(f"{path}: the header lists tensors {extra[:5]} that were not saved and "
                         f"lacks {missing[:5]} that were (names altered)")
    for name, array in tensors.items():
        record = records[name]
        found = [dtype_name(array.dtype), list(array.shape)]
        if not isinstance(record, list) or len(record) != 3 or record[:2] != found:
            raise ValueError(f"{path}: tensor {name!r} is {found[0]} of shape {found[1]} in the "
                             f"header, but was saved as {record[:2] if isinstance(record, list) else record!r}")
        if _records({name: array})[name][2] != record[2]:
            raise ValueError(f"{path}: tensor {name!r} does not match its checksum (its bytes "
                             "were altered since it was saved)")


def _check_weights(path: str, tensors: Dict[str, np.ndarray], dtype: str) -> None:
    """Float tensors of the model's dtype, all finite."""
    for name, array in tensors.items():
        if array.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {array.dtype}; weights and "
                             "optimizer moments must be float32 or float64")
        if array.dtype != np.dtype(dtype):
            raise ValueError(f"{path}: tensor {name!r} is {array.dtype}, but the model config "
                             f"has dtype {dtype}")
        check_float(array, f"{path}: tensor {name!r}")  # NonFiniteError for NaN or ±inf


def _difference(key: str, found, recorded) -> str:
    """``key=found (trained with recorded)``; for two strings, from their first difference."""
    if isinstance(found, str) and isinstance(recorded, str):
        i = next((i for i, (a, b) in enumerate(zip(found, recorded)) if a != b),
                 min(len(found), len(recorded)))
        return (f"{key} differs from character {i} on: {found[i:i + 12]!r} (trained with "
                f"{recorded[i:i + 12]!r})")
    return f"{key}={found!r:.40} (trained with {recorded!r:.40})"


def _load_verified(directory: str, step: int, config: dict, tokenizer: dict,
                   state_keys: Optional[Dict[str, type]] = None):
    """(model tensors, optimizer tensors, state) of one checkpoint directory, every record
    verified and every file checked against the others and against the run's config and
    tokenizer. ValueError naming the file and the tensor or field otherwise."""
    model_path = os.path.join(directory, "model.safetensors")
    optimizer_path = os.path.join(directory, "optimizer.safetensors")
    state_path = os.path.join(directory, "state.json")
    model, model_meta = load_file_with_metadata(model_path)
    _verify_tensors(model_path, model, model_meta, step)
    optimizer, optimizer_meta = load_file_with_metadata(optimizer_path)
    _verify_tensors(optimizer_path, optimizer, optimizer_meta, step)
    if _sha256(optimizer_meta["tensors"].encode("utf-8")) != model_meta.get("optimizer_sha256"):
        raise ValueError(f"{optimizer_path} is not the optimizer state saved with {model_path} "
                         "(its records differ from the ones the model file recorded)")
    try:
        with open(state_path, "rb") as f:
            state_bytes = f.read()
    except FileNotFoundError:
        raise ValueError(f"{state_path} does not exist") from None
    state = require_keys(read_json(state_path), {"step": int, **(state_keys or {})}, state_path)
    if state["step"] != step:
        raise ValueError(f"{state_path} has step {state['step']}, but it is in the checkpoint "
                         f"of step {step}")
    if _sha256(state_bytes) != model_meta.get("state_sha256"):
        raise ValueError(f"{state_path} does not match the checksum recorded in {model_path} "
                         "(it was altered since it was saved)")
    for name, expected, path in (("config", config, "config.json"),
                                 ("tokenizer", tokenizer, "tokenizer.json")):
        try:
            recorded = json.loads(model_meta.get(name, ""))
        except ValueError:
            raise ValueError(f"{model_path}: its recorded {name} is damaged") from None
        if recorded != expected:
            differ = sorted(k for k in set(recorded) | set(expected)
                            if recorded.get(k) != expected.get(k)) if isinstance(recorded, dict) else []
            shown = ", ".join(_difference(k, expected.get(k), recorded.get(k)) for k in differ[:4])
            raise ValueError(f"{os.path.dirname(os.path.dirname(directory))}/{path} is not the "
                             f"{name} the weights in {model_path} were trained with: {shown}")
    _check_weights(model_path, model, config["dtype"])
    floats = {k: v for k, v in optimizer.items() if k != "step"}
    _check_weights(optimizer_path, floats, config["dtype"])
    for key, array in floats.items():
        _, _, parameter = key.partition(".")
        if parameter not in model or model[parameter].shape != array.shape:
            raise ValueError(f"{optimizer_path}: tensor {key!r} belongs to no parameter of "
                             f"{model_path} of shape {array.shape}")
    if "step" not in optimizer or optimizer["step"].shape != () or \
            optimizer["step"].dtype != np.int64:
        raise ValueError(f"{optimizer_path}: tensor 'step' must be a 0-d int64 (the optimizer's "
                         "step count)")
    return model, optimizer, state


def _complete_checkpoints(run_dir: str, config: dict, tokenizer: dict, below: Optional[int] = None,
                          state_keys: Optional[Dict[str, type]] = None):
    """The newest complete (all files present and verified) checkpoint of the run, at a step
    below ``below`` if given: (step, directory, (model, optimizer, state), skipped), or None."""
    root = os.path.join(run_dir, "checkpoints")
    skipped = []
    for step, name in _step_dirs(root):
        if below is not None and step >= below:
            continue
        directory = os.path.join(root, name)
        try:
            return (step, directory,
                    _load_verified(directory, step, config, tokenizer, state_keys), skipped)
        except ValueError as error:
            skipped.append(f"{directory} ({error})")
    return None


def _run_files(run_dir: str) -> Tuple[ModelConfig, dict]:
    """config.json and tokenizer.json of a run, each valid, and agreeing on the vocabulary."""
    config_path = os.path.join(run_dir, "config.json")
    config_dict = read_json(config_path)
    try:
        config = ModelConfig.from_dict(require_keys(config_dict, {}, config_path))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path} is not a valid model config ({error})") from None
    tokenizer_path = os.path.join(run_dir, "tokenizer.json")
    tokenizer = read_json(tokenizer_path)
    try:
        vocab_size = tokenizer_from_dict(tokenizer).vocab_size
    except (TypeError, ValueError) as error:
        raise ValueError(f"{tokenizer_path} is not a valid tokenizer ({error})") from None
    if vocab_size != config.vocab_size:
        raise ValueError(f"{tokenizer_path} has a vocabulary of {vocab_size} tokens but "
                         f"{config_path} has vocab_size={config.vocab_size}")
    return config, tokenizer


def load_latest(run_dir: str, log: Callable[[str], None] = _stderr,
                state_keys: Optional[Dict[str, type]] = None
                ) -> Tuple[str, Tuple[ModelConfig, dict, Dict[str, np.ndarray], Dict[str, np.ndarray], dict]]:
    """(checkpoint directory, what :func:`load_checkpoint` returns). ``state_keys``: entries
    state.json must have besides "step" ({name: type}), checked before its checksum so that a
    missing one is named."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is not a directory (no training run there)")
    if not any(os.path.exists(os.path.join(run_dir, name))
               for name in ("config.json", "latest.json", "checkpoints")):
        raise ValueError(f"{run_dir} is not a training run directory (no config.json, "
                         "latest.json or checkpoints/); train into it first (npformer train --out)")
    config, tokenizer = _run_files(run_dir)
    config_dict = json.loads(_canonical(config.to_dict()))  # as recorded: tuples are lists
    latest = _read_latest(run_dir)
    if latest is None:
        found = _complete_checkpoints(run_dir, config_dict, tokenizer, state_keys=state_keys)
        if found is None:
            raise ValueError(f"{run_dir} has no checkpoint (no latest.json and no complete "
                             "checkpoints/step-*); train into it first")
        step, directory, loaded, skipped = found
        log(f"{run_dir}/latest.json is missing; recovered from the newest complete checkpoint, "
            f"{directory} (step {step})" + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
        return directory, (config, tokenizer, *loaded)
    step, directory = latest
    pointer = os.path.join(run_dir, "latest.json")
    try:
        if not os.path.isdir(directory):
            raise ValueError(f"{pointer} points at {directory}, which does not exist")
        loaded = _load_verified(directory, step, config_dict, tokenizer, state_keys)
    except ValueError as error:
        older = _complete_checkpoints(run_dir, config_dict, tokenizer, below=step,
                                      state_keys=state_keys)
        hint = (f". The newest complete older checkpoint is {older[1]} (step {older[0]}); to "
                f"continue from it, delete {pointer}" if older else
                ". No older checkpoint verifies either")
        raise type(error)(f"{error}{hint}") from None
    return directory, (config, tokenizer, *loaded)


def load_checkpoint(run_dir: str, log: Callable[[str], None] = _stderr
                    ) -> Tuple[ModelConfig, dict, Dict[str, np.ndarray], Dict[str, np.ndarray], dict]:
    """(model config, tokenizer dict, model tensors, optimizer tensors, state) of the latest
    checkpoint of ``run_dir``, verified (see the module docstring). ``log`` gets the message
    when a missing latest.json is recovered from the newest complete checkpoint."""
    return load_latest(run_dir, log)[1]


def assign_parameters(model, tensors: Dict[str, np.ndarray]) -> None:
    """Copy ``tensors`` into the model's parameters; names, shapes and dtypes must match
    exactly (a float16 or integer tensor would otherwise be cast silently)."""
    params = model.parameters()
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model's config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise ValueError(f"checkpoint tensor {name} has shape {value.shape}, the model's "
                             f"config needs {params[name].shape}")
        if value.dtype != params[name].dtype:
            raise ValueError(f"checkpoint tensor {name} has dtype {value.dtype}, the model's "
                             f"config needs {params[name].dtype}")
        params[name][...] = value


# ---- one process per run directory --------------------------------------------------------


class RunLock:
    """``run_dir/.lock``: one process at a time trains into a run directory.

    The lock is an exclusive ``flock`` on the file, which holds the owner's pid, host and start
    time. The kernel drops a flock when its process dies however it dies (``kill -9``
    included), so a lock left by a killed process is stale by construction: the next owner's
    ``flock`` succeeds and it takes the file over (and says so). Where ``fcntl`` does not exist
    the file is created with ``O_CREAT | O_EXCL`` and a lock whose pid is not alive is stale.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str, log: Callable[[str], None] = _stderr) -> None:
        self.path = os.path.join(run_dir, self.NAME)
        self.log = log
        self._fd: Optional[int] = None

    def _owner(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
            return (f"pid {owner['pid']} on {owner['host']}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))}")
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process"

    def _previous_pid(self) -> Optional[int]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self._acquire_exclusive_create()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"{os.path.dirname(self.path)} is in use by another npformer "
                                 f"process ({self._owner()}; lock file {self.path}); wait for "
                                 "it to finish or stop it first") from None
            # The previous owner may have removed the file between our open and our flock:
            # then we hold a lock on a deleted file, and must try again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._previous_pid()
        if previous is not None and previous != os.getpid():
            self.log(f"{self.path}: took over the stale lock of pid {previous} (no longer "
                     "running)")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, self._record())
        os.fsync(fd)
        return self

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.time()}).encode("utf-8")

    def _acquire_exclusive_create(self) -> "RunLock":  # pragma: no cover - not POSIX
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                previous = self._previous_pid()
                if previous is not None and not _pid_alive(previous):
                    self.log(f"{self.path}: took over the stale lock of pid {previous} (no "
                             "longer running)")
                    os.unlink(self.path)
                    continue
                raise ValueError(f"{os.path.dirname(self.path)} is in use by another npformer "
                                 f"process ({self._owner()}; lock file {self.path})") from None
            os.write(fd, self._record())
            self._fd = fd
            return self
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock. Idempotent."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:  # pragma: no cover - the fallback path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
