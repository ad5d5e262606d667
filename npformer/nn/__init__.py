"""Modules that own parameters and gradients and call the functional pairs.

``y, cache = module.forward(x)``; ``dx = module.backward(dy, cache)`` adds every parameter's
gradient into ``module.grads`` (see :mod:`npformer.nn.module`).
"""

from .attention import KVCache, MultiHeadAttention
from .linear import Linear
from .module import Module

__all__ = ["KVCache", "Linear", "Module", "MultiHeadAttention"]
