"""3-class pneumonia classification: cross-entropy, accuracy, macro F1, per-class precision and
recall, one-vs-rest AUROC and the confusion matrix (scikit-learn's implementations)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxrfl_ray.tasks.training import DivergedError

MAIN_METRIC, MODE = "accuracy", "max"


def make_loss(name: str, class_weights=None) -> nn.Module:
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    return nn.CrossEntropyLoss(weight=weight)


@torch.no_grad()
def collect(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Per-image class probabilities, targets and losses over ``loader``."""
    model.eval()
    probs, targets, losses = [], [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        if loss_fn is not None:
            weight = getattr(loss_fn, "weight", None)
            losses.append(nn.functional.cross_entropy(logits, y, weight=weight, reduction="none").cpu())
        probs.append(logits.softmax(dim=1).cpu())
        targets.append(y.cpu())
    if not targets:
        return {"probs": np.zeros((0, 0)), "targets": np.zeros(0, dtype=np.int64), "loss": np.zeros(0)}
    return {
        "probs": torch.cat(probs).numpy(),
        "targets": torch.cat(targets).numpy(),
        "loss": torch.cat(losses).numpy() if losses else np.full(sum(len(t) for t in targets), np.nan),
    }


def metrics_from_proba(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Flat metric dict: accuracy, macro F1, per-class precision/recall, AUROC, confusion cells.

    Probabilities of a diverged model (NaN, from non-finite logits) raise ``DivergedError`` here:
    scikit-learn would fail on them with "Input contains NaN", which names neither cause nor fix.
    """
    bad = int((~np.isfinite(probs)).any(axis=1).sum()) if probs.size else 0
    if bad:
        raise DivergedError(f"non-finite model outputs for {bad} of {len(probs)} images")
    # Imported here: scikit-learn costs seconds of start-up in every Ray worker and client actor,
    # and only the metrics need it.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

    k = probs.shape[1]
    labels = list(range(k))
    pred = probs.argmax(axis=1)
    precision, recall, _, _ = precision_recall_fscore_support(targets, pred, labels=labels, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(targets, pred)),
        "f1_macro": float(f1_score(targets, pred, labels=labels, average="macro", zero_division=0)),
    }
    for c in labels:
        out[f"precision_{c}"] = float(precision[c])
        out[f"recall_{c}"] = float(recall[c])
    present = np.unique(targets)
    if present.size == k:
        # Two classes: scikit-learn scores the positive class's column (its "ovr" needs k > 2).
        out["auroc_macro"] = float(roc_auc_score(targets, probs[:, 1]) if k == 2 else
                                   roc_auc_score(targets, probs, multi_class="ovr", labels=labels))
        for c in labels:
            out[f"auroc_{c}"] = float(roc_auc_score(targets == c, probs[:, c]))
    cm = confusion_matrix(targets, pred, labels=labels)
    for i in labels:
        for j in labels:
            out[f"cm_{i}_{j}"] = float(cm[i, j])
    return out


def summarise(out: dict[str, np.ndarray]) -> dict[str, float]:
    if out["targets"].size == 0:
        return {}
    return {"loss": float(np.mean(out["loss"])), **metrics_from_proba(out["probs"], out["targets"]),
            "examples": float(out["targets"].size)}
