"""An instrumented evaluation forward of a decoder-only model: hooks on a readable copy.

The measurements of :mod:`.outliers` and :mod:`.quantize` need to see (and, for
quantization, replace) activations inside the model. They get them without changing any
layer's code:

1. :func:`readable_copy` builds the same model with ``attention_impl="numpy"`` and
   ``layer_impl="numpy"`` and copies every parameter, so every projection runs through
   ``Linear.forward`` and the attention core is :func:`npformer.functional.attention.
   attention_forward`, whose cache holds the probabilities P (B, K, G, T, S). Dropout is off
   (``eval()``). The caller's model is never modified.
2. :func:`instrumented` wraps ``forward`` methods of the copy's module *instances* (never
   their classes) for the duration of a ``with`` block and restores them afterwards. Every
   wrapper forwards ``*args`` / ``**kwargs`` unchanged, so options a layer or the attention
   core gains later (a sink logit passed as a keyword, say) pass through.

What a :class:`Probe` sees, with ``l`` the layer index (names as in ``named_parameters``):

    point("embed", x)                   the embedding output entering block 0    (B, T, C)
    point("layers.l", y)                block l's output, the residual stream     (B, T, C)
    point("layers.l.attn.q_proj", x)    the input of every Linear of the blocks (q_proj,
                                        k_proj, v_proj, out_proj, ffn.up, ffn.down, ffn.gate)
    point("layers.l.attn", x)           the attention's input, only with attention_gate
                                        (the gate reads it besides q, k, v)
    output(name, y)                     the monitored outputs: "layers.l", "layers.l.attn.
                                        out_proj", "layers.l.ffn.down", and every norm of a
                                        block ("layers.l.attn_norm", ".ffn_norm", sandwich
                                        ".attn_post_norm", ".ffn_post_norm") and "final_norm"
    attention(l, P)                     P (B, H, T, S) of layer l, head h = κ·G + g
    gate(l, g)                          σ(x_h · w_h + b_h) (B, T, H) of a gated attention

``point`` returns the array the model continues with (the identity, or its fake-quantized
value); the others only observe. The qk-norms inside the attention are not monitored (they
act on (B, T, H, D) head rows, not on the residual width).

Gated FFNs (swiglu, geglu, geglu_tanh) call the fused pair of
:mod:`npformer.functional.glu` with the three weights, not ``Linear.forward``; here their
``forward`` is replaced by the same lines written out (``g = gate(x)``, ``u = up(x)``,
``h = act(g) ⊙ u``, ``y = down(h)``) through the three Linears, tested equal to the fused
pair, so their inputs and weights are instrumented like any other.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np

from ..functional.gelu import gelu_forward
from ..functional.silu import silu_forward
from ..models import build_model
from ..nn.attention import MultiHeadAttention
from ..nn.feedforward import FeedForwardCache, _FUSED_GATED, _GATED
from ..nn.linear import Linear
from ..nn.norm import LayerNorm, RMSNorm

# Linears whose output is a monitored activation (Bondarenko et al.: out_proj and fc2).
MONITORED_LINEARS = ("attn.out_proj", "ffn.down")


class Probe:
    """What the instrumented forward reports; the base class observes nothing and changes
    nothing (its forward is the model's own)."""

    wants_gates = False  # report each gated attention's gates to gate()

    def point(self, name: str, x: np.ndarray) -> np.ndarray:
        return x

    def output(self, name: str, y: np.ndarray) -> None:
        pass

    def attention(self, layer: int, P: np.ndarray) -> None:
        pass

    def gate(self, layer: int, g: np.ndarray) -> None:
        pass


def check_decoder(model, what: str):
    """``model`` must be a :class:`~npformer.models.decoder.DecoderLM`; returns it."""
    from ..models.decoder import DecoderLM

    if not isinstance(model, DecoderLM):
        architecture = getattr(getattr(model, "config", None), "architecture", None)
        raise ValueError(f"{what} needs a decoder-only model (npformer DecoderLM, architecture="
                         f"'decoder'); got {type(model).__name__}"
                         + (f" (architecture={architecture!r})" if architecture else ""))
    return model


def readable_copy(model):
    """The same decoder on the readable path (numpy attention and layers), with a copy of
    every parameter, in evaluation mode."""
    check_decoder(model, "the instrumented forward")
    config = model.config.replace(attention_impl="numpy", layer_impl="numpy")
    copy = build_model(config)
    source, target = model.parameters(), copy.parameters()
    if set(source) != set(target):
        raise ValueError(f"the readable copy of the model has parameters {sorted(target)} but the "
                         f"model has {sorted(source)}; cannot copy its weights")
    for name, value in source.items():
        target[name][...] = value
    return copy.eval()


def _blocks_checked(model) -> list:
    """The blocks, each with one self-attention this instrumentation understands."""
    for layer, block in enumerate(model.layers):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, MultiHeadAttention) or not hasattr(block, "ffn"):
            raise ValueError(f"layers.{layer} ({type(block).__name__}) has no attn "
                             "(MultiHeadAttention) and ffn; the instrumented forward knows "
                             "sequential and parallel decoder blocks")
        if attn.fused_qkv:
            raise ValueError(f"layers.{layer}.attn uses fused_qkv (one qkv_proj weight sliced "
                             "outside Linear.forward); the instrumented forward needs separate "
                             "q_proj, k_proj, v_proj")
        core = getattr(attn, "core", None)
        if not (isinstance(core, tuple) and len(core) == 2 and all(map(callable, core))):
            raise ValueError(f"layers.{layer}.attn.core is not a (forward, backward) pair; the "
                             "instrumented forward wraps the attention core's forward")
    return list(model.layers)


def _linears(module, prefix: str) -> Iterable[Tuple[str, Linear]]:
    """Every Linear inside ``module`` (depth first), with its dotted name."""
    for name, child in module.named_children():
        if isinstance(child, Linear):
            yield prefix + name, child
        else:
            yield from _linears(child, prefix + name + ".")


def block_linears(model) -> List[Tuple[str, Linear]]:
    """(name, Linear) of every Linear inside the blocks: q/k/v/out projections and the FFN's
    up, down (and gate) — the head and the embeddings are not in the blocks."""
    return [item for layer, block in enumerate(model.layers)
            for item in _linears(block, f"layers.{layer}.")]


def _probabilities(core_cache, layer: int) -> np.ndarray:
    """P (B, H, T, S) from the reference core's cache (P grouped as (B, K, G, T, S))."""
    P = getattr(core_cache, "P", None)
    if not isinstance(P, np.ndarray) or P.ndim != 5:
        raise ValueError(f"layers.{layer}.attn: the attention core's cache has no probabilities "
                         f"P (B, K, G, T, S) (got {type(core_cache).__name__}); the instrumented "
                         "forward needs the reference core (attention_impl='numpy')")
    B, K, G, T, S = P.shape
    return P.reshape(B, K * G, T, S)  # query head h = κ·G + g


class _Patches:
    """Instance attributes set for a while and restored afterwards (never on classes)."""

    _MISSING = object()

    def __init__(self) -> None:
        self.saved: list = []

    def set(self, obj, name: str, value) -> None:
        self.saved.append((obj, name, obj.__dict__.get(name, self._MISSING)))
        object.__setattr__(obj, name, value)  # bypass Module.__setattr__'s child registry

    def restore(self) -> None:
        while self.saved:
            obj, name, old = self.saved.pop()
            if old is self._MISSING:
                object.__delattr__(obj, name)
            else:
                object.__setattr__(obj, name, old)


def _wrap_block(block, layer: int, probe: Probe) -> Callable:
    forward, name = block.forward, f"layers.{layer}"

    def block_forward(x, *args, **kwargs):
        if layer == 0:
            x = probe.point("embed", x)  # the embedding output entering block 0
        y, cache = forward(x, *args, **kwargs)
        probe.output(name, y)
        return probe.point(name, y), cache

    return block_forward


def _wrap_norm(norm, name: str, probe: Probe) -> Callable:
    forward = norm.forward

    def norm_forward(*args, **kwargs):
        y, cache = forward(*args, **kwargs)
        probe.output(name, y)
        return y, cache

    return norm_forward


def _wrap_linear(linear: Linear, name: str, probe: Probe) -> Callable:
    forward = linear.forward
    monitored = name.split(".", 2)[-1] in MONITORED_LINEARS

    def linear_forward(x, *args, **kwargs):
        y, cache = forward(probe.point(name, x), *args, **kwargs)
        if monitored:
            probe.output(name, y)
        return y, cache

    return linear_forward


def _wrap_attention(attn: MultiHeadAttention, layer: int, probe: Probe) -> Callable:
    forward, name = attn.forward, f"layers.{layer}.attn"

    def attention_forward(x, *args, **kwargs):
        x = probe.point(name, x)  # the gate's input, shared with q, k, v
        y, cache = forward(x, *args, **kwargs)
        if probe.wants_gates and cache.gate is not None:
            probe.gate(layer, cache.gate.g)  # (B, T, H) σ(x_h · w_h + b_h), the layer's own gates
        return y, cache

    return attention_forward


def _wrap_core(core_forward: Callable, layer: int, probe: Probe) -> Callable:
    def core(*args, **kwargs):
        o, cache = core_forward(*args, **kwargs)
        probe.attention(layer, _probabilities(cache, layer))
        return o, cache

    return core


def _gated_ffn_forward(ffn) -> Callable:
    """The gated FFN's lines through its three Linears (see the module docstring)."""
    name, approximate = _FUSED_GATED[ffn.kind]  # the FFN's own (activation, approximate)

    def activation(g):  # act(g), the first element of the activation's forward pair
        return silu_forward(g)[0] if name == "silu" else gelu_forward(g, approximate)[0]

    def gated_forward(x, *args, **kwargs):
        if args or kwargs:
            raise ValueError(f"the instrumented gated FFN takes x only, got extra arguments "
                             f"{args!r} {sorted(kwargs)}")
        g, gate = ffn.gate.forward(x)  # g = x W_gateᵀ    (B, T, F)
        u, up = ffn.up.forward(x)  # u = x W_upᵀ      (B, T, F)
        h = activation(g) * u  # h = act(g) ⊙ u   (B, T, F)
        y, down = ffn.down.forward(h)  # y = h W_downᵀ    (B, T, C)
        return y, FeedForwardCache((gate, up), None, down)

    return gated_forward


@contextlib.contextmanager
def instrumented(model, probe: Optional[Probe] = None):
    """Within the block, ``model.forward`` (a :func:`readable_copy`) reports to ``probe``.

    Wrappers are set on the copy's instances and removed on exit, also after an error.
    Forward only: the wrapped caches are not meant for a backward.
    """
    check_decoder(model, "the instrumented forward")
    if model.config.attention_impl != "numpy" or model.config.layer_impl != "numpy":
        raise ValueError("instrumented() needs the readable path (attention_impl='numpy', "
                         f"layer_impl='numpy'), got attention_impl={model.config.attention_impl!r}"
                         f", layer_impl={model.config.layer_impl!r}; use readable_copy(model)")
    probe = Probe() if probe is None else probe
    patches = _Patches()
    try:
        for layer, block in enumerate(_blocks_checked(model)):
            prefix = f"layers.{layer}."
            patches.set(block, "forward", _wrap_block(block, layer, probe))
            for name, child in block.named_children():
                if isinstance(child, (LayerNorm, RMSNorm)):
                    patches.set(child, "forward", _wrap_norm(child, prefix + name, probe))
            for name, linear in _linears(block, prefix):
                patches.set(linear, "forward", _wrap_linear(linear, name, probe))
            attn = block.attn
            if "gate_weight" in attn.params:  # attention_gate: the gate reads the input too
                patches.set(attn, "forward", _wrap_attention(attn, layer, probe))
            patches.set(attn, "core", (_wrap_core(attn.core[0], layer, probe), attn.core[1]))
            if block.ffn.kind in _GATED:
                patches.set(block.ffn, "forward", _gated_ffn_forward(block.ffn))
        if hasattr(model, "final_norm"):
            patches.set(model.final_norm, "forward",
                        _wrap_norm(model.final_norm, "final_norm", probe))
        yield model
    finally:
        patches.restore()


def batch_inputs(batches, model, what: str) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """(x, doc_ids) of each batch: a (B, T) integer array of token ids, or a trainer batch
    (x, y) / (x, y, doc_ids) (doc_ids used only by a model with ``document_mask``)."""
    if isinstance(batches, np.ndarray) or not isinstance(batches, (list, tuple)):
        raise ValueError(f"{what} must be a list of batches, each a (B, T) integer array of "
                         "token ids or a trainer batch (x, y[, doc_ids]); got "
                         f"{type(batches).__name__}")
    if not batches:
        raise ValueError(f"{what} is empty; give at least one batch")
    inputs = []
    for i, batch in enumerate(batches):
        doc_ids = None
        if isinstance(batch, (tuple, list)):
            if len(batch) not in (2, 3):
                raise ValueError(f"{what}[{i}] must be (x, y) or (x, y, doc_ids), got a "
                                 f"{type(batch).__name__} of {len(batch)} items")
            if len(batch) == 3 and model.config.document_mask:
                doc_ids = batch[2]
            batch = batch[0]
        if (not isinstance(batch, np.ndarray) or batch.ndim != 2 or 0 in batch.shape
                or not np.issubdtype(batch.dtype, np.integer)):
            raise ValueError(f"{what}[{i}] must be a (B, T) integer array of token ids with B, "
                             f"T ≥ 1, got {getattr(batch, 'dtype', type(batch).__name__)} of "
                             f"shape {getattr(batch, 'shape', None)}")
        inputs.append((batch, doc_ids))
    return inputs
