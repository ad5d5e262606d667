"""Models: blocks, the decoder-only LM and the 2017 encoder-decoder, built from a config."""

from ..config import ModelConfig
from .decoder import DecoderLM
from .encoder_decoder import EncoderDecoder


def build_model(config: ModelConfig, seed: int = 0):
    """``DecoderLM`` or ``EncoderDecoder``, whichever ``config.architecture`` names."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.architecture == "encoder-decoder":
        return EncoderDecoder(config, seed)
    return DecoderLM(config, seed)


__all__ = ["DecoderLM", "EncoderDecoder", "build_model"]
