"""Activation outliers and attention sinks, measured as Bondarenko et al. (NeurIPS 2023) do.

Monitored activations (names as in ``named_parameters``; see :mod:`.instrument`): each
block's output "layers.l" (the residual stream), the attention output projection
"layers.l.attn.out_proj", the FFN output "layers.l.ffn.down", and every norm's output
("layers.l.attn_norm", "layers.l.ffn_norm", … and "final_norm").

For one activation x of one evaluation sequence, flattened over its T positions and C
channels into N = T·C values x₁ … x_N (float64):

    ∞-norm      ‖x‖_∞ = max_i |x_i|
    kurtosis    κ = μ₄ / σ⁴,  μ = (1/N) Σ x_i,  σ² = (1/N) Σ (x_i − μ)²,  μ₄ = (1/N) Σ (x_i − μ)⁴

(non-excess: a Gaussian gives 3, a uniform 1.8, a two-point ±a sample 1; one spike a among
N − 1 zeros gives (N² − 3N + 3)/(N − 1) ≈ N, so large κ means a few values dominate).
Each is computed per sequence and then averaged over the evaluation sequences (every
sequence weighs the same, whatever batch it came in); a module's value is that average.
The model's summaries: ``max_inf_norm`` = the max over modules of the averaged ∞-norms
(with the module that attains it), ``mean_kurtosis`` = the mean over modules of the averaged
kurtoses, and the max ∞-norm over each layer's modules.

Attention, from the probabilities P (B, H, T, S) of each layer (query t sees keys j ≤ t):

    first-token mass   P[t, 0]             the mass on key 0 (0 in a row whose local
                                           window no longer reaches it)
    unassigned mass    1 − Σ_j P[t, j]     0 for softmax; the sink's share for softmax₁ and a
                                           learned sink; the clipped-away share for clipped

each averaged over the query rows t ≥ 1 of a sequence (row 0 sees only key 0, so its
first-token mass is 1 for any softmax), then over sequences: an (L, H) map and its mean.
With ``attention_gate`` also the mean gate value σ(x_h · w_h + b_h) over each sequence's
positions, then over sequences, per (L, H).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from .._validate import check_float
from .instrument import Probe, batch_inputs, instrumented, readable_copy


def _rows(x, name: str) -> np.ndarray:
    """x (B, ...) → (B, N), one row per sequence, x's dtype; refuses empty or non-finite x."""
    x = check_float(x, name)
    if x.ndim < 2 or 0 in x.shape:
        raise ValueError(f"{name} must be (B, T, C) (or any (B, ...)) with no empty axis: one "
                         f"row of values per sequence; got shape {x.shape}")
    return x.reshape(x.shape[0], -1)  # (B, N)


def inf_norm_per_sequence(x: np.ndarray) -> np.ndarray:
    """max |x| over every axis but the first: x (B, T, C) → (B,) float64 (a max is exact in
    x's own dtype)."""
    return np.max(np.abs(_rows(x, "x")), axis=1).astype(np.float64)


def kurtosis_per_sequence(x: np.ndarray) -> np.ndarray:
    """Non-excess kurtosis μ₄/σ⁴ of each sequence's flattened values (central moments in
    float64): x (B, T, C) → (B,). A sequence whose values are all equal (σ = 0) has no
    kurtosis and is refused."""
    rows = _rows(x, "x").astype(np.float64)  # (B, N)
    d = rows - rows.mean(axis=1, keepdims=True)  # x − μ
    d2 = d * d
    m2 = d2.mean(axis=1)  # σ²
    m4 = (d2 * d2).mean(axis=1)  # μ₄
    flat = m2 <= 0  # (B,) every value equal: 0/0
    if flat.any():
        raise ValueError(f"the kurtosis of a sequence of all-equal values is undefined (σ = 0): "
                         f"sequence(s) {np.flatnonzero(flat)[:5].tolist()} of x {x.shape}")
    return m4 / (m2 * m2)


class SequenceMeans:
    """Running sums of per-sequence values, so that the mean weighs every sequence the same
    (a batch of 1 and a batch of 32 sequences count as 1 and 32)."""

    def __init__(self) -> None:
        self.total = None
        self.count = 0

    def add(self, per_sequence: np.ndarray) -> None:
        """per_sequence: (B, ...) one value (or map) per sequence."""
        total = per_sequence.sum(axis=0)
        self.total = total if self.total is None else self.total + total
        self.count += per_sequence.shape[0]

    def mean(self) -> np.ndarray:
        return self.total / self.count


def activation_statistics(activations) -> Dict[str, float]:
    """∞-norm and kurtosis of one module over a list of (B, T, C) activation arrays (one per
    batch), each per sequence then averaged over all sequences:
    ``{"inf_norm": …, "kurtosis": …, "n_sequences": …}``."""
    if not isinstance(activations, (list, tuple)) or not activations:
        raise ValueError("activations must be a non-empty list of (B, T, C) arrays, got "
                         f"{type(activations).__name__} {activations!r:.80}")
    inf_norm, kurtosis = SequenceMeans(), SequenceMeans()
    for x in activations:
        inf_norm.add(inf_norm_per_sequence(x))
        kurtosis.add(kurtosis_per_sequence(x))
    return dict(inf_norm=float(inf_norm.mean()), kurtosis=float(kurtosis.mean()),
                n_sequences=inf_norm.count)


class OutlierProbe(Probe):
    """Collects the per-sequence statistics of every monitored output and the attention maps."""

    def __init__(self, n_layers: int, n_heads: int, gated: bool) -> None:
        self.inf_norm: Dict[str, SequenceMeans] = {}
        self.kurtosis: Dict[str, SequenceMeans] = {}
        self.first_token = [SequenceMeans() for _ in range(n_layers)]  # each (H,)
        self.unassigned = [SequenceMeans() for _ in range(n_layers)]
        self.gates = [SequenceMeans() for _ in range(n_layers)] if gated else None
        self.wants_gates = gated

    def output(self, name: str, y: np.ndarray) -> None:
        if name not in self.inf_norm:
            self.inf_norm[name], self.kurtosis[name] = SequenceMeans(), SequenceMeans()
        self.inf_norm[name].add(inf_norm_per_sequence(y))
        try:
            self.kurtosis[name].add(kurtosis_per_sequence(y))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None

    def attention(self, layer: int, P: np.ndarray) -> None:
        B, H, T, S = P.shape
        if T < 2:
            raise ValueError(f"the attention masses average over query rows t ≥ 1, so the "
                             f"evaluation sequences need T ≥ 2 tokens, got T = {T}")
        rows = P[:, :, 1:, :].astype(np.float64)  # (B, H, T−1, S) query rows t ≥ 1
        self.first_token[layer].add(rows[..., 0].mean(axis=2))  # (B, H)
        self.unassigned[layer].add((1.0 - rows.sum(axis=3)).mean(axis=2))  # (B, H)

    def gate(self, layer: int, g: np.ndarray) -> None:
        self.gates[layer].add(g.mean(axis=1))  # (B, T, H) → (B, H)


def _map(means: List[SequenceMeans]) -> np.ndarray:
    return np.stack([m.mean() for m in means])  # (L, H)


def outlier_metrics(model, batches) -> dict:
    """The outlier and attention metrics of ``model`` (a decoder-only npformer model, left
    unchanged) over evaluation ``batches`` (a list of (B, T) integer token arrays, or trainer
    batches (x, y[, doc_ids])), as JSON-serialisable floats and lists:

    per_module {name: {inf_norm, kurtosis}}, max_inf_norm, max_inf_norm_module,
    mean_kurtosis, per_layer_max_inf_norm [L], first_token_mass [L][H] and
    first_token_mass_mean, unassigned_mass [L][H] and unassigned_mass_mean, with
    ``attention_gate`` also gate_mean [L][H] and gate_mean_mean; n_sequences.
    """
    copy = readable_copy(model)
    inputs = batch_inputs(batches, copy, "batches")
    config = copy.config
    gated = "gate_weight" in copy.layers[0].attn.params
    probe = OutlierProbe(config.n_layers, config.n_heads, gated)
    with instrumented(copy, probe):
        for x, doc_ids in inputs:
            copy.forward(x, doc_ids=doc_ids)
            copy._last_cache = None  # no backward: free the activations
    names = list(probe.inf_norm)
    per_module = {name: dict(inf_norm=float(probe.inf_norm[name].mean()),
                             kurtosis=float(probe.kurtosis[name].mean())) for name in names}
    worst = max(names, key=lambda name: per_module[name]["inf_norm"])
    per_layer = []
    for layer in range(config.n_layers):
        own = [per_module[n]["inf_norm"] for n in names
               if n == f"layers.{layer}" or n.startswith(f"layers.{layer}.")]
        per_layer.append(max(own))
    first_token, unassigned = _map(probe.first_token), _map(probe.unassigned)
    result = dict(
        per_module=per_module,
        max_inf_norm=per_module[worst]["inf_norm"],
        max_inf_norm_module=worst,
        mean_kurtosis=float(np.mean([per_module[n]["kurtosis"] for n in names])),
        per_layer_max_inf_norm=per_layer,
        first_token_mass=first_token.tolist(),
        first_token_mass_mean=float(first_token.mean()),
        unassigned_mass=unassigned.tolist(),
        unassigned_mass_mean=float(unassigned.mean()),
        n_sequences=probe.inf_norm[worst].count,
    )
    if gated:
        gates = _map(probe.gates)
        result.update(gate_mean=gates.tolist(), gate_mean_mean=float(gates.mean()))
    return result
