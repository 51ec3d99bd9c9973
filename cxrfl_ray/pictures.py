"""Pictures of a run's predictions, drawn from its best checkpoint: lung outlines on seeded test
images (segmentation, ``overlays.png``), the confusion matrix and one-vs-rest ROC curves
(classification, ``confusion.png``, ``roc.png``).

A metric alone does not show *how* a model fails (a missed lung apex, a leak into the heart, one
class always taken for another); a look at the worst cases does. Every number printed on a
picture comes from the task's own ``collect``/``summarise``, so a picture never disagrees with
``metrics.parquet``. Pictures stay small (a low dpi; at most ``MAX_PANELS`` images, shown at no
more than ``MAX_SIDE`` pixels in ``GREY_LEVELS``) and cheap (one model pass over
``tracking.pictures`` images; classification one pass over the test split; about 0.1-0.3 s a run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrfl_ray.experiment import Prepared
from cxrfl_ray.tasks import segmentation

log = logging.getLogger("cxrfl.pictures")

# Pixels a side of an image as drawn (up to 8 panels), its grey levels, and the most panels of a
# figure: enough to see an outline, and even pure noise stays under 300 KB a figure (265 KB at 16
# panels; the PNG is RGBA, and 8 panels at 128 px and 256 levels were 440 KB).
MAX_SIDE, GREY_LEVELS, MAX_PANELS = 112, 64, 16
DPI = 72


@dataclass(frozen=True)
class Panel:
    """One drawn image: ``jaccard`` is None where mask and prediction are both empty (not scored,
    as in ``summarise``), or where there is no ground truth."""

    id: str
    jaccard: float | None
    image: np.ndarray
    pred: np.ndarray
    truth: np.ndarray | None = None


def choose(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``rows`` drawn from ``seed`` (all of them if there are no more), sorted: the same
    config always draws the same images."""
    rows = np.asarray(rows)
    if rows.size <= n:
        return np.sort(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def image_jaccard(out: dict[str, np.ndarray], i: int) -> float | None:
    """Image ``i``'s Jaccard exactly as ``summarise`` scores it (None: nothing to score)."""
    if out["tp"][i] + out["fp"][i] + out["fn"][i] == 0:
        return None
    return segmentation.summarise({k: v[i:i + 1] for k, v in out.items()})["jaccard"]


def overlay_panels(ids: Sequence[str], images: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray] | None = None,
                   out: dict[str, np.ndarray] | None = None) -> list[Panel]:
    """Panels in drawn order: with ``out`` (``segmentation.collect``'s per-image counts of the
    same images) the worst Jaccard first and the unscored last; without, in input order."""
    panels = [Panel(str(i), image_jaccard(out, k) if out is not None else None, im, p,
                    None if truths is None else truths[k])
              for k, (i, im, p) in enumerate(zip(ids, images, preds))]
    if out is None:
        return panels
    order = sorted(range(len(panels)), key=lambda k: (panels[k].jaccard is None, panels[k].jaccard or 0.0, k))
    return [panels[k] for k in order]


class _Keep(nn.Module):
    """The model, keeping its outputs: ``collect`` scores the images and the same logits are
    drawn, in one pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        self.outputs.append(y.detach().float().cpu())
        return y


def segmentation_panels(model: nn.Module, images, device, batch_size: int = 32) -> list[Panel]:
    """Panels of a ``ClientImages`` of the segmentation task (image, mask), scored by ``collect``."""
    batches = list(DataLoader(images, batch_size=batch_size, num_workers=0))
    keep = _Keep(model)
    # collect's per-image loss is not drawn: BCE spares importing smp for the task's Dice.
    out = segmentation.collect(keep, batches, device, nn.BCEWithLogitsLoss())
    if not batches:
        return []
    x = torch.cat([b[0] for b in batches])[:, 0].numpy()
    truth = torch.cat([b[1] for b in batches])[:, 0].numpy() > 0.5
    pred = torch.cat(keep.outputs)[:, 0].numpy() > 0  # collect's threshold: sigmoid(logit) > 0.5
    ids = images.rows.column("id").to_pylist()
    return overlay_panels(ids, x, pred, truth, out)


def fit(a: np.ndarray, side: int) -> np.ndarray:
    """Nearest-pixel resize so the longer side is ``side`` (a mask stays a mask)."""
    h, w = a.shape[:2]
    scale = side / max(h, w)
    ri = np.minimum((np.arange(max(1, round(h * scale))) / scale).astype(int), h - 1)
    ci = np.minimum((np.arange(max(1, round(w * scale))) / scale).astype(int), w - 1)
    return np.asarray(a)[np.ix_(ri, ci)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels, two pixels wide (inside and outside the edge)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    outer = m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
    return outer & ~inner


COLOURS = {"truth": (0.0, 1.0, 0.0), "pred": (1.0, 0.0, 0.0), "both": (1.0, 1.0, 0.0)}


def panel_rgb(panel: Panel, side: int = MAX_SIDE) -> np.ndarray:
    """The panel as a ``side`` x ``side`` RGB array: the image in grey (its own range, as imshow
    scales it, in ``GREY_LEVELS``), the true outline green, the predicted red, yellow where they
    meet. Drawn as pixels rather than matplotlib contours: eight contour plots cost more than the
    rest of a run's end."""
    image = fit(np.asarray(panel.image, dtype=np.float32), side)
    lo, hi = float(image.min()), float(image.max())
    grey = np.round((image - lo) / (hi - lo) * (GREY_LEVELS - 1)) / (GREY_LEVELS - 1) if hi > lo \
        else np.zeros_like(image)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    pred = _outline(fit(panel.pred, side))
    truth = _outline(fit(panel.truth, side)) if panel.truth is not None else np.zeros_like(pred)
    for where, colour in ((truth & ~pred, "truth"), (pred & ~truth, "pred"), (pred & truth, "both")):
        rgb[where] = COLOURS[colour]
    cell = np.ones((side, side, 3), dtype=np.float32)
    left = (side - rgb.shape[1]) // 2  # a wide image sits under its title, centred
    cell[:rgb.shape[0], left:left + rgb.shape[1]] = rgb
    return cell


def pyplot():
    """matplotlib's pyplot, headless; None (said once per call) where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log.warning("pictures skipped: matplotlib is not available (%s); pip install matplotlib", exc)
        return None
    return plt


def panel_side(n: int) -> int:
    """Pixels a side of each of ``n`` panels: eight at ``MAX_SIDE``, more ones smaller (at least
    32), so a figure's pixels, and its bytes, stay about the same whatever ``n`` (up to ``MAX_PANELS``)."""
    return max(32, min(MAX_SIDE, int(MAX_SIDE * (8 / max(n, 1)) ** 0.5)))


def draw_overlays(path: str | Path, panels: Sequence[Panel], title: str = "") -> Path:
    """A grid of the panels (``panel_rgb``), each titled with its id and, where there is ground
    truth, its Jaccard; one image on one axes, so a figure of many panels costs about what one does."""
    plt = pyplot()
    side = panel_side(len(panels))
    cols = min(4, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    key = "green: ground truth, red: prediction, yellow: both" if any(p.truth is not None for p in panels) \
        else "red: prediction"
    heading = f"{title}\n{key}" if title else key
    pad, band, head = 4, 26, 8 + 12 * (heading.count("\n") + 1)  # pixels: between cells, titles
    width, height = cols * (side + pad) + pad, head + rows * (side + band)
    grid = np.ones((height, width, 3), dtype=np.float32)
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    for k, p in enumerate(panels):
        r, c = divmod(k, cols)
        y, x = head + r * (side + band) + band, pad + c * (side + pad)
        grid[y:y + side, x:x + side] = panel_rgb(p, side)
        label = p.id if len(p.id) <= 24 else "..." + p.id[-21:]
        if p.truth is not None:
            label += "\nJaccard " + ("n/a" if p.jaccard is None else f"{p.jaccard:.3f}")
        fig.text((x + side / 2) / width, 1 - (y - 2) / height, label, ha="center", va="bottom", fontsize=6.5)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.text(0.5, 1 - 3 / height, heading, ha="center", va="top", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion_counts(out: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Counts of (true class, predicted class) from ``classification.collect``'s outputs, as the
    task's ``cm_i_j`` metrics count them."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(out["targets"], out["probs"].argmax(axis=1), labels=list(range(k)))


def roc_curves(out: dict[str, np.ndarray], k: int) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ``(fpr, tpr, auc)`` per class; a class absent from the targets (or the only
    one present) has no curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = {}
    for c in range(k):
        positive = out["targets"] == c
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, out["probs"][:, c])
            curves[c] = (fpr, tpr, float(roc_auc_score(positive, out["probs"][:, c])))
    return curves


def draw_confusion(path: str | Path, counts: np.ndarray, names: Sequence[str], title: str = "") -> Path:
    """Two panels: counts, and each true class's row as shares (what recall per class looks like)."""
    plt = pyplot()
    counts = np.asarray(counts)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig, axes = plt.subplots(1, 2, figsize=(6.8, 3.4), dpi=DPI)
    short = [n if len(n) <= 14 else n[:12] + ".." for n in names]
    for ax, values, fmt, name in ((axes[0], counts, "{:.0f}", "counts"), (axes[1], shares, "{:.2f}", "row shares")):
        ax.imshow(values, cmap="Blues", vmin=0)
        top = values.max() if values.size else 0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if top and values[i, j] > top / 2 else "black")
        ax.set_xticks(range(len(short)), short, fontsize=7, rotation=20, ha="right")
        ax.set_yticks(range(len(short)), short, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.18, right=0.98, bottom=0.2, top=0.8, wspace=0.6)  # tight_layout costs 50 ms
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def draw_roc(path: str | Path, curves: dict[int, tuple[np.ndarray, np.ndarray, float]], names: Sequence[str],
             title: str = "") -> Path:
    """One-vs-rest ROC curve per class, its AUC in the legend."""
    from cxrfl_ray.plots import save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=DPI)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    for c, name in enumerate(names):
        if c in curves:
            fpr, tpr, auc = curves[c]
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {auc:.3f})")
        else:
            ax.plot([], [], label=f"{name} (no curve: one class only)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    with plt.rc_context({"axes.titlesize": 8, "legend.fontsize": 7}):
        return save_figure(fig, ax, path, title)


def write_pictures(run_dir: str | Path, prep: Prepared, device: torch.device | str = "cpu") -> list[Path]:
    """The run's pictures from ``best.safetensors`` on the test split; the files written.

    Nothing is drawn (and the run goes on) where matplotlib is missing, ``tracking.pictures`` is
    0, there is no best checkpoint (a run that stopped early) or no test row.
    """
    from cxrfl_ray.tasks.checkpoint import load_checkpoint

    run_dir, cfg = Path(run_dir), prep.cfg
    rows = prep.views.get(("central", cfg.data.test_split))
    best = run_dir / "best.safetensors"
    if cfg.tracking.pictures == 0 or rows is None or not best.is_file() or pyplot() is None:
        return []
    start = time.perf_counter()
    model, _, _ = load_checkpoint(best, task=cfg.task, device=device)
    title = f"{run_dir.name}\nbest checkpoint, {cfg.data.test_split} split"
    if cfg.task == "segmentation":
        images = prep.images(choose(rows, cfg.tracking.pictures, cfg.seed), train=False)
        panels = segmentation_panels(model, images, device, cfg.train.eval_batch_size)
        written = [draw_overlays(run_dir / "overlays.png", panels, title)]
    else:
        from cxrfl_ray.tasks import classification

        out = classification.collect(model, prep.loader(rows, train=False), device)
        k, names = prep.num_classes, prep.label_names or [str(c) for c in range(prep.num_classes)]
        written = [draw_confusion(run_dir / "confusion.png", confusion_counts(out, k), names, title),
                   draw_roc(run_dir / "roc.png", roc_curves(out, k), names, title)]
    log.info("pictures %s in %.2f s", ", ".join(p.name for p in written), time.perf_counter() - start)
    return written
