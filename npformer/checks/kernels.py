"""Gradient checks through the fused attention kernels (npformer.kernels.flash_attention):

``kernel_causal``, ``kernel_window``, ``kernel_document``, ``kernel_gqa``, ``kernel_cross``,
``kernel_softmax1``, ``kernel_sink``, ``kernel_softcap``.

Finite differences of the numba forward against the numba backward, float64, q, k and v
each checked. Small tiles (4 queries × 3 keys) so that even these short sequences cross
several tiles, including partial edge tiles and skipped ones; odd sizes (D = 3, Dv = 2 or 4)
so that no two axes can be confused; inputs with offsets and scales.
"""

import numpy as np

from ..gradcheck import check_pair, register_check
from ..kernels.flash_attention import _flash_backward, _flash_forward
from ..kernels.flash_attention_reference import prepare_flash_attention
from .attention import _qkv  # the same shaped, offset q, k, v as the reference's checks

GRADS = ("q", "k", "v")
BLOCK_Q, BLOCK_K = 4, 3  # tile sizes of these checks: several tiles per sequence


def kernel_forward(q, k, v, **options):
    """The kernel forward with this module's small tiles (options as attention_forward)."""
    q, k, v, prepared = prepare_flash_attention(q, k, v, **options)
    return _flash_forward(q, k, v, prepared, BLOCK_Q, BLOCK_K)


def kernel_backward(do, cache):
    return _flash_backward(do, cache, BLOCK_Q, BLOCK_K)


def _run(name: str, inputs: dict):
    return check_pair(name, kernel_forward, kernel_backward, inputs, GRADS)


@register_check("kernel_causal")
def check_kernel_causal():
    # T = 6 new queries over S = 11 keys: bottom-right causal (KV-cache decoding), K = H = 2
    inputs = _qkv(np.random.default_rng(71), 2, 2, 2, 6, 11, 3, 4)
    inputs["causal"] = True
    return _run("kernel_causal", inputs)


@register_check("kernel_window")
def check_kernel_window():
    # sliding window of 4 over T = S = 13: tiles left of the band are skipped
    inputs = _qkv(np.random.default_rng(72), 2, 3, 3, 13, 13, 3, 2)
    inputs.update(causal=True, window=4)
    return _run("kernel_window", inputs)


@register_check("kernel_document")
def check_kernel_document():
    # Llama 3 packing, causal within documents of lengths 3, 1 (a single token), 5, 2 / 4, 7;
    # tiles across documents are skipped; the last row has a padded key as well
    inputs = _qkv(np.random.default_rng(73), 2, 4, 2, 11, 11, 3, 3)
    doc_ids = np.array([[0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3], [5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6]])
    padding = np.zeros((2, 11), dtype=bool)
    padding[1, 7] = True
    inputs.update(causal=True, doc_ids=doc_ids, key_padding_mask=padding)
    return _run("kernel_document", inputs)


@register_check("kernel_gqa")
def check_kernel_gqa():
    # grouped-query: H = 6 query heads share K = 2 kv heads (G = 3); dk, dv sum the group
    inputs = _qkv(np.random.default_rng(74), 2, 6, 2, 7, 7, 3, 3)
    inputs.update(causal=True, scale=0.6)
    return _run("kernel_gqa", inputs)


@register_check("kernel_cross")
def check_kernel_cross():
    # cross-attention: T = 5 decoder queries over S = 10 encoder keys, padding in row 1 and a
    # fully padded row 2 (its outputs and gradients must be exactly 0)
    inputs = _qkv(np.random.default_rng(75), 3, 2, 1, 5, 10, 3, 4)
    padding = np.zeros((3, 10), dtype=bool)
    padding[1, 6:] = True
    padding[2, :] = True
    inputs["key_padding_mask"] = padding
    return _run("kernel_cross", inputs)


@register_check("kernel_softmax1")
def check_kernel_softmax1():
    # softmax₁ ("off by one") inside the online softmax, causal, GQA
    inputs = _qkv(np.random.default_rng(76), 2, 4, 2, 9, 9, 3, 3)
    inputs.update(causal=True, softmax="softmax1")
    return _run("kernel_softmax1", inputs)


@register_check("kernel_sink")
def check_kernel_sink():
    # a learned sink per query head: the online softmax starts at m = s_h, l = 1; GQA, causal
    # with a window (skipped tiles), a fully padded batch row (o = 0, every gradient 0 there)
    inputs = _qkv(np.random.default_rng(78), 2, 4, 2, 9, 9, 3, 3)
    padding = np.zeros((2, 9), dtype=bool)
    padding[1, :] = True
    inputs.update(causal=True, window=5, softmax="sink", key_padding_mask=padding,
                  sinks=np.array([0.8, -1.1, 2.4, 0.1]))
    return check_pair("kernel_sink", kernel_forward, kernel_backward, inputs,
                      GRADS + ("sinks",))


@register_check("kernel_softcap")
def check_kernel_softcap():
    # soft-capping at 1.5 with scores up to ~±5 (tanh well into its curved part), a window
    inputs = _qkv(np.random.default_rng(77), 2, 4, 2, 9, 9, 3, 3, spread=2.0)
    inputs.update(causal=True, window=5, softcap=1.5, scale=1.0)
    return _run("kernel_softcap", inputs)
