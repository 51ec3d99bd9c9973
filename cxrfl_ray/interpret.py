"""Where does a classifier look? Grad-CAM maps and the lung-focus score.

The paper shows Grad-CAM pictures of classifiers trained on full and on lung-masked images; here
the look is measured too: the **lung-focus score** of an image is the share of its CAM's energy
(the sum of the map) that falls inside the lung mask. A model that reads a shortcut outside the
lungs (a burned-in marker, a tube, text) scores low.

The CAM of an image targets the model's *predicted* class (what the model used for its answer).
Maps are computed at the model's input size and upsampled to the image's stored size, where the
lung mask lives.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from cxrfl_ray.cascade import LUNG_THRESHOLD, load_segmenter, lung_probabilities
from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.store import DatasetError, StoredDataset, open_dataset
from cxrfl_ray.data.torch_dataset import model_input
from cxrfl_ray.tasks.checkpoint import load_checkpoint
from cxrfl_ray.tasks.models import ModelError, get_spec
from cxrfl_ray.tasks.training import select_device

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")


def cam_class(method: str):
    """The pytorch-grad-cam class of a method name."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "eigencam": EigenCAM}
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
    return classes[method]


# -- the target layer --------------------------------------------------------------------------

def resolve_layer(model: nn.Module, dotted: str, model_name: str = "model") -> nn.Module:
    """The submodule at ``dotted`` (``layer4.-1``, ``layer4[-1]``, ``features.denseblock4``).

    Integer parts index sequential containers (negative from the end). An unknown part raises
    ModelError naming the layer and the valid names at that level.
    """
    parts = [p for p in re.sub(r"\[(-?\d+)\]", r".\1", dotted).split(".") if p]
    if not parts:
        raise ModelError(f"empty CAM layer name {dotted!r}")
    module, where = model, model_name
    for part in parts:
        children = dict(module.named_children())
        if re.fullmatch(r"-?\d+", part) and isinstance(module, (nn.Sequential, nn.ModuleList)):
            index = int(part)
            if not -len(module) <= index < len(module):
                raise ModelError(f"layer {dotted!r} does not exist in {model_name}: {where} has {len(module)} "
                                 f"children, no index {index}")
            module = module[index]
        elif part in children:
            module = children[part]
        else:
            names = list(children)
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ModelError(f"layer {dotted!r} does not exist in {model_name}: no {part!r} in {where}; "
                             f"valid names there: {shown or '(none: it is a leaf)'}")
        where = f"{where}.{part}"
    return module


# -- which images, which masks -----------------------------------------------------------------

def pick_rows(ds: StoredDataset, split: str, n: int, seed: int) -> np.ndarray:
    """``n`` row ids drawn (seeded, without replacement) from ``split``, in row order."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    splits = ds.metadata.column("split").to_numpy(zero_copy_only=False)
    pool = np.flatnonzero(splits == split)
    if pool.size == 0:
        raise DatasetError(f"{ds.path} has no rows in split {split!r}; its splits: {sorted(set(splits.tolist()))}")
    chosen = np.random.default_rng(seed).choice(pool, size=min(n, pool.size), replace=False)
    return np.sort(chosen)


def rows_by_id(ds: StoredDataset, ids: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """The rows of ``ids`` (as a table in ``ids`` order); a missing id raises DatasetError."""
    position = {rid: k for k, rid in enumerate(ds.metadata.column("id").to_pylist())}
    missing = [rid for rid in ids if rid not in position]
    if missing:
        raise DatasetError(f"{ds.path} has no row with id {missing[0]!r} ({len(missing)} of {len(ids)} ids missing)")
    return ds.take([position[rid] for rid in ids], columns)


def masks_from_column(ds: StoredDataset, ids: Sequence[str]) -> list[np.ndarray] | None:
    """The lung masks of ``ids`` from the dataset's ``mask`` column (None if any is missing)."""
    column = rows_by_id(ds, ids, ["mask"]).column("mask")
    if column.null_count:
        return None
    return [decode_png(m) > 127 for m in column.to_pylist()]


def masks_from_segmenter(checkpoint: str | Path, images: Sequence[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Predicted lung masks (the cascade's model and threshold) at the images' sizes."""
    model, cfg = load_segmenter(checkpoint, device)
    return [p >= LUNG_THRESHOLD for p in lung_probabilities(model, cfg, images, device)]


def lung_masks(ds: StoredDataset, ids: Sequence[str], images: Sequence[np.ndarray], *,
               masks: str | Path | None, seg: str | Path | None, device: torch.device) -> tuple[list[np.ndarray], str]:
    """Masks for the focus score and where they came from.

    An explicit ``masks`` dataset (by id) or ``seg`` checkpoint wins; otherwise the dataset's
    own ``mask`` column (ground truth for ingested/synthetic data, predicted after ``cxrfl mask``).
    """
    if masks is not None:
        other = open_dataset(masks)
        found = masks_from_column(other, ids)
        if found is None:
            raise DatasetError(f"--masks {other.path}: some of the chosen images have no mask there")
        return found, f"mask column of {other.path} (--masks; {other.card.get('mask_source', 'ground truth')})"
    if seg is not None:
        return masks_from_segmenter(seg, images, device), f"predicted by {seg} (--seg, threshold {LUNG_THRESHOLD})"
    found = masks_from_column(ds, ids)
    if found is None:
        raise DatasetError(f"dataset {ds.path} has no lung masks; pass --masks or --seg")
    return found, f"mask column of {ds.path} ({ds.card.get('mask_source', 'ground truth')})"


# -- CAMs and the score ------------------------------------------------------------------------

@dataclass
class ModelCams:
    """One classifier's CAMs over the chosen images."""

    name: str
    checkpoint: str
    dataset: str
    layer: str
    cams: list[np.ndarray]  # per image, at the image's stored size, in [0, 1]
    predicted: list[int]
    images: list[np.ndarray]
    scores: list[float] = field(default_factory=list)


def compute_cams(model: nn.Module, cfg: ExperimentConfig, layer: nn.Module, method: str,
                 images: Sequence[np.ndarray], device: torch.device,
                 batch_size: int = 16) -> tuple[list[np.ndarray], list[int]]:
    """CAM of each image for the model's predicted class, upsampled to the image's size."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    cams, predicted = [], []
    with cam_class(method)(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = torch.stack([model_input(p, cfg.data.size, cfg.data.channels, cfg.data.normalization) for p in chunk])
            with torch.no_grad():
                classes = model(x.to(device)).argmax(dim=1).cpu().tolist()
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
            for pixels, m in zip(chunk, maps):
                full = nnf.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None], size=pixels.shape,
                                       mode="bilinear", align_corners=False)[0, 0]
                cams.append(full.clamp(min=0).numpy())
            predicted.extend(classes)
    return cams, predicted


def focus_score(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the CAM's energy inside the lung mask (NaN for an all-zero map)."""
    if mask.shape != cam.shape:
        mask = nnf.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=cam.shape,
                               mode="nearest")[0, 0].numpy() > 0.5
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else float("nan")


def run_model(checkpoint: str | Path, ds: StoredDataset, images: list[np.ndarray], *, name: str, method: str,
              layer: str | None, device: torch.device) -> ModelCams:
    """Load a classifier and compute its CAMs over ``images`` (decoded rows of ``ds``)."""
    model, cfg, meta = load_checkpoint(checkpoint, task="classification", device=device)
    dotted = layer or get_spec(meta["model"]).cam_layer
    if not dotted:
        raise ModelError(f"model {meta['model']} has no registered CAM layer; pass --layer")
    target = resolve_layer(model, dotted, meta["model"])
    cams, predicted = compute_cams(model, cfg, target, method, images, device)
    return ModelCams(name, str(checkpoint), str(ds.path), dotted, cams, predicted, images)


# -- outputs -----------------------------------------------------------------------------------

def overlay(pixels: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The image in grey with the CAM as a jet heat map over it (RGB uint8)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = pixels.astype(np.float32) / (65535.0 if pixels.dtype == np.uint16 else 255.0)
    return show_cam_on_image(np.repeat(grey[..., None], 3, axis=2), cam.astype(np.float32), use_rgb=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_overlays(out: Path, ids: Sequence[str], models: Sequence[ModelCams]) -> list[Path]:
    """One overlay PNG per image and model: ``overlays/<id>_<model>.png``."""
    from PIL import Image

    folder = out / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in models:
        for rid, pixels, cam in zip(ids, m.images, m.cams):
            path = folder / f"{_safe(rid)}_{m.name}.png"
            Image.fromarray(overlay(pixels, cam)).save(path)
            paths.append(path)
    return paths


def write_grid(path: Path, ids: Sequence[str], labels: Sequence[str], masks: Sequence[np.ndarray],
               models: Sequence[ModelCams], label_names: Sequence[str]) -> Path:
    """One row per image: the image with its lung outline, then each model's CAM side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(models)
    fig, axes = plt.subplots(len(ids), cols, figsize=(2.4 * cols, 2.5 * len(ids)), dpi=80, squeeze=False)
    for r, (rid, label, mask) in enumerate(zip(ids, labels, masks)):
        ax = axes[r, 0]
        ax.imshow(models[0].images[r], cmap="gray")
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{rid}\ntrue {label}", fontsize=7)
        for c, m in enumerate(models, start=1):
            axes[r, c].imshow(overlay(m.images[r], m.cams[r]))
            axes[r, c].set_title(f"{m.name}: pred {_label(m.predicted[r], label_names)}\n"
                                 f"lung focus {m.scores[r]:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label(k: int, label_names: Sequence[str]) -> str:
    return label_names[k] if 0 <= k < len(label_names) else "none"


def write_focus_csv(path: Path, ids: Sequence[str], labels: Sequence[str], models: Sequence[ModelCams],
                    label_names: Sequence[str]) -> Path:
    """``focus.csv``: id, true label, then each model's predicted label and lung-focus score."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", *[f"{k}_{m.name}" for m in models for k in ("predicted", "score")]])
        for r, (rid, label) in enumerate(zip(ids, labels)):
            cells = [c for m in models for c in (_label(m.predicted[r], label_names), f"{m.scores[r]:.6f}")]
            writer.writerow([rid, label, *cells])
    return path


def summarise_scores(labels: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """Mean score overall and per true label (NaN scores, from all-zero maps, left out)."""
    values = np.asarray(scores, dtype=float)
    out = {"overall": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")}
    for name in sorted(set(labels)):
        chosen = values[np.asarray(labels) == name]
        out[name] = float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")
    return out


def write_report(path: Path, models: Sequence[ModelCams], summaries: dict[str, dict[str, float]], *,
                 labels: Sequence[str], label_names: Sequence[str], method: str, split: str, seed: int,
                 mask_source: str, true_labels: Sequence[int]) -> Path:
    """``cam_report.md``: what was measured and each model's overall and per-class mean score."""
    classes = [c for c in [*label_names, "none"] if c in set(labels)]
    lines = [
        "# Lung focus of the classifiers' CAMs",
        "",
        f"- images: {len(labels)} from split `{split}` (seed {seed}), the same ids for every model",
        f"- method: {method}; the CAM targets each model's predicted class",
        f"- lung masks: {mask_source}",
        "- lung-focus score: share of the CAM's energy (sum of the map) inside the lung mask; "
        "1 = the model looks only at the lungs",
        "",
        "| model | checkpoint | dataset | layer | accuracy | overall | " + " | ".join(classes) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(classes),
    ]
    for m in models:
        s = summaries[m.name]
        accuracy = float(np.mean(np.asarray(m.predicted) == np.asarray(true_labels)))
        lines.append(f"| {m.name} | {m.checkpoint} | {m.dataset} | {m.layer} | {accuracy:.2f} | "
                     f"{s['overall']:.3f} | " + " | ".join(f"{s[c]:.3f}" for c in classes) + " |")
    lines.append("")
    for m in models:
        lines.append(f"Overall mean lung-focus score of {m.name}: {summaries[m.name]['overall']:.3f}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the command -------------------------------------------------------------------------------

def run_cam(checkpoint: str | Path, dataset: str | Path, out: str | Path, *, n: int = 16,
            method: str = "gradcam", layer: str | None = None, compare: str | Path | None = None,
            compare_dataset: str | Path | None = None, masks: str | Path | None = None,
            seg: str | Path | None = None, split: str = "test", seed: int = 0,
            device: str = "auto") -> dict[str, Any]:
    """CAMs and lung-focus scores of one classifier, or two side by side (``compare``).

    Writes ``overlays/*.png``, ``grid.png``, ``focus.csv`` and ``cam_report.md`` into ``out``;
    returns the per-model summaries (overall and per-class mean scores) and the paths.

    Parameters
    ----------
    checkpoint : the classifier (e.g. trained on full images), applied to ``dataset``.
    dataset : where the images (and, by default, the lung masks) come from.
    n, split, seed : how many images, from which split, drawn with which seed.
    method : ``gradcam``, ``gradcam++``, ``scorecam`` or ``eigencam``.
    layer : dotted target layer (default: the model's registered last convolutional block).
    compare : a second classifier (e.g. trained on lung-masked images) ...
    compare_dataset : ... applied to this dataset's rows of the same ids (default ``dataset``).
    masks, seg : lung masks from another dataset by id, or predicted by a segmentation checkpoint.
    """
    if masks is not None and seg is not None:
        raise ValueError("pass either --masks or --seg, not both")
    cam_class(method)  # an unknown method fails before any model is loaded
    dev = select_device(device)
    ds = open_dataset(dataset)
    rows = ds.take(pick_rows(ds, split, n, seed), ["id", "image", "label"])
    ids = rows.column("id").to_pylist()
    true_labels = rows.column("label").to_pylist()
    images = [decode_png(b) for b in rows.column("image").to_pylist()]
    lungs, mask_source = lung_masks(ds, ids, images, masks=masks, seg=seg, device=dev)

    models = [run_model(checkpoint, ds, images, name="main", method=method, layer=layer, device=dev)]
    if compare is not None:
        other, other_images = ds, images
        if compare_dataset is not None:  # the same ids, their pixels from the other dataset
            other = open_dataset(compare_dataset)
            other_images = [decode_png(b) for b in rows_by_id(other, ids, ["image"]).column("image").to_pylist()]
        models.append(run_model(compare, other, other_images, name="compare", method=method, layer=layer, device=dev))
    labels = [_label(k, ds.label_names) for k in true_labels]
    summaries = {}
    for m in models:
        m.scores = [focus_score(cam, mask) for cam, mask in zip(m.cams, lungs)]
        summaries[m.name] = summarise_scores(labels, m.scores)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_overlays(out, ids, models)
    grid = write_grid(out / "grid.png", ids, labels, lungs, models, ds.label_names)
    table = write_focus_csv(out / "focus.csv", ids, labels, models, ds.label_names)
    report = write_report(out / "cam_report.md", models, summaries, labels=labels, label_names=ds.label_names,
                          method=method, split=split, seed=seed, mask_source=mask_source, true_labels=true_labels)
    return {"ids": ids, "summaries": summaries, "mask_source": mask_source,
            "grid": str(grid), "csv": str(table), "report": str(report)}
