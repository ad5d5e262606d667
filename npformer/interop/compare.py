"""``npformer compare``: the npformer model against its PyTorch twin, tensor by tensor.

Both models get the same weights and the same batch; both run forward, the mean
cross-entropy, and backward; then logits, loss and every parameter gradient are compared
(``max|a − b| ≤ atol + rtol · max|ref|``: float64 rtol 1e-10, float32 rtol 1e-4 + atol 1e-5).

The twin is
- the Hugging Face class of the preset's family (``save_hf`` → ``from_pretrained``), for
  every preset Hugging Face can express, and for ``--hf DIR``;
- ``torch.nn.Transformer`` plus embeddings and head written in torch, for transformer-2017;
- :mod:`npformer.interop.torch_reference` (the lineage written directly in torch) for the
  presets no Hugging Face class reproduces (gpt3: GPT-2 with banded layers; palm: a
  parallel, multi-query, half-split-RoPE model — Cohere is its nearest class but rotates
  interleaved pairs).

In float64 the Hugging Face reference runs under :func:`~npformer.interop.hf_float64.exact_float64`,
which removes the float32 islands transformers keeps even in a float64 model. torch and
transformers are needed here (the test extra), not for loading or saving.
"""

from __future__ import annotations

import os
import tempfile
from typing import List, Optional

import numpy as np

from ..checks.models import randomize_model
from ..functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..gradcheck import TensorReport
from ..models import build_model
from ..presets import get_preset, tiny_config
from .hf_checkpoint import hf_state_dict, load_hf, save_hf

TOLERANCES = {"float64": (1e-10, 0.0), "float32": (1e-4, 1e-5)}
TORCH_REFERENCE_PRESETS = ("transformer-2017", "gpt3", "palm")  # no Hugging Face class reproduces them


# A gradient that is zero by structure (a key bias: softmax ignores a shift shared by a whole
# row of scores) comes out as rounding noise on both sides (~1e-17), which has no scale to be
# relative to: differences below this fraction of the model's largest gradient count as zero.
STRUCTURAL_ZERO = 1e-13


def _report(name: str, tensor: str, ours, theirs, dtype: str, floor: float = 0.0) -> TensorReport:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        return TensorReport(name, tensor, float("inf"), float("inf"), False, ours.size, ours.size)
    rtol, atol = TOLERANCES[dtype]
    abs_err = float(np.max(np.abs(ours - theirs), initial=0.0))
    scale = float(np.max(np.abs(theirs), initial=0.0))
    rel_err = abs_err / scale if scale > 0 else abs_err
    passed = bool(np.all(np.isfinite(ours)) and abs_err <= atol + rtol * scale + floor)
    return TensorReport(name, tensor, abs_err, rel_err, passed, ours.size, ours.size)


def _batch(vocab_size: int, seed: int = 0, seq_len: int = 7):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, vocab_size, (2, seq_len)),
            rng.integers(0, vocab_size, (2, seq_len)))


def _text_batch(tokens):
    """(ids (1, N−1), targets (1, N−1)): each token of a text predicts the next one."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size < 2:
        raise ValueError(f"the text must encode to at least 2 token ids to compare a next-token "
                         f"loss on (one to read, one to predict), got {tokens.tolist()}")
    return tokens[None, :-1], tokens[None, 1:]


def _ours(model, ids, targets, **inputs):
    logits = model.forward(ids, **inputs) if inputs.get("tgt_ids") is None else None
    if logits is None:
        logits = model.forward(inputs.pop("src_ids"), inputs.pop("tgt_ids"))
    loss, cache = cross_entropy_forward(logits, targets)
    model.zero_grad()
    model.backward(cross_entropy_backward(1.0, cache))
    return logits, float(loss)


def _torch_loss(logits, targets):
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, torch.as_tensor(targets)[..., None]).mean()


def _failure(name: str, what: str, size: int = 0) -> TensorReport:
    """A report that fails: something compare could not check counts against the model."""
    return TensorReport(name, what, float("inf"), float("inf"), False, 0, size)


def compare_hf_dir(path: str, dtype: str = "float64", name: Optional[str] = None,
                   tokens=None, seq_len: int = 7) -> List[TensorReport]:
    """npformer's ``load_hf(path)`` against ``transformers``' ``from_pretrained(path)``.

    A pass means both models computed the same thing from the same file: transformers loaded
    every tensor of the checkpoint into its model (no missing, unexpected or mis-shaped key,
    which it would otherwise fill with random values or drop with a warning), and the logits,
    the loss and the gradient of every parameter — by checkpoint name, the same set on both
    sides — agree. Anything that could not be compared is a failing report, never a skipped one.

    The batch is (2, seq_len) random ids (longer than a scaled RoPE's original length to
    exercise dynamic NTK, whose frequencies change only past it) unless ``tokens`` (N,) gives
    a text's ids (N ≥ 2): then it is one sequence, the ids ``tokens[:-1]`` predicting their
    successors ``tokens[1:]`` (the loss a language model trains on for that text)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hf_float64 import exact_float64, hf_parameter_name

    name = name or os.path.basename(os.path.normpath(path))
    ours = load_hf(path, np.dtype(dtype))
    ids, targets = (_batch(ours.config.vocab_size, seq_len=seq_len) if tokens is None
                    else _text_batch(tokens))
    logits, loss = _ours(ours, ids, targets)
    grads = hf_state_dict(ours, grads=True)
    torch_dtype = getattr(torch, dtype)
    with exact_float64(enabled=dtype == "float64"):
        hf, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                           output_loading_info=True)
        hf = hf.eval()
        hf_logits = hf(torch.as_tensor(ids)).logits
        hf_loss = _torch_loss(hf_logits, targets)
        hf_loss.backward()
    reports = [_failure(name, f"{key} ({problem} when transformers loaded the checkpoint)")
               for problem in ("missing_keys", "unexpected_keys", "mismatched_keys")
               for key in sorted(map(str, loading.get(problem) or ()))]
    reports += [_report(name, "logits", logits, hf_logits.detach().numpy(), dtype),
                _report(name, "loss", loss, hf_loss.item(), dtype)]
    theirs = {hf_parameter_name(hf, n): p for n, p in hf.named_parameters()}
    floor = gradient_floor(grads.values())
    for tensor in sorted(set(grads) | set(theirs)):
        if tensor not in theirs:
            reports.append(_failure(name, f"{tensor} (missing in torch)", grads[tensor].size))
        elif tensor not in grads:
            reports.append(_failure(name, f"{tensor} (missing in npformer)", theirs[tensor].numel()))
        elif theirs[tensor].grad is None:
            reports.append(_failure(name, f"{tensor} (no gradient in torch)", grads[tensor].size))
        else:
            reports.append(_report(name, tensor, grads[tensor], theirs[tensor].grad.numpy(), dtype, floor))
    return reports


def gradient_floor(grads) -> float:
    """:data:`STRUCTURAL_ZERO` times the largest gradient entry of the model."""
    return STRUCTURAL_ZERO * max(float(np.max(np.abs(g), initial=0.0)) for g in grads)


def compare_preset(name: str, dtype: str = "float64", seed: int = 0) -> List[TensorReport]:
    """A tiny instance of preset ``name`` (unusual random weights) against its torch twin."""
    get_preset(name)
    config = tiny_config(name, dropout=0.0, d_ff=None)  # F from C: openai-gpt fixes F = 4C
    model = build_model(config, seed=seed).eval()
    randomize_model(model, np.random.default_rng(seed))
    if name in TORCH_REFERENCE_PRESETS:
        from .torch_reference import compare_with_torch_reference

        return compare_with_torch_reference(name, model, dtype)
    with tempfile.TemporaryDirectory() as directory:
        save_hf(model, directory)
        return compare_hf_dir(directory, dtype, name=name)


def compare_example(name: str, dtype: str = "float64", seed: int = 0) -> List[TensorReport]:
    """A tiny random-weight checkpoint of a Hugging Face family, written by transformers'
    ``save_pretrained`` (:mod:`npformer.interop.hf_examples`), through :func:`compare_hf_dir`."""
    from .hf_examples import write_example

    with tempfile.TemporaryDirectory() as directory:
        write_example(name, directory, dtype, seed)
        return compare_hf_dir(directory, dtype, name=name)
