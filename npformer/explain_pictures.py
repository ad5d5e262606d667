"""The pictures of ``npformer explain NAME --png DIR`` (matplotlib, Agg backend).

- every name: its check's analytic gradient against the finite difference, entry by entry
  (on the diagonal when they agree), and the size of each difference;
- softmax-related names: the softmax Jacobian J = diag(p) − p pᵀ of one row of logits as a
  heat map beside p itself;
- attention-related names (and the lineage pages): the attention mask of every preset in
  a grid — causal, the banded window of GPT-3 / GPT-Neo's local layers, Llama 3's
  documents, the encoder-decoder's three attentions — and which key/value head each query
  head reads under multi-query (PaLM) and grouped-query (Llama 2/3) attention;
- RoPE names: one vector rotated to every position, pair by pair (each pair turns on its
  own circle at its own frequency θᵢ), and the rotated components as a heat map.

Each picture is a PNG in DIR named ``<NAME>_<picture>.png``; :func:`write_pictures`
returns their paths.
"""

from __future__ import annotations

import os
from typing import List

import numpy as np

from ._plotting import pyplot, save_png

SOFTMAX_PAGES = ("functional/softmax", "functional/cross_entropy", "functional/softmax_variants")
SOFTMAX_NAMES = ("fused_cross_entropy",)
ATTENTION_PAGES = ("functional/attention", "functional/attention_mask", "kernels/flash_attention",
                   "blocks/cross_attention", "models/decoder", "models/encoder_decoder")
ATTENTION_NAMES = ("qk_norm",)
ROPE_PAGES = ("functional/rope",)
ROPE_NAMES = ("fused_rope",)


def pictures_for(subject) -> List[str]:
    """The pictures drawn for a subject (npformer.explain.Subject), in order."""
    kinds = ["gradients"]
    if subject.page in SOFTMAX_PAGES or subject.run in SOFTMAX_NAMES:
        kinds.append("softmax_jacobian")
    if (subject.page in ATTENTION_PAGES or subject.page.startswith("lineage/")
            or subject.run in ATTENTION_NAMES or subject.run.startswith(("attention_", "kernel_"))):
        kinds.append("attention_masks")
    if subject.page in ROPE_PAGES or subject.run in ROPE_NAMES:
        kinds.append("rope_rotation")
    return kinds


def write_pictures(subject, run, out_dir: str) -> List[str]:
    """Draw the subject's pictures into ``out_dir`` (created); return the PNG paths."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--png {out_dir} is a file, not a directory to write pictures into")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind in pictures_for(subject):
        path = os.path.join(out_dir, f"{subject.name}_{kind}.png")
        if kind == "gradients":
            paths.append(gradient_scatter(run, path))
        elif kind == "softmax_jacobian":
            paths.append(softmax_jacobian_heatmap(path))
        elif kind == "attention_masks":
            paths.append(preset_attention_masks(path))
        else:
            paths.append(rope_rotation(subject.run, path))
    return paths


def gradient_scatter(run, path: str) -> str:
    """Analytic against numeric gradient, every compared entry of every tensor (colour =
    tensor), and |analytic − numeric| per entry on a log scale."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=90)
    n_tensors = len(run.entries)
    colours = plt.get_cmap("viridis")
    offset = 0
    for index, entries in enumerate(run.entries):
        colour = colours(index / max(n_tensors - 1, 1))
        left.scatter(entries.numeric, entries.analytic, s=10, color=colour)
        difference = np.maximum(np.abs(entries.analytic - entries.numeric), 1e-18)
        right.scatter(offset + np.arange(len(difference)), difference, s=8, color=colour)
        offset += len(difference)
    values = np.concatenate([np.r_[e.analytic, e.numeric] for e in run.entries] or [np.zeros(1)])
    low, high = float(values.min()), float(values.max())
    left.plot([low, high], [low, high], "k--", lw=0.8, label="analytic = numeric")
    left.set_xlabel("finite difference (L(θ+h) − L(θ−h)) / 2h")
    left.set_ylabel("analytic gradient (the backward)")
    left.set_title("every compared entry")
    left.legend(loc="upper left")
    right.set_yscale("log")
    right.set_xlabel("compared entry (tensors one after another)")
    right.set_ylabel("|analytic − numeric|  (an exact 0 drawn at 1e-18)")
    worst = max((r.max_rel_err for r in run.reports), default=0.0)
    right.set_title(f"differences (worst max rel err {worst:.1e})")
    mappable = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, max(n_tensors - 1, 1)))
    bar = figure.colorbar(mappable, ax=right)
    bar.set_label("tensor number (order of the table)")
    figure.suptitle(run.title.split(" (")[0], fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


def softmax_jacobian_heatmap(path: str) -> str:
    """p = softmax(z) of one row of 8 logits, and J = diag(p) − p pᵀ as a heat map."""
    from .functional.softmax import softmax_forward, softmax_jacobian

    plt = pyplot()
    z = np.array([1.8, -0.4, 0.9, 2.6, -1.5, 0.2, 1.1, -0.7])  # (V,) one row of logits
    p, _ = softmax_forward(z)
    J = softmax_jacobian(p)  # (V, V)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=90,
                                         gridspec_kw=dict(width_ratios=[1, 1.25]))
    left.bar(np.arange(len(p)), p, color="tab:blue")
    left.set_xlabel("class i")
    left.set_ylabel("pᵢ = softmax(z)ᵢ")
    left.set_title("z = " + ", ".join(f"{v:g}" for v in z), fontsize=9)
    limit = float(np.max(np.abs(J)))
    image = right.imshow(J, cmap="RdBu_r", vmin=-limit, vmax=limit)
    right.set_xlabel("logit j")
    right.set_ylabel("probability i")
    right.set_title("J = ∂p/∂z = diag(p) − p pᵀ  (rows sum to 0)")
    bar = figure.colorbar(image, ax=right)
    bar.set_label("∂pᵢ/∂zⱼ = pᵢ([i = j] − pⱼ)")
    figure.suptitle("The softmax Jacobian; the backward p ⊙ (dp − ⟨dp, p⟩) never builds it",
                    fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


def _preset_panels(T: int = 12):
    """(title, image, x label, y label) for every preset's attention masks and head groups."""
    from .functional.attention_mask import attention_mask
    from .presets import preset_config, preset_names

    drawn_window = 4
    documents = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]])[:, :T]  # (1, T)
    panels = []
    for name in preset_names():
        config = preset_config(name)
        if config.architecture == "encoder-decoder":
            S = 8
            panels.append((f"{name}\nencoder self-attention", attention_mask(1, S, S)[0, 0], "key j", "query i"))
            panels.append((f"{name}\ndecoder self-attention, causal",
                           attention_mask(1, T, T, causal=True)[0, 0], "key j", "query i"))
            panels.append((f"{name}\ncross-attention: every source key",
                           attention_mask(1, T, S)[0, 0], "source key j", "target query i"))
            continue
        for kind in dict.fromkeys(config.attention_pattern):
            if kind == "local":
                mask = attention_mask(1, T, T, causal=True, window=drawn_window)[0, 0]
                title = f"{name}\nlocal layer: window {config.window} (drawn {drawn_window})"
            elif config.document_mask:
                mask = attention_mask(1, T, T, causal=True, doc_ids=documents)[0, 0]
                title = f"{name}\ncausal within documents 0 | 1 | 2"
            else:
                mask = attention_mask(1, T, T, causal=True)[0, 0]
                title = f"{name}\ncausal" + (", dense layer" if len(config.attention_pattern) > 1 else "")
            panels.append((title, mask, "key j", "query i"))
        if config.kv_heads != config.n_heads:
            H, K = config.n_heads, config.kv_heads
            groups = (np.arange(H)[:, None] // (H // K)) == np.arange(K)[None, :]  # (H, K)
            kind = "multi-query" if K == 1 else f"grouped-query, G = {H // K}"
            panels.append((f"{name}\n{kind}: {H} query heads, {K} kv", groups,
                           "key/value head", "query head"))
    return panels


def preset_attention_masks(path: str) -> str:
    """Every preset's attention masks (white = may attend) and head groups, in one grid."""
    plt = pyplot()
    panels = _preset_panels()
    columns = 5
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.4 * rows), dpi=70,
                                layout="constrained")
    axes = np.atleast_2d(axes)
    image = None
    for ax, (title, mask, xlabel, ylabel) in zip(axes.flat, panels):
        image = ax.imshow(mask.astype(float), cmap="gray", vmin=0, vmax=1, aspect="auto")
        ax.set_title(title, fontsize=9)
        for side in ax.spines.values():  # a frame, so an all-white mask still shows its size
            side.set_edgecolor("tab:blue")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=6)
        if xlabel == "key/value head":  # whole heads, not positions
            ax.set_xticks(range(mask.shape[1]))
            ax.set_yticks(range(mask.shape[0]))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    bar = figure.colorbar(image, ax=list(axes.flat), shrink=0.6)
    bar.set_label("1 = may attend (score kept), 0 = masked (score −∞)")
    figure.suptitle("Attention masks of every preset (T = 12) and which K/V head each query "
                    "head reads", fontsize=11)
    return save_png(figure, path)


def rope_rotation(check: str, path: str) -> str:
    """One vector x (D = 8) rotated by RoPE to positions m = 0 … M−1: each channel pair on
    its circle, coloured by m, and the rotated components against m."""
    from .checks.positions import SCALINGS
    from .functional.rope import rope_forward, rope_frequencies

    plt = pyplot()
    D = 8
    layout = "interleaved" if check == "rope_interleaved" else "half"
    scaling = SCALINGS.get(check)
    theta, M = (500.0, 151) if scaling is not None else (10000.0, 64)
    x = np.array([1.0, 0.6, -0.4, 0.8, 0.3, -0.9, 0.7, 0.5])  # (D,) one query or key
    positions = np.arange(M)
    y, _ = rope_forward(np.broadcast_to(x, (M, D)).copy(), positions, theta=theta, layout=layout,
                        scaling=scaling)  # (M, D): row m is R_m x
    inv_freq, factor = rope_frequencies(D, theta, scaling, M)  # θᵢ and the attention factor A
    pairs = [(i, i + D // 2) if layout == "half" else (2 * i, 2 * i + 1) for i in range(D // 2)]
    figure, axes = plt.subplots(1, D // 2 + 1, figsize=(4.2 * (D // 2 + 1), 4.2), dpi=70)
    for i, (a, b) in enumerate(pairs):
        ax = axes[i]
        points = ax.scatter(y[:, a], y[:, b], c=positions, cmap="plasma", s=12)
        radius = np.hypot(x[a], x[b])
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(radius * np.cos(circle), radius * np.sin(circle), color="0.8", lw=0.8, zorder=0)
        ax.set_aspect("equal")
        ax.set_xlabel(f"channel {a}")
        ax.set_ylabel(f"channel {b}")
        ax.set_title(f"pair {i}: θ{i} = {inv_freq[i]:.3g} rad / position", fontsize=9)
    figure.colorbar(points, ax=axes[D // 2 - 1]).set_label("position m")
    heat = axes[-1].imshow(y.T, aspect="auto", cmap="RdBu_r", interpolation="nearest")
    axes[-1].set_xlabel("position m")
    axes[-1].set_ylabel("channel of R_m x")
    axes[-1].set_title("the rotated vector at every position", fontsize=9)
    figure.colorbar(heat, ax=axes[-1]).set_label("value")
    what = f"{check}, {scaling.rope_type} scaling, theta = {theta:g}" if scaling else \
        f"{layout} layout, theta = {theta:g}"
    kept = ("|pair| is kept, so only angles change" if factor == 1.0 else
            f"every pair also scaled by the attention factor A = {factor:.4g} (grey: |pair| of x)")
    figure.suptitle(f"RoPE: x rotated by m·θᵢ in each pair ({what}); {kept}", fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)
