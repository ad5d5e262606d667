"""Gradient checks of the attention core (q, k and v each checked):

``attention_mha``, ``attention_mqa``, ``attention_gqa``, ``attention_causal``,
``attention_window``, ``attention_document``, ``attention_cross``, ``attention_padding``,
``attention_softmax1``, ``attention_sink``, ``attention_clipped``,
``attention_clipped_length_aware``, ``attention_softcap``.

Odd sizes (T = 5, S = 7, D = 3) so that no two axes can be confused, and inputs with
offsets and scales (not centred unit normals).
"""

import numpy as np

from ..functional.attention import attention_backward, attention_forward
from ..gradcheck import check_pair, register_check

GRADS = ("q", "k", "v")


def _qkv(rng: np.random.Generator, B: int, H: int, K: int, T: int, S: int, D: int, Dv: int,
         spread: float = 1.0) -> dict:
    # q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv); spread scales the scores
    return {
        "q": (rng.standard_normal((B, H, T, D)) * 1.3 + 0.4) * spread,
        "k": rng.standard_normal((B, K, S, D)) * 0.9 - 0.3,
        "v": rng.standard_normal((B, K, S, Dv)) * 1.6 + 0.7,
    }


def _run(name: str, inputs: dict):
    return check_pair(name, attention_forward, attention_backward, inputs, GRADS)


@register_check("attention_mha")
def check_attention_mha():
    # multi-head (K = H = 3), self-attention without a mask, value size Dv = 4 ≠ D = 3
    return _run("attention_mha", _qkv(np.random.default_rng(31), 2, 3, 3, 5, 5, 3, 4))


@register_check("attention_mqa")
def check_attention_mqa():
    # multi-query (K = 1 serves H = 4), custom scale (GPT-Neo's 1.0 would also do)
    inputs = _qkv(np.random.default_rng(32), 2, 4, 1, 5, 5, 3, 3)
    inputs["scale"] = 0.7
    return _run("attention_mqa", inputs)


@register_check("attention_gqa")
def check_attention_gqa():
    # grouped-query: H = 6 query heads share K = 2 kv heads (G = 3), causal
    inputs = _qkv(np.random.default_rng(33), 2, 6, 2, 5, 5, 3, 3)
    inputs["causal"] = True
    return _run("attention_gqa", inputs)


@register_check("attention_causal")
def check_attention_causal():
    # T = 5 new queries over S = 7 keys: bottom-right causal (KV-cache decoding), GQA K = 3
    inputs = _qkv(np.random.default_rng(34), 2, 6, 3, 5, 7, 3, 2)
    inputs["causal"] = True
    return _run("attention_causal", inputs)


@register_check("attention_window")
def check_attention_window():
    # sliding window of 3 over T = S = 7 (GPT-Neo local attention)
    inputs = _qkv(np.random.default_rng(35), 2, 3, 3, 7, 7, 3, 3)
    inputs.update(causal=True, window=3)
    return _run("attention_window", inputs)


@register_check("attention_document")
def check_attention_document():
    # Llama 3 packing: documents of lengths 2, 1, 4 and 3, 4 (single-token doc included);
    # the T = 5 queries are the last 5 of S = 7 positions, causal within each document
    inputs = _qkv(np.random.default_rng(36), 2, 6, 2, 5, 7, 3, 3)
    inputs.update(causal=True, doc_ids=np.array([[4, 4, 1, 7, 7, 7, 7], [0, 0, 0, 2, 2, 2, 2]]))
    return _run("attention_document", inputs)


@register_check("attention_cross")
def check_attention_cross():
    # cross-attention: T = 5 decoder queries over S = 7 encoder keys, no causal mask
    return _run("attention_cross", _qkv(np.random.default_rng(37), 2, 3, 3, 5, 7, 3, 4))


@register_check("attention_padding")
def check_attention_padding():
    # key padding: batch row 0 pads its last 2 keys, row 1 its first one, row 2 every key
    # (all its outputs and gradients must be exactly 0, and the check sees them as such)
    inputs = _qkv(np.random.default_rng(38), 3, 4, 2, 5, 7, 3, 3)
    padding = np.zeros((3, 7), dtype=bool)
    padding[0, 5:] = True
    padding[1, 0] = True
    padding[2, :] = True
    inputs["key_padding_mask"] = padding
    return _run("attention_padding", inputs)


@register_check("attention_softmax1")
def check_attention_softmax1():
    # softmax₁ ("off by one") with a causal mask and GQA
    inputs = _qkv(np.random.default_rng(39), 2, 6, 3, 5, 5, 3, 3)
    inputs.update(causal=True, softmax="softmax1")
    return _run("attention_softmax1", inputs)


@register_check("attention_sink")
def check_attention_sink():
    # a learned sink logit per query head (gpt-oss): q, k, v and the sinks (H,), GQA
    # (H = 6 query heads, each its own sink, over K = 2 kv heads), causal within documents
    # with a sliding window; sinks spread on both sides of the scores
    inputs = _qkv(np.random.default_rng(42), 2, 6, 2, 5, 7, 3, 3)
    sinks = np.array([-1.3, 0.4, 2.1, -0.2, 0.9, 1.6])  # (H,)
    inputs.update(causal=True, window=4, softmax="sink", sinks=sinks,
                  doc_ids=np.array([[1, 1, 1, 2, 2, 2, 2], [0, 0, 3, 3, 3, 3, 3]]))
    return check_pair("attention_sink", attention_forward, attention_backward, inputs,
                      GRADS + ("sinks",))


# clipped softmax: some probabilities clipped at 0 and at 1, none near the clip boundaries
CLIP_GAMMA, CLIP_ZETA = -0.04, 1.1
CLIP_MARGIN = 1e-3  # |u| and |u − 1| of every unmasked entry, far above the FD step 1e-6


def _clip_inputs() -> dict:
    inputs = _qkv(np.random.default_rng(60), 2, 3, 3, 5, 5, 3, 3, spread=1.6)
    inputs.update(causal=True, softmax="clipped", clip_gamma=CLIP_GAMMA, clip_zeta=CLIP_ZETA)
    return inputs


def clipped_preactivations(inputs: dict) -> np.ndarray:
    """u = (ζ − γ)·softmax(s) + γ at the allowed entries of the clipped check's inputs."""
    _, cache = attention_forward(**{**inputs, "softmax": "softmax"})
    q_soft = cache.P  # (B, K, G, T, S) softmax probabilities
    allowed = np.broadcast_to(cache.allowed, q_soft.shape)
    return ((CLIP_ZETA - CLIP_GAMMA) * q_soft + CLIP_GAMMA)[allowed]


@register_check("attention_clipped")
def check_attention_clipped():
    inputs = _clip_inputs()
    u = clipped_preactivations(inputs)
    # the check is only meaningful if it crosses both clips (at 1 also in rows with several
    # keys, where softmax < 1) and stays away from the kinks
    clipped_high = (u > 1) & (u < CLIP_ZETA - CLIP_MARGIN)
    if not ((u < 0).any() and clipped_high.any() and ((u > 0) & (u < 1)).any()):
        raise RuntimeError("attention_clipped inputs must clip at 0 and at 1 and leave some "
                           "entries unclipped")
    if min(np.abs(u).min(), np.abs(u - 1).min()) < CLIP_MARGIN:
        raise RuntimeError("attention_clipped inputs put an entry next to a clip boundary")
    return _run("attention_clipped", inputs)


# the length-aware clip: γ_t = −α / n_t, n_t the keys query t may see (causal, window 4)
CLIP_ALPHA = 0.5


def _length_aware_inputs() -> dict:
    inputs = _qkv(np.random.default_rng(44), 2, 4, 2, 6, 6, 3, 3, spread=1.6)
    inputs.update(causal=True, window=4, softmax="clipped", clip_alpha=CLIP_ALPHA,
                  clip_zeta=CLIP_ZETA)
    return inputs


def length_aware_preactivations(inputs: dict) -> np.ndarray:
    """u = (ζ − γ_t)·softmax(s) + γ_t at the allowed entries of the length-aware check, with
    γ_t = −α / n_t computed here from the mask (not by the code under test)."""
    _, cache = attention_forward(**{**inputs, "softmax": "softmax", "clip_alpha": None})
    q_soft = cache.P  # (B, K, G, T, S) softmax probabilities
    allowed = np.broadcast_to(cache.allowed, q_soft.shape)
    gamma = -CLIP_ALPHA / allowed.sum(axis=-1, keepdims=True)  # (B, K, G, T, 1) γ_t
    return ((CLIP_ZETA - gamma) * q_soft + gamma)[allowed]


@register_check("attention_clipped_length_aware")
def check_attention_clipped_length_aware():
    inputs = _length_aware_inputs()
    u = length_aware_preactivations(inputs)
    if not ((u < 0).any() and (u > 1).any() and ((u > 0) & (u < 1)).any()):
        raise RuntimeError("attention_clipped_length_aware inputs must clip at 0 and at 1 and "
                           "leave some entries unclipped")
    if min(np.abs(u).min(), np.abs(u - 1).min()) < CLIP_MARGIN:
        raise RuntimeError("attention_clipped_length_aware inputs put an entry next to a clip "
                           "boundary")
    return _run("attention_clipped_length_aware", inputs)


@register_check("attention_softcap")
def check_attention_softcap():
    # soft-capping at 1.5 with scores up to ~±5 (tanh well into its curved part), GQA,
    # a sliding window and causal
    inputs = _qkv(np.random.default_rng(41), 2, 6, 2, 5, 7, 3, 3, spread=2.0)
    inputs.update(causal=True, window=4, softcap=1.5, scale=1.0)
    return _run("attention_softcap", inputs)

