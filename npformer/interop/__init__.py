"""Interop: Hugging Face checkpoint directories (config.json + safetensors) in and out.

NumPy only at run time: reading and writing need neither torch nor transformers.
"""

from .hf_checkpoint import hf_state_dict, load_hf, save_hf
from .hf_config import config_from_hf, hf_config_from_config

__all__ = ["config_from_hf", "hf_config_from_config", "hf_state_dict", "load_hf", "save_hf"]
