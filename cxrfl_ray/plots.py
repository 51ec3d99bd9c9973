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
    return save_figure(fig, ax, path, title)


def save_figure(fig, ax, path: str | Path, title: str = "") -> Path:
    """Title, grid and legend on ``ax``; the figure written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_heatmap(path: str | Path, values, rows: Sequence, cols: Sequence, row_label: str, col_label: str,
                 title: str = "") -> Path:
    """A grid of values (NaN where a cell has no trial), each cell written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.2 + 0.7 * len(rows)), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_main_effects(path: str | Path, effects: dict[str, "object"], ylabel: str, title: str = "") -> Path:
    """One panel per parameter: the mean of the target at each of its values, with the 95%
    interval as error bars where there is one (``effects``: name -> frame of value, mean, low, high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(effects), figsize=(3.2 * len(effects), 3.2), dpi=100, sharey=True, squeeze=False)
    for ax, (name, table) in zip(axes[0], effects.items()):
        x = np.arange(len(table))
        mean = table["mean"].to_numpy(dtype=float)
        err = np.vstack([mean - table["low"].to_numpy(dtype=float), table["high"].to_numpy(dtype=float) - mean])
        if np.isfinite(err).all():
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=4)
        else:
            ax.plot(x, mean, marker="o")
        ax.set_xticks(x, [str(v)[:18] for v in table["value"]], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
