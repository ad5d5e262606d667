"""Models: blocks, the decoder-only LM and the 2017 encoder-decoder, built from a config.

``DecoderLM`` and ``EncoderDecoder`` are imported on first use (PEP 562): ``ModelConfig``
reads :mod:`npformer.models.stats` to count parameters, and that must not pull in the layers'
numba kernels, so that a config (and ``npformer.functional.rope``'s scaled RoPE, which
validates through it) works with NumPy alone.
"""

from ..config import ModelConfig


def build_model(config: ModelConfig, seed: int = 0):
    """``DecoderLM`` or ``EncoderDecoder``, whichever ``config.architecture`` names."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.architecture == "encoder-decoder":
        from .encoder_decoder import EncoderDecoder

        return EncoderDecoder(config, seed)
    from .decoder import DecoderLM

    return DecoderLM(config, seed)


def __getattr__(name: str):
    if name == "DecoderLM":
        from .decoder import DecoderLM

        return DecoderLM
    if name == "EncoderDecoder":
        from .encoder_decoder import EncoderDecoder

        return EncoderDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DecoderLM", "EncoderDecoder", "build_model"]
