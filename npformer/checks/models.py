"""Whole-model gradient checks: every parameter tensor of a tiny instance of a preset.

``npformer gradcheck --preset NAME`` runs :func:`check_preset`: a tiny float64 instance of
the preset with every feature kept (its norms, block layout, FFN, positions, attention
pattern, head sharing, dropout) and every parameter set to unusual random values, the loss
``L = mean cross-entropy(model(ids), targets)``, and central finite differences of L against
the gradients that ``model.backward`` accumulated — for every parameter tensor, plus the
input embedding path (decoders: the gradient with respect to the token vectors, fed back
through ``inputs_embeds``).

Dropout stays on where the preset has it: the dropout generator is reset before every
forward, so each finite-difference evaluation draws the very masks of the analytic pass.
Llama 3 gets packed documents (``doc_ids``) so that the document mask is inside the check.
These checks are not in the default registry (``npformer gradcheck`` runs the layer checks);
they take seconds each.
"""

from __future__ import annotations

from typing import List

import numpy as np

from ..functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..gradcheck import TensorReport, check_gradients
from ..models import build_model
from ..presets import get_preset, preset_names, tiny_config
from .modules import randomize_parameters

MODEL_MAX_ENTRIES = 24  # entries per tensor (all of them for smaller tensors)
DROPOUT_SEED = 1234


def _inputs(config, rng):
    """Token ids, targets and (for a document-masked preset) doc ids of a batch (B=2, T=7)."""
    B, T = 2, 7
    inputs = dict(ids=rng.integers(0, config.vocab_size, (B, T)))
    if config.architecture == "encoder-decoder":
        inputs = dict(src_ids=rng.integers(0, config.vocab_size, (B, 5)),
                      tgt_ids=inputs["ids"])
    if config.document_mask:
        # row 0: three documents (one a single token); row 1: two
        inputs["doc_ids"] = np.array([[0, 0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 6, 6, 6]])
    targets = rng.integers(0, config.vocab_size, (B, T))
    return inputs, targets


def randomize_model(model, rng) -> None:
    """Unusual values everywhere: matrices and biases N(0.05, 0.3²), norm gains N(1, 0.25²)
    (with Gemma's unit offset the stored w is the gain − 1: N(0, 0.25²)).

    Norm gains stay near 1: gains near 0 would shrink every normalised activation and with it
    the attention scores, leaving q/k gradients so small (~1e-6) that finite differences
    measure rounding noise instead of the gradient."""
    randomize_parameters(model, rng, scale=0.3)
    gain = 0.0 if model.config.norm_unit_offset else 1.0
    for name, value in model.named_parameters():
        if name.endswith("norm.weight"):
            value[...] = gain + 0.25 * rng.standard_normal(value.shape)


def check_preset(name: str, seed: int = 0, max_entries: int = MODEL_MAX_ENTRIES) -> List[TensorReport]:
    """Finite differences for every parameter of a tiny ``name`` model (and its input path)."""
    get_preset(name)  # unknown names raise, listing the valid ones
    return check_config(tiny_config(name), f"preset:{name}", seed, max_entries)


def check_config(config, label: str, seed: int = 0,
                 max_entries: int = MODEL_MAX_ENTRIES) -> List[TensorReport]:
    """:func:`check_preset` for any (tiny, float64) config; reports are named ``label``."""
    model = build_model(config, seed=seed).train()
    rng = np.random.default_rng(seed)
    randomize_model(model, rng)
    inputs, targets = _inputs(config, rng)

    def loss_and_grads(**extra):
        model.dropout_rng = np.random.default_rng(DROPOUT_SEED)
        logits = model.forward(**{**inputs, **extra})
        loss, ce_cache = cross_entropy_forward(logits, targets)
        return float(loss), ce_cache

    _, ce_cache = loss_and_grads()
    model.zero_grad()
    model.backward(cross_entropy_backward(1.0, ce_cache))
    reports = check_gradients(label, lambda: loss_and_grads()[0], model.parameters(),
                              model.gradients(), max_entries=max_entries, seed=seed)

    if config.architecture == "decoder":
        # the input embedding path: L as a function of the token vectors e = W_tok[ids]
        token_vectors = model.parameters()["embed.tokens.weight"][inputs["ids"]]  # (B, T, C)
        rest = {k: v for k, v in inputs.items() if k != "ids"}

        def embeds_loss():
            model.dropout_rng = np.random.default_rng(DROPOUT_SEED)
            logits = model.forward(inputs_embeds=token_vectors, **rest)
            return float(cross_entropy_forward(logits, targets)[0])

        model.dropout_rng = np.random.default_rng(DROPOUT_SEED)
        logits = model.forward(inputs_embeds=token_vectors, **rest)
        d_tokens = model.backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, targets)[1]))
        reports += check_gradients(label, embeds_loss, {"input token vectors": token_vectors},
                                   {"input token vectors": d_tokens}, max_entries=max_entries, seed=seed)
    return reports


def check_presets(names=None) -> List[TensorReport]:
    """:func:`check_preset` for each name (all presets when None)."""
    reports: List[TensorReport] = []
    for name in preset_names() if names is None else names:
        reports += check_preset(name)
    return reports
