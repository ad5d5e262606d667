"""A corruption fuzz of training checkpoints: random byte flips, truncations and header edits
of a real run's files (model.safetensors, optimizer.safetensors, state.json), each one
refused by ``load_checkpoint`` with a ValueError naming the file — by the safetensors parser
(a file that does not tile, a header that is not JSON), by the per-tensor records (dtype,
shape, SHA-256) or by the cross-checks between the files. None loads as a different
checkpoint; a mutation that leaves the loaded checkpoint identical (e.g. a header padding
space turned into a tab) would be counted apart as harmless, and must stay rare.

Without the records every byte flip in tensor data loads silently (shown below): no parser can
tell a flipped bit of a float from a real one.
"""

import json
import os
import shutil
import struct

import numpy as np
import pytest

from npformer import checkpoint as ckpt
from npformer.interop.safetensors_file import load_file, read_header
from npformer.train import Trainer, TrainOptions

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 4-step run with two checkpoints (steps 2 and 4); the fuzz mutates step 4."""
    out = str(tmp_path_factory.mktemp("fuzz") / "run")
    options = TrainOptions(preset="gpt2", out=out, steps=4, batch_size=2, seq_len=8, lr=1e-2,
                           warmup_steps=1, dtype="float64", eval_interval=4, eval_batches=1,
                           checkpoint_interval=2, model_overrides=dict(d_model=8, n_layers=1, n_heads=2))
    Trainer(options, progress=False).run()
    return out


def _snapshot(run_dir):
    config, tokenizer, model, optimizer, state = ckpt.load_checkpoint(run_dir)
    return config, tokenizer, model, optimizer, state


def _same(a, b):
    config_a, tokenizer_a, model_a, optimizer_a, state_a = a
    config_b, tokenizer_b, model_b, optimizer_b, state_b = b
    return (config_a == config_b and tokenizer_a == tokenizer_b and state_a == state_b
            and all(sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                                    and x[k].tobytes() == y[k].tobytes() for k in x)
                    for x, y in ((model_a, model_b), (optimizer_a, optimizer_b))))


def _mechanism(message):
    if "is not a valid safetensors file" in message or "is not a safetensors file" in message \
            or "data_offsets" in message or "of the data buffer" in message \
            or "is not valid JSON" in message:
        return "parser"
    if "checksum" in message or "saved as" in message or "records" in message \
            or "were not saved" in message or "tensor records" in message:
        return "records"
    return "cross-check"


class Outcomes:
    def __init__(self):
        self.counts = {"parser": 0, "records": 0, "cross-check": 0, "harmless": 0}
        self.silent = []

    def check(self, workdir, original, what, file):
        try:
            loaded = ckpt.load_checkpoint(workdir, log=lambda message: None)
        except ValueError as error:
            message = str(error)
            assert "\n" not in message, (what, message)
            # the message names the file (or, for a header edit, the tensor in that file)
            assert file in message or "latest.json" in message, (what, message)
            self.counts[_mechanism(message)] += 1
            return
        if _same(loaded, original):
            self.counts["harmless"] += 1
        else:
            self.silent.append(what)


def _fresh_copy(run_dir, workdir):
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    shutil.copytree(run_dir, workdir)
    return os.path.join(workdir, "checkpoints", "step-000004")


def test_random_byte_flips_and_truncations_are_all_detected(run, tmp_path):
    original = _snapshot(run)
    work = str(tmp_path / "work")
    rng = np.random.default_rng(14)
    outcomes = Outcomes()
    tried = 0
    for file in FILES:
        size = os.path.getsize(os.path.join(run, "checkpoints", "step-000004", file))
        for trial in range(120):
            directory = _fresh_copy(run, work)
            path = os.path.join(directory, file)
            blob = bytearray(open(path, "rb").read())
            position = int(rng.integers(size))
            if trial % 2:  # one flipped bit
                blob[position] ^= 1 << int(rng.integers(8))
            else:          # one byte replaced by any other value
                blob[position] ^= int(rng.integers(1, 256))
            open(path, "wb").write(bytes(blob))
            outcomes.check(work, original, f"{file} byte {position}", file)
            tried += 1
        for cut in sorted(set(rng.integers(0, size, 15).tolist()) | {0, 7, 8, size - 1}):
            directory = _fresh_copy(run, work)
            path = os.path.join(directory, file)
            blob = open(path, "rb").read()
            open(path, "wb").write(blob[:cut])
            outcomes.check(work, original, f"{file} cut at {cut}", file)
            tried += 1
    print(f"\nbyte flips and truncations: {tried} tried, {outcomes.counts}, silent {outcomes.silent}")
    assert outcomes.silent == []
    assert outcomes.counts["harmless"] <= tried // 100  # padding-whitespace swaps only
    assert outcomes.counts["records"] > 0 and outcomes.counts["parser"] > 0


def _header_and_data(path):
    header, start = read_header(path)
    return header, open(path, "rb").read()[start:]


def _write(path, header, data):
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def _same_size_pairs(header):
    names = [k for k in header if k != "__metadata__"]
    by_size = {}
    for name in names:
        begin, end = header[name]["data_offsets"]
        by_size.setdefault((end - begin, header[name]["dtype"]), []).append(name)
    return [group[:2] for group in by_size.values() if len(group) >= 2]


def _header_edits(header):
    """(description, edited header) pairs that keep the header valid JSON and (mostly) a
    well-formed safetensors file: what a careful forger or a confused tool could write."""
    names = sorted(k for k in header if k != "__metadata__")
    edits = []

    def edit(description, change):
        copy = json.loads(json.dumps(header))
        change(copy)
        if copy != header:  # (a square tensor's shape "transposed" is no edit)
            edits.append((description, copy))

    for name in names[:6]:
        entry = header[name]
        edit(f"rename {name}", lambda h, n=name: h.__setitem__(n + ".renamed", h.pop(n)))
        if entry["dtype"] == "F64":
            edit(f"dtype of {name} F64 → I64", lambda h, n=name: h[n].__setitem__("dtype", "I64"))
            edit(f"dtype of {name} F64 → U64", lambda h, n=name: h[n].__setitem__("dtype", "U64"))
            edit(f"dtype of {name} F64 → F32, shape doubled",
                 lambda h, n=name: h[n].update(dtype="F32", shape=h[n]["shape"][:-1] + [2 * h[n]["shape"][-1]] if h[n]["shape"] else [2]))
        if len(entry["shape"]) >= 2:
            edit(f"shape of {name} transposed", lambda h, n=name: h[n].__setitem__("shape", h[n]["shape"][::-1]))
            edit(f"shape of {name} flattened", lambda h, n=name: h[n].__setitem__("shape", [int(np.prod(h[n]["shape"]))]))
        edit(f"shape of {name} +1 on the last axis",
             lambda h, n=name: h[n].__setitem__("shape", h[n]["shape"][:-1] + [h[n]["shape"][-1] + 1] if h[n]["shape"] else [2]))
        edit(f"offsets of {name} shifted by 8",
             lambda h, n=name: h[n].__setitem__("data_offsets", [o + 8 for o in h[n]["data_offsets"]]))
        edit(f"{name} removed", lambda h, n=name: h.pop(n))
    for a, b in _same_size_pairs(header)[:4]:
        def swap_offsets(h, a=a, b=b):
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        edit(f"offsets of {a} and {b} swapped", swap_offsets)

        def swap_names(h, a=a, b=b):
            h[a], h[b] = h[b], h[a]
        edit(f"names {a} and {b} swapped", swap_names)
    edit("metadata removed", lambda h: h.pop("__metadata__"))
    for key in sorted(header["__metadata__"]):
        edit(f"metadata {key} removed", lambda h, k=key: h["__metadata__"].pop(k))
        edit(f"metadata {key} altered", lambda h, k=key: h["__metadata__"].__setitem__(
            k, h["__metadata__"][k].replace("1", "2", 1) if "1" in h["__metadata__"][k] else h["__metadata__"][k] + "x"))
    records = json.loads(header["__metadata__"]["tensors"])
    for name in names[:3]:
        def forge(h, n=name):  # the record rewritten to match a forged dtype: bytes still differ
            r = json.loads(h["__metadata__"]["tensors"])
            r[n][2] = "0" * 64
            h["__metadata__"]["tensors"] = json.dumps(r)
        edit(f"checksum of {name} replaced", forge)
    assert records
    return edits


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors"])
def test_header_edits_that_keep_the_json_valid_are_all_detected(run, tmp_path, file):
    original = _snapshot(run)
    work = str(tmp_path / "work")
    header, data = _header_and_data(os.path.join(run, "checkpoints", "step-000004", file))
    outcomes = Outcomes()
    edits = _header_edits(header)
    for description, edited in edits:
        directory = _fresh_copy(run, work)
        _write(os.path.join(directory, file), edited, data)
        outcomes.check(work, original, description, file)
    print(f"\nheader edits of {file}: {len(edits)} tried, {outcomes.counts}, silent {outcomes.silent}")
    assert outcomes.silent == [] and outcomes.counts["harmless"] == 0
    assert len(edits) >= 40


def test_without_the_records_a_flipped_data_byte_loads_silently(run, tmp_path):
    """Why the records exist: the parser alone accepts a flipped bit in a float."""
    path = os.path.join(run, "checkpoints", "step-000004", "model.safetensors")
    header, start = read_header(path)
    blob = bytearray(open(path, "rb").read())
    blob[-3] ^= 0x10  # inside the last tensor's data
    copy = tmp_path / "flipped.safetensors"
    copy.write_bytes(bytes(blob))
    before, after = load_file(path), load_file(str(copy))  # no error from the parser
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    work = str(tmp_path / "work")
    directory = _fresh_copy(run, work)
    shutil.copy(str(copy), os.path.join(directory, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' does not match its checksum"):
        ckpt.load_checkpoint(work)


def test_the_error_names_the_file_and_the_tensor(run, tmp_path):
    work = str(tmp_path / "work")
    directory = _fresh_copy(run, work)
    path = os.path.join(directory, "optimizer.safetensors")
    header, data = _header_and_data(path)
    name = sorted(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F64")[0]
    header[name]["dtype"] = "I64"
    _write(path, header, data)
    with pytest.raises(ValueError, match=rf"step-000004/optimizer.safetensors: tensor '{name}' is "
                                         r"I64 of shape .* in the header, but was saved as \['F64'"):
        ckpt.load_checkpoint(work)
