"""Shared test helpers: parity tolerances from DESIGN.md and an error-reporting comparison."""

from __future__ import annotations

import numpy as np

# PyTorch parity, DESIGN.md: float64 within 1e-10 relative; float32 within 1e-4 relative
# (1e-5 absolute on O(1) values). The rule is max|a - b| <= atol + rtol * max|ref|.
PARITY = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=0.0),
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),
}

# Finite differences in float64: max relative error per tensor.
FD_RTOL = 1e-6

# Two runs of the same torch model over byte-equal weights: agreement at rounding level
# (in units of the dtype's machine epsilon, relative to the largest reference value).
ROUND_TRIP_ULPS = 64


def max_errors(actual, expected):
    """(max abs error, max abs error / max|expected|) as floats."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return abs_err, (abs_err / scale if scale > 0 else abs_err)


def assert_close(actual, expected, dtype, what: str = "", rtol=None, atol=None):
    """Parity assertion with the DESIGN.md tolerance of ``dtype``; the message gives both errors."""
    tol = PARITY[np.dtype(dtype)]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    if hasattr(actual, "detach"):
        actual = actual.detach().numpy()
    if hasattr(expected, "detach"):
        expected = expected.detach().numpy()
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in result"
    abs_err, rel_err = max_errors(actual, expected)
    bound = atol + rtol * float(np.max(np.abs(expected), initial=0.0))
    assert abs_err <= bound, (
        f"{what}: max abs err {abs_err:.3e} > {bound:.3e} "
        f"(atol {atol:g} + rtol {rtol:g} * max|ref|); max rel err {rel_err:.3e}"
    )


def assert_gradcheck_passes(reports):
    """Every tensor of a finite-difference report within FD_RTOL."""
    assert reports, "the check produced no reports"
    for r in reports:
        assert r.max_rel_err <= FD_RTOL, (
            f"{r.name}/{r.tensor}: max rel err {r.max_rel_err:.3e} > {FD_RTOL:g} "
            f"(max abs err {r.max_abs_err:.3e})"
        )
        assert r.passed


def to_torch(array, requires_grad=False):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array).copy())
    if requires_grad:
        t.requires_grad_(True)
    return t


def assert_hf_round_trip(hf, hf_dir, out_dir, model_type: str, dtype, ids,
                         attn_implementation: str = "eager") -> None:
    """``load_hf(hf_dir)`` → ``save_hf(out_dir)`` writes the very tensors of transformers'
    ``save_pretrained`` (names, dtypes, shapes, bytes; a tied head is omitted by both), and
    ``from_pretrained(out_dir)`` computes the logits of ``hf`` on ``ids`` (B, T).

    What is guaranteed, and so asserted: the tensors are equal byte for byte and the class is
    the same. Two torch forward passes over those equal weights are not bitwise reproducible on
    every CPU (on an AMD EPYC with AVX2 they differed by ~2e-16 relative: the BLAS may pick
    another kernel or blocking for a differently aligned copy), so the logits are compared at
    rounding level, ``ROUND_TRIP_ULPS`` units of the dtype's epsilon relative to max|logits| —
    100x tighter than the float64 parity tolerance, far below any real difference of models."""
    import os

    import safetensors.numpy
    import torch
    import transformers

    from npformer.interop import load_hf, save_hf

    model = load_hf(hf_dir, dtype=dtype)
    assert save_hf(model, out_dir) == model_type
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
    a = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    b = safetensors.numpy.load_file(os.path.join(out_dir, "model.safetensors"))
    assert sorted(a) == sorted(b)
    if model.config.tie_embeddings:
        assert "lm_head.weight" not in a
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name

    torch_dtype = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
    again, info = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch_dtype[np.dtype(dtype)], attn_implementation=attn_implementation,
        output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info[key]}"
    assert type(again) is type(hf)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
        logits = again.eval()(torch.from_numpy(ids)).logits.numpy()
    assert logits.dtype == dtype
    assert_close(logits, expected, dtype, f"{model_type}: from_pretrained(save_hf(load_hf(dir))) "
                 "logits vs the original's", rtol=ROUND_TRIP_ULPS * np.finfo(dtype).eps, atol=0.0)


# A training run small enough for tests: gpt2 at C = 16, one layer, float64.
TINY_MODEL = dict(d_model=16, n_layers=1, n_heads=2)


def tiny_train_options(tmp_path, name: str = "run", **changes):
    """TrainOptions of an 8-step float64 run of a tiny gpt2 into ``tmp_path / name``."""
    from npformer.train import TrainOptions

    values = dict(preset="gpt2", out=str(tmp_path / name), steps=8, batch_size=4, seq_len=16,
                  lr=1e-2, warmup_steps=2, dtype="float64", eval_interval=4, eval_batches=2,
                  checkpoint_interval=4, model_overrides=dict(TINY_MODEL))
    values.update(changes)
    return TrainOptions(**values)


def assert_subset_passes_without_jit(test_file: str, subset: str, passed: int, probe: str):
    """Run ``pytest test_file -k subset`` in a child process with NUMBA_DISABLE_JIT=1, where
    the kernels run as ordinary Python, and require exactly ``passed`` passes (the subset ran
    in full, nothing skipped). probe: "module:function" of a kernel that must then be a plain
    Python function, not a numba dispatcher (the JIT is really off)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_DISABLE_JIT="1",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    module, function = probe.split(":")
    check = subprocess.run(
        [sys.executable, "-c", f"from {module} import {function} as k; print(type(k).__name__)"],
        env=env, capture_output=True, text=True, cwd=repo)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "function", check.stdout
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           test_file, "-k", subset], env=env, capture_output=True, text=True,
                          cwd=repo)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{passed} passed" in tail, tail


# ---- whole models with unusual weights, for comparing two implementations ----------------


def random_weight_model(name: str, dtype: str = "float64", **config_fields):
    """The preset ``name`` at tiny size (dropout 0 unless given) in training mode, its weights
    redrawn unusual (norm gains ~1 ± 0.3, everything else ~N(0, 0.3²)) so that every path
    carries signal; the same numbers for the same arguments."""
    from npformer.models import build_model
    from npformer.presets import tiny_config

    config_fields.setdefault("dropout", 0.0)
    model = build_model(tiny_config(name, dtype=dtype, **config_fields), seed=3)
    rng = np.random.default_rng(7)
    for key, p in model.parameters().items():
        base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
        p[...] = (base + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model.train()


def decoded_logits(model, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits (B, T, V) of ``ids`` (B, T) decoded with the KV cache: the first ``prompt``
    tokens in one forward, then one token per forward (to compare with a full forward)."""
    caches = model.new_kv_caches()
    pieces = [model.forward(ids[:, :prompt], kv_caches=caches)]
    pieces += [model.forward(ids[:, t:t + 1], kv_caches=caches) for t in range(prompt, ids.shape[1])]
    return np.concatenate(pieces, axis=1)


def forward_backward(model, seed: int = 0):
    """(logits, {name: gradient}) of one forward and backward with a random upstream gradient
    (copies: the next call does not change them). Decoders read (2, 7) ids, with three
    documents when the config packs documents; the encoder-decoder (2, 9) → (2, 7)."""
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    if model.config.architecture == "encoder-decoder":
        logits = model.forward(rng.integers(0, V, (2, 9)), rng.integers(0, V, (2, 7)))
    else:
        doc_ids = np.array([[0, 0, 0, 1, 1, 2, 2]] * 2) if model.config.document_mask else None
        logits = model.forward(rng.integers(0, V, (2, 7)), doc_ids=doc_ids)
    logits = logits.copy()
    model.zero_grad()
    model.backward(rng.standard_normal(logits.shape).astype(logits.dtype))
    return logits, {n: g.copy() for n, g in model.gradients().items()}


def modules_of(model, kind) -> list:
    """Every module of type ``kind`` (a class or a tuple) in the model's tree."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, kind):
            found.append(module)
        stack.extend(child for _, child in module.named_children())
    return found


def edit_config_json(path, rename=(), drop=(), **values) -> dict:
    """Rewrite ``path``/config.json as a hand-written or older config would be: keys renamed
    (old → new), dropped, or set. Returns the new contents."""
    import json

    file = f"{path}/config.json"
    with open(file) as f:
        hf = json.load(f)
    for old, new in dict(rename).items():
        hf[new] = hf.pop(old)
    for key in drop:
        hf.pop(key, None)
    hf.update(values)
    with open(file, "w") as f:
        json.dump(hf, f)
    return hf
