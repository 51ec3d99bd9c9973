"""Lung segmentation: binary masks, Dice + BCE (the paper's loss), Jaccard and Dice metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MAIN_METRIC, MODE = "jaccard", "max"


def dice_loss() -> nn.Module:
    """smp's soft Dice on logits; imported here, as smp (with timm) costs seconds of start-up in
    every process that imports the tasks, classification clients included."""
    from segmentation_models_pytorch.losses import DiceLoss

    return DiceLoss(mode="binary", from_logits=True)


class DiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on logits, as in CXR-FL."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = dice_loss()
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


LOSSES = {
    "dice_bce": DiceBCELoss,
    "dice": dice_loss,
    "bce": nn.BCEWithLogitsLoss,
}


def make_loss(name: str, class_weights=None) -> nn.Module:
    return LOSSES[name]()


@torch.no_grad()
def collect(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module) -> dict[str, np.ndarray]:
    """Per-image outputs: loss and the pixel confusion counts (true/false positives, misses).

    Keeping per-image values lets one pass over the images serve every view (central, each
    site) by indexing, instead of running the model once per view.
    """
    model.eval()
    losses, stats = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        losses += [loss_fn(logits[i:i + 1], y[i:i + 1]).item() for i in range(len(x))]
        pred = (logits > 0).flatten(1)  # sigmoid(logit) > 0.5
        target = y.flatten(1) > 0.5
        # Pixel counts per image (torchmetrics' samplewise stat scores fail on a batch of one).
        stats.append(torch.stack([(pred & target).sum(1), (pred & ~target).sum(1), (~pred & target).sum(1)], 1).cpu())
    if not losses:
        return {"loss": np.zeros(0), "tp": np.zeros(0), "fp": np.zeros(0), "fn": np.zeros(0)}
    s = torch.cat(stats).double().numpy()  # columns: tp, fp, fn
    return {"loss": np.asarray(losses), "tp": s[:, 0], "fp": s[:, 1], "fn": s[:, 2]}


def summarise(out: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean per-image Jaccard (IoU) and Dice, pooled Jaccard, worst image, loss.

    An image with no lung pixels in the mask or the prediction has nothing to score: it is left
    out of the means (an empty prediction on an empty mask is not a perfect score). Where no
    image has anything to score, Jaccard and Dice are 0, never 1."""
    n = out["loss"].size
    if n == 0:
        return {}
    tp, fp, fn = out["tp"], out["fp"], out["fn"]
    union = tp + fp + fn
    scored = union > 0
    jaccard = tp[scored] / union[scored]
    dice = 2 * tp[scored] / (2 * tp[scored] + fp[scored] + fn[scored])
    return {
        "loss": float(out["loss"].mean()),
        "jaccard": float(jaccard.mean()) if scored.any() else 0.0,
        "dice": float(dice.mean()) if scored.any() else 0.0,
        "jaccard_pooled": float(tp.sum() / max(union.sum(), 1)),
        "jaccard_min": float(jaccard.min()) if scored.any() else 0.0,
        "examples": float(n),
    }
