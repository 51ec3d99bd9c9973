"""The paper's cascade: a segmentation model cuts the lungs out of classification images.

``mask_dataset`` runs a segmentation checkpoint over a whole dataset and writes a new dataset
with the same rows in the same order (ids, labels, sites, splits, patients, every metadata
field), so a partition planned on it gives the same clients as on the original: only the
pixels outside the predicted lungs are zeroed, and the ``mask`` column holds the prediction.
Images whose predicted lungs are implausible are flagged in the card (and dropped on request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.data.imageio import decode_png, encode_png
from cxrfl_ray.data.store import open_dataset
from cxrfl_ray.data.torch_dataset import model_input
from cxrfl_ray.data.writer import DatasetWriter
from cxrfl_ray.tasks.checkpoint import load_checkpoint
from cxrfl_ray.tasks.training import select_device

# 8-connectivity: regions touching at a corner are one lung, not two.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Share of the image below which a predicted region is a speck, not a lung (one lung of a
# phantom covers about 8 %, of a 2x2 mosaic of chests about 2 %).
MIN_REGION = 0.005
# Lung probability below which a pixel counts as outside the lungs (the paper's threshold).
LUNG_THRESHOLD = 0.05


def load_segmenter(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, ExperimentConfig]:
    """The segmentation model of a checkpoint, in eval mode (a classifier raises CheckpointError)."""
    model, cfg, _ = load_checkpoint(checkpoint, task="segmentation", device=device)
    return model.eval(), cfg


@torch.no_grad()
def lung_probabilities(model: nn.Module, cfg: ExperimentConfig, images: Sequence[np.ndarray],
                       device: torch.device) -> list[np.ndarray]:
    """Lung probability of every pixel, at each image's own stored size.

    The model sees the images as in training (``model_input`` at ``cfg.data.size``); its
    probability map is upsampled bilinearly to the stored size, so thresholding happens there.
    """
    if not images:
        return []
    x = torch.stack([model_input(p, cfg.data.size, cfg.data.channels, cfg.data.normalization) for p in images])
    probs = model(x.to(device)).float().sigmoid()
    return [
        nnf.interpolate(prob[None], size=pixels.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        for prob, pixels in zip(probs, images)
    ]


def implausible_reasons(mask: np.ndarray, min_area: float, max_area: float, max_components: int,
                        min_region: float = MIN_REGION) -> list[str]:
    """Why a predicted lung mask is not believable (empty list: it is).

    A chest X-ray shows one or two lung fields covering a sizeable, but not the whole, image.
    Regions smaller than ``min_region`` of the image are not counted as lungs: a low threshold
    leaves single-pixel specks (e.g. at the image border) that say nothing about the lungs.
    """
    from scipy.ndimage import label

    reasons = []
    area = float(mask.mean())
    if area < min_area:
        reasons.append(f"lung area {area:.3f} of the image is below min_area {min_area}")
    if area > max_area:
        reasons.append(f"lung area {area:.3f} of the image is above max_area {max_area}")
    regions, count = label(mask, structure=_EIGHT_CONNECTED)
    components = int((np.bincount(regions.ravel(), minlength=count + 1)[1:] >= min_region * mask.size).sum())
    if components > max_components:
        reasons.append(f"{components} lung regions (each over {min_region:.1%} of the image), "
                       f"more than max_components {max_components}")
    return reasons


def zero_outside(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with every pixel outside ``mask`` set to 0 (dtype kept)."""
    return np.where(mask, pixels, np.zeros((), dtype=pixels.dtype))


def _check_args(threshold: float, min_area: float, max_area: float, max_components: int, batch_size: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise ValueError(f"need 0 <= min_area <= max_area <= 1, got min_area {min_area}, max_area {max_area}")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def mask_dataset(seg_checkpoint: str | Path, dataset: str | Path, out: str | Path, *, threshold: float = LUNG_THRESHOLD,
                 min_area: float = 0.05, max_area: float = 0.8, max_components: int = 2,
                 drop_flagged: bool = False, batch_size: int = 16, device: str = "auto",
                 progress: bool = True) -> dict[str, Any]:
    """Write ``out``: ``dataset`` with pixels outside the predicted lungs zeroed; returns its card.

    Parameters
    ----------
    seg_checkpoint : a segmentation checkpoint (``best.safetensors`` of ``cxrfl train``/``simulate``).
    dataset : the dataset to mask; every row is kept with all its metadata, in the same order.
    out : the new dataset folder (published atomically; must differ from ``dataset``).
    threshold : lung probability below which a pixel is zeroed (the paper: 0.05).
    min_area, max_area : plausible share of the image covered by the predicted lungs.
    max_components : plausible number of separate lung regions.
    drop_flagged : leave implausible images out (row ids then shift: partitions differ).
    batch_size : images per model pass.
    device : ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """
    from tqdm import tqdm

    _check_args(threshold, min_area, max_area, max_components, batch_size)
    source = open_dataset(dataset)
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise ValueError(f"--out {out} is the input dataset; write the masked dataset to a new folder")
    dev = select_device(device)
    model, cfg = load_segmenter(seg_checkpoint, dev)
    flagged: list[dict[str, Any]] = []
    cascade = {
        "checkpoint": str(Path(seg_checkpoint).resolve()), "model": cfg.model.name, "input_size": cfg.data.size,
        "threshold": threshold, "min_area": min_area, "max_area": max_area, "max_components": max_components,
        "min_region": MIN_REGION, "source_dataset": str(source.path.resolve()), "drop_flagged": drop_flagged,
    }
    sources = [*source.card.get("sources", []), {"generator": "cxrfl mask", **cascade}]
    extra = {"mask_source": "predicted", "cascade": cascade}
    with DatasetWriter(out, name=f"{source.card['name']}-masked", label_names=source.label_names,
                       sources=sources, extra=extra) as writer, \
            tqdm(total=source.num_rows, desc="mask", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, source.num_rows, batch_size):
            rows = source.take(np.arange(start, min(source.num_rows, start + batch_size))).to_pylist()
            images = [decode_png(r["image"]) for r in rows]
            for row, pixels, prob in zip(rows, images, lung_probabilities(model, cfg, images, dev)):
                lungs = prob >= threshold
                reasons = implausible_reasons(lungs, min_area, max_area, max_components)
                if reasons:
                    flagged.append({"id": row["id"], "reason": "; ".join(reasons)})
                    if drop_flagged:
                        continue
                row["image"] = encode_png(zero_outside(pixels, lungs))
                row["mask"] = encode_png(lungs.astype(np.uint8) * np.uint8(255))
                writer.add(row)
            bar.update(len(rows))
        # The card is written when the block ends, so the flags found above still make it in.
        cascade.update(num_flagged=len(flagged), flagged=flagged)
        card = writer.card()
    return card
