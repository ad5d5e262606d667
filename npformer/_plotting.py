"""Matplotlib without a display, and PNGs written whole (the figures of explain and tour)."""

from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str) -> str:
    """The figure as a PNG at ``path``: rendered in memory, written atomically (a killed run
    leaves the old file or the new one, never half of one); the figure is closed."""
    from .checkpoint import write_atomically

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot().close(figure)
    write_atomically(path, [buffer.getvalue()])
    return path


def save_png_if(figure, path: str, drawn: bool) -> bool:
    """Save the figure if anything was ``drawn`` on it, else just close it; returns drawn."""
    if drawn:
        save_png(figure, path)
    else:
        pyplot().close(figure)
    return drawn
