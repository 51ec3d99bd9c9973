"""Tasks: what one problem needs (model, loss, metrics, evaluate), and nothing about Flower.

The centralised baseline, the local-only baseline and every federated client call the same
task code through ``TASKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from cxrfl_ray.tasks import classification, segmentation


@dataclass(frozen=True)
class Task:
    """One problem's pieces.

    Parameters
    ----------
    name : ``segmentation`` or ``classification``.
    main_metric, mode : the metric that picks the best checkpoint, and ``max``/``min``.
    make_loss : ``make_loss(loss_name, class_weights)``.
    collect : ``collect(model, loader, device, loss_fn)`` -> per-image arrays (one model pass).
    summarise : per-image arrays (or any subset of them) -> flat metric dict.
    needs_masks : the dataset must carry lung masks.
    """

    name: str
    main_metric: str
    mode: str
    make_loss: Callable[..., nn.Module]
    collect: Callable[..., dict[str, np.ndarray]]
    summarise: Callable[[dict[str, np.ndarray]], dict[str, float]]
    needs_masks: bool

    def evaluate(self, model: nn.Module, loader, device, loss_fn: nn.Module) -> dict[str, float]:
        return self.summarise(self.collect(model, loader, device, loss_fn))

    def subset(self, outputs: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
        """The per-image outputs of some of the images (e.g. one site's)."""
        return {k: v[index] for k, v in outputs.items()}

    def better(self, new: float, old: float | None) -> bool:
        if old is None:
            return True
        return new > old if self.mode == "max" else new < old


TASKS: dict[str, Task] = {
    "segmentation": Task("segmentation", segmentation.MAIN_METRIC, segmentation.MODE,
                         segmentation.make_loss, segmentation.collect, segmentation.summarise, needs_masks=True),
    "classification": Task("classification", classification.MAIN_METRIC, classification.MODE,
                           classification.make_loss, classification.collect, classification.summarise,
                           needs_masks=False),
}
