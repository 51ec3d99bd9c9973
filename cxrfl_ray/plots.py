"""PNG plots of metrics by epoch/round (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_series(path: str | Path, series: dict[str, Sequence[tuple[int, float]]], ylabel: str,
                xlabel: str = "epoch", title: str = "") -> Path:
    """One line per named series of ``(x, y)`` points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
