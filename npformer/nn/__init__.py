"""Modules that own parameters and gradients and call the functional pairs.

``y, cache = module.forward(x)``; ``dx = module.backward(dy, cache)`` adds every parameter's
gradient into ``module.grads`` (see :mod:`npformer.nn.module`).
"""

from .attention import KVCache, MultiHeadAttention
from .embedding import Embedding
from .feedforward import FeedForward
from .linear import Linear
from .module import Module, ModuleList
from .norm import LayerNorm, RMSNorm, make_norm

__all__ = ["Embedding", "FeedForward", "KVCache", "LayerNorm", "Linear", "Module", "ModuleList",
           "MultiHeadAttention", "RMSNorm", "make_norm"]
