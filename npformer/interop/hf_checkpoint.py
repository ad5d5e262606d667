"""Hugging Face checkpoint directories in and out: ``load_hf``, ``save_hf``, ``hf_state_dict``.

A checkpoint directory is ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Reading needs NumPy alone — no torch, no transformers,
and never a pickle: a directory holding only ``pytorch_model.bin`` is refused.

    model = load_hf("path/to/gpt2-dir")                 # a DecoderLM, float64 by default
    logits = model.forward(ids)                         # (B, T) → (B, T, V)
    model.zero_grad(); model.backward(dlogits)
    grads = hf_state_dict(model, grads=True)            # gradients under HF names and layouts
    save_hf(model, "out-dir")                           # transformers' from_pretrained reads it
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from .._validate import NonFiniteError
from ..models.decoder import DecoderLM
from .hf_config import config_from_hf, hf_config_from_config
from .hf_weights import from_hf, to_hf
from .safetensors_file import load_file, save_file, write_atomically

ARCHITECTURES = {
    "openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM", "gptj": "GPTJForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "cohere": "CohereForCausalLM",
    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",  # issue 16
}
_DTYPE_NAMES = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32"}


def _read_json(path: str):
    """The JSON value in ``path``; a missing file, non-UTF-8 bytes or malformed JSON is a
    one-line ValueError naming the file (npformer.checkpoint.read_json, imported here at call
    time: npformer.checkpoint imports this package)."""
    from ..checkpoint import read_json

    return read_json(path)


def _read_tensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors by Hugging Face name, the file each came from)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        tensors = load_file(single)
        return tensors, {name: single for name in tensors}
    if os.path.isfile(index):
        contents = _read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no weight_map object mapping tensor names to shard files")
        tensors: Dict[str, np.ndarray] = {}
        files: Dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise ValueError(f"{index} names the shard {shard!r}; shards must be "
                                 ".safetensors files inside the checkpoint directory")
            wanted = {name for name, file in weight_map.items() if file == shard}
            if not os.path.isfile(shard_path):
                raise ValueError(f"{index} lists the shard {shard} (for {len(wanted)} tensor(s), "
                                 f"e.g. {sorted(wanted)[0]!r}), but {shard_path} does not exist")
            loaded = load_file(shard_path, wanted)
            absent = sorted(wanted - set(loaded))
            if absent:
                raise ValueError(f"shard {shard} lacks tensor(s) {absent[:8]} that the index lists")
            tensors.update(loaded)
            files.update({name: shard_path for name in loaded})
        return tensors, files
    present = sorted(os.listdir(path))
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json "
                     f"(found {present}); npformer reads safetensors only and never loads pickled "
                     "checkpoints such as pytorch_model.bin")


def _check_finite(tensors: Dict[str, np.ndarray], files: Dict[str, str], dtype: np.dtype) -> None:
    """Every float tensor finite in ``dtype``: a NaN or inf in the file, or a value that
    overflows the cast (1e300 → float32), is a NonFiniteError naming the tensor and the file."""
    for name, tensor in tensors.items():
        if not np.issubdtype(tensor.dtype, np.floating):
            continue  # refused by name after the layout mapping
        stored_bad = ~np.isfinite(tensor)
        bad = stored_bad
        if np.finfo(tensor.dtype).max > np.finfo(dtype).max:  # only a narrowing cast overflows
            with np.errstate(over="ignore"):
                bad = stored_bad | ~np.isfinite(tensor.astype(dtype))
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), tensor.shape)
            what = (f"{int(stored_bad.sum())} NaN or infinite value(s)" if stored_bad.any()
                    else f"{int(bad.sum())} value(s) that overflow {dtype}")
            raise NonFiniteError(f"tensor {name!r} in {files[name]} contains {what} (first at "
                                 f"index {tuple(int(i) for i in first)}, value {tensor[first]!r})")


def load_hf(path: str, dtype=np.float64) -> DecoderLM:
    """A :class:`DecoderLM` with the architecture of ``path/config.json`` and its weights,
    cast to ``dtype`` (float64 or float32), in evaluation mode (dropout off)."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be float64 or float32, got {dtype}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    hf_config = _read_json(config_path)
    try:
        config = config_from_hf(hf_config, _DTYPE_NAMES[dtype])
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    model = DecoderLM(config)
    params = model.parameters()
    hf_tensors, files = _read_tensors(path)
    _check_finite(hf_tensors, files, dtype)
    ours = from_hf(hf_tensors, params, config, hf_config["model_type"])
    for name, value in ours.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"tensor for {name} has dtype {value.dtype}; weights must be floats")
        params[name][...] = value.astype(dtype)
    model.hf_model_type = hf_config["model_type"]
    return model.eval()


def _model_type(model: DecoderLM, model_type: Optional[str]) -> str:
    if model_type is None:
        model_type = getattr(model, "hf_model_type", None)
    return hf_config_from_config(model.config, model_type)["model_type"]


def hf_state_dict(model: DecoderLM, grads: bool = False,
                  model_type: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The parameters — or, with ``grads=True``, the accumulated gradients — under Hugging
    Face names and layouts (the family of a loaded checkpoint, else the first that can
    express the config). Tied weights appear once, under the embedding's name, holding the
    sum of both uses' gradients."""
    if not isinstance(model, DecoderLM):
        raise ValueError(f"hf_state_dict takes a DecoderLM, got {type(model).__name__}")
    model_type = _model_type(model, model_type)
    tensors = model.gradients() if grads else model.parameters()
    return to_hf(tensors, model.config, model_type)


def save_hf(model: DecoderLM, path: str, model_type: Optional[str] = None) -> str:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``path`` so that
    ``transformers``' ``AutoModelForCausalLM.from_pretrained(path)`` rebuilds the model.
    Returns the ``model_type`` written. A config no Hugging Face family reproduces raises."""
    if not isinstance(model, DecoderLM):
        raise ValueError(f"save_hf takes a DecoderLM, got {type(model).__name__}")
    hf_config = hf_config_from_config(model.config, model_type or getattr(model, "hf_model_type", None))
    model_type = hf_config["model_type"]
    hf_config.update(architectures=[ARCHITECTURES[model_type]], dtype=model.config.dtype)
    os.makedirs(path, exist_ok=True)
    save_file(to_hf(model.parameters(), model.config, model_type),
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    write_atomically(os.path.join(path, "config.json"), [text.encode("utf-8")])
    return model_type
