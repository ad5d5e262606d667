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
from typing import Dict, Optional

import numpy as np

from ..models.decoder import DecoderLM
from .hf_config import config_from_hf, hf_config_from_config
from .hf_weights import from_hf, to_hf
from .safetensors_file import load_file, save_file, write_atomically

ARCHITECTURES = {
    "openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM", "gptj": "GPTJForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "cohere": "CohereForCausalLM",
}
_DTYPE_NAMES = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32"}


def _read_tensors(path: str) -> Dict[str, np.ndarray]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        tensors: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise ValueError(f"{index} names the shard {shard!r}; shards must be "
                                 ".safetensors files inside the checkpoint directory")
            wanted = {name for name, file in weight_map.items() if file == shard}
            loaded = load_file(shard_path, wanted)
            absent = sorted(wanted - set(loaded))
            if absent:
                raise ValueError(f"shard {shard} lacks tensor(s) {absent[:8]} that the index lists")
            tensors.update(loaded)
        return tensors
    present = sorted(os.listdir(path))
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json "
                     f"(found {present}); npformer reads safetensors only and never loads pickled "
                     "checkpoints such as pytorch_model.bin")


def load_hf(path: str, dtype=np.float64) -> DecoderLM:
    """A :class:`DecoderLM` with the architecture of ``path/config.json`` and its weights,
    cast to ``dtype`` (float64 or float32), in evaluation mode (dropout off)."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be float64 or float32, got {dtype}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    config = config_from_hf(hf_config, _DTYPE_NAMES[dtype])
    model = DecoderLM(config)
    params = model.parameters()
    ours = from_hf(_read_tensors(path), params, config, hf_config["model_type"])
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
