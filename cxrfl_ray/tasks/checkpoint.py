"""Checkpoints as safetensors (no pickle) that carry the model name and the config, so
``predict`` needs nothing else to rebuild the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cxrfl_ray.config import ExperimentConfig, build_config
from cxrfl_ray.jsonio import dumps
from cxrfl_ray.tasks.models import ModelError, create_model

FORMAT = "cxrfl-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is not ours, of the wrong task, or does not fit its model."""


def save_checkpoint(path: str | Path, model: nn.Module, cfg: ExperimentConfig, num_classes: int,
                    label_names: list[str], info: dict[str, Any] | None = None) -> Path:
    """Write the model's state dict with the config and label names as safetensors metadata.
    A model with a non-finite weight is refused: a diverged model must never land as a checkpoint."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path}: not saved, the model's {bad} holds non-finite values (the run diverged)")
    meta = {
        "format": FORMAT,
        "model": cfg.model.name,
        "task": cfg.task,
        "in_chans": str(cfg.data.channels),
        "num_classes": str(num_classes),
        "label_names": dumps(label_names),
        "config": cfg.to_yaml(),
        "info": dumps(info or {}),
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cxrfl checkpoint (metadata format={meta.get('format')!r})")
    return meta


def load_checkpoint(path: str | Path, task: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model from a checkpoint; returns ``(model, config, metadata)``.

    ``task`` guards against using, say, a classifier where a segmentation model is needed.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if task is not None and meta["task"] != task:
        raise CheckpointError(
            f"{path} holds a {meta['task']} model ({meta['model']}), but a {task} model is needed"
        )
    cfg = build_config(yaml.safe_load(meta["config"]), source=f"{path} (embedded config)")
    try:
        model = create_model(meta["model"], meta["task"], int(meta["in_chans"]), int(meta["num_classes"]),
                             norm=cfg.model.norm)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']}: {' '.join(first)}") from None
    return model.to(device), cfg, meta

