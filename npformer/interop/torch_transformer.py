"""``torch.nn.Transformer`` state dicts ↔ the ``transformer-2017`` :class:`EncoderDecoder`.

torch's module holds the two stacks only (no embeddings, no positions, no output layer), so
the mapping covers exactly those; the arrays are NumPy (``{k: v.numpy() for k, v in
module.state_dict().items()}``), so no torch is needed here.

Layouts and names:

    self_attn.in_proj_weight (3C, C)    rows [W_q; W_k; W_v]   ↔ attn.{q,k,v}_proj.weight
    self_attn.out_proj                                         ↔ attn.out_proj
    multihead_attn.*  (decoder)                                ↔ cross_attn.*
    linear1 / linear2                                          ↔ ffn.up / ffn.down
    encoder: norm1, norm2                                      ↔ attn_norm, ffn_norm
    decoder: norm1, norm2, norm3                               ↔ attn_norm, cross_norm, ffn_norm
    encoder.norm / decoder.norm                                ↔ encoder_norm / decoder_norm

The paper's model has no final norm after either stack; ``torch.nn.Transformer`` adds one to
each. A config with ``final_norm=True`` has them (and expects them in the state dict);
``final_norm=False`` matches a torch model whose ``encoder.norm`` and ``decoder.norm`` are
None.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ..models.encoder_decoder import EncoderDecoder


def _pairs(model: EncoderDecoder) -> List[Tuple[str, Tuple[str, ...]]]:
    """(torch name, our names): one our-name, or three for a fused in_proj."""
    pairs: List[Tuple[str, Tuple[str, ...]]] = []
    params = model.parameters()

    def attention(torch_prefix: str, ours: str) -> None:
        pairs.append((f"{torch_prefix}.in_proj_weight", tuple(f"{ours}.{p}_proj.weight" for p in "qkv")))
        pairs.append((f"{torch_prefix}.in_proj_bias", tuple(f"{ours}.{p}_proj.bias" for p in "qkv")))
        pairs.append((f"{torch_prefix}.out_proj.weight", (f"{ours}.out_proj.weight",)))
        pairs.append((f"{torch_prefix}.out_proj.bias", (f"{ours}.out_proj.bias",)))

    def plain(torch_name: str, ours: str) -> None:
        for what in ("weight", "bias"):
            pairs.append((f"{torch_name}.{what}", (f"{ours}.{what}",)))

    for stack, norms in (("encoder", ("attn_norm", "ffn_norm")),
                         ("decoder", ("attn_norm", "cross_norm", "ffn_norm"))):
        for l in range(len(getattr(model, stack))):
            t, o = f"{stack}.layers.{l}", f"{stack}.{l}"
            attention(f"{t}.self_attn", f"{o}.attn")
            if stack == "decoder":
                attention(f"{t}.multihead_attn", f"{o}.cross_attn")
            plain(f"{t}.linear1", f"{o}.ffn.up")
            plain(f"{t}.linear2", f"{o}.ffn.down")
            for index, norm in enumerate(norms, start=1):
                plain(f"{t}.norm{index}", f"{o}.{norm}")
        if model.config.final_norm:
            plain(f"{stack}.norm", f"{stack}_norm")
    missing = [ours for _, names in pairs for ours in names if ours not in params]
    if missing:
        raise ValueError(f"torch.nn.Transformer has biases and LayerNorms everywhere; this model "
                         f"lacks {missing[:4]} (check qkv_bias, out_bias, ffn_bias, norm, norm_bias)")
    return pairs


def torch_transformer_state_dict(model: EncoderDecoder, grads: bool = False) -> Dict[str, np.ndarray]:
    """The stacks' parameters (or gradients) under ``torch.nn.Transformer`` names."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError(f"expected an EncoderDecoder, got {type(model).__name__}")
    tensors = model.gradients() if grads else model.parameters()
    return {name: np.concatenate([tensors[o] for o in ours]) if len(ours) == 3 else tensors[ours[0]].copy()
            for name, ours in _pairs(model)}


def load_torch_transformer_state_dict(model: EncoderDecoder, state: Dict[str, np.ndarray]) -> None:
    """Copy a ``torch.nn.Transformer`` state dict (NumPy arrays) into ``model``'s stacks.

    The embeddings and the output layer are not part of torch's module and stay as they are.
    Missing, extra and mis-shaped tensors raise a ``ValueError`` naming the tensor."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError(f"expected an EncoderDecoder, got {type(model).__name__}")
    pairs = _pairs(model)
    expected = {name for name, _ in pairs}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise ValueError(f"state dict lacks {missing[:6]} (final_norm={model.config.final_norm}: "
                         "torch.nn.Transformer's encoder.norm/decoder.norm are expected exactly "
                         "when it is True)")
    if extra:
        raise ValueError(f"state dict has tensors this model does not: {extra[:6]} "
                         f"(final_norm={model.config.final_norm}, {len(model.encoder)} encoder and "
                         f"{len(model.decoder)} decoder layers)")
    params = model.parameters()
    for name, ours in pairs:  # every shape first, so a mismatch leaves the model untouched
        value = np.asarray(state[name])
        want = (sum(params[o].shape[0] for o in ours),) + params[ours[0]].shape[1:]
        if value.shape != want:
            raise ValueError(f"tensor {name!r} has shape {value.shape}, but the config needs {want}")
    for name, ours in pairs:
        value = np.asarray(state[name])
        parts = np.split(value, np.cumsum([params[o].shape[0] for o in ours])[:-1]) if len(ours) == 3 else [value]
        for o, part in zip(ours, parts):
            params[o][...] = part.astype(params[o].dtype)
