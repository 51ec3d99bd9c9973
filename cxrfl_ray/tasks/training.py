"""The local training loop every caller shares (centralised, local-only and federated clients).

Reads top to bottom like nanoGPT's: pick a device, build the optimiser, loop over batches for a
number of epochs or steps, return what happened. Nothing here knows about Flower.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from cxrfl_ray.config import TrainConfig


def fused(optimizer: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """``optimizer`` over ``params`` with torch's fused kernel (one kernel over every parameter), else its default
    implementation where this torch or device has none. On CPU torch's default is a Python loop
    over the parameters: a resnet18 Adam step took 61 ms that way and 12 ms fused on 2 threads
    (on 1 thread: AdamW 71 / 17, Adagrad 28 / 10, SGD with momentum 17 / 9; plain SGD 8 / 8). The
    same update; floats may differ in the last bit. An error that is not about the kernel (a bad
    ``lr``) is raised by the second attempt."""
    params = list(params)
    try:
        return optimizer(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel here (old torch, a device without one)
        return optimizer(params, **kwargs)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, c: fused(torch.optim.Adam, params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: fused(torch.optim.AdamW, params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: fused(torch.optim.SGD, params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adagrad": lambda params, c: fused(torch.optim.Adagrad, params, lr=c.lr, weight_decay=c.weight_decay),
}


class DivergedError(ValueError):
    """Training produced a non-finite loss, metric or weight: the run stops (a ``ValueError``, so
    the CLI prints one line) instead of averaging or saving it. ``where`` ("round 3", "epoch 0")
    is added by the loop that knows it; the task code that detects it does not."""

    def __init__(self, what: str, where: str | None = None, fix: str = "train.lr") -> None:
        self.what, self.where, self.fix = what, where, fix
        at = f" at {where}" if where else ""
        super().__init__(f"diverged{at} ({what}): lower {fix}")

    def at(self, where: str, fix: str | None = None) -> "DivergedError":
        """This error, located (kept as it is when it already names where)."""
        return self if self.where else DivergedError(self.what, where, fix or self.fix)


def nonfinite_value(values: Mapping[str, float]) -> str | None:
    """``"loss inf"`` for the first of ``values`` that is not finite (None: all are)."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            return f"{name} {float(value)}"
    return None


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> str | None:
    """``"nan in fc.weight"`` for the first floating tensor holding a NaN or infinity (None: none)."""
    for name, value in tensors.items():
        lib = np if isinstance(value, np.ndarray) else torch
        if value.dtype.is_floating_point if lib is torch else np.issubdtype(value.dtype, np.floating):
            if not bool(lib.isfinite(value).all()):
                return f"{'nan' if bool(lib.isnan(value).any()) else 'inf'} in {name}"
    return None


def check_finite(where: str, values: Mapping[str, float] | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None, fix: str = "train.lr") -> None:
    """Raise ``DivergedError`` at ``where`` if a value (e.g. ``{"loss": ...}``) or a weight is not finite."""
    what = nonfinite_value(values or {}) or (nonfinite_tensor(tensors) if tensors else None)
    if what:
        raise DivergedError(what, where, fix)


@contextmanager
def located(where: str, fix: str | None = None):
    """Name ``where`` in a ``DivergedError`` raised inside (the task code that detects non-finite
    outputs does not know the round or epoch)."""
    try:
        yield
    except DivergedError as exc:
        raise exc.at(where, fix) from None


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                   done_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cfg.lr_schedule`` over ``total_steps`` optimiser steps, starting after ``done_steps``
    (a federated client's earlier rounds), so one schedule spans the whole run; None if constant."""
    if cfg.lr_schedule == "constant":
        return None
    total = max(total_steps, 1)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(done_steps + step, total) / total))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(loader, epochs: int, steps: int | None = None, first_epoch: int = 0):
    """Yield ``(epoch, batch)`` for ``epochs`` epochs; an epoch is one pass over ``loader``, or
    exactly ``steps`` batches (cycling the loader) when ``steps`` is given.

    The dataset's ``set_epoch`` is called at each pass so augmentations differ between passes.
    """
    for epoch in range(first_epoch, first_epoch + epochs):
        done, cycle = 0, 0
        while True:
            if hasattr(loader.dataset, "set_epoch"):
                # A fresh augmentation draw for every pass, also when one epoch cycles the data.
                loader.dataset.set_epoch(epoch * 1_000 + cycle)
            cycle += 1
            for batch in loader:
                yield epoch, batch
                done += 1
                if steps is not None and done >= steps:
                    break
            if steps is None or done >= steps or done == 0:
                break


class LocalHooks:
    """What a federated algorithm may add to local training (no-ops here): a term of the loss,
    how a batch's loss is taken, and a change to the gradients before each optimiser step. Tasks
    know nothing of Flower; the algorithms (``fl/algorithms``) subclass this."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def batch_loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's loss; DP-SGD replaces it by the mean of per-sample losses (a batched Dice
        couples the samples, so one sample's gradient would not be its own)."""
        return loss_fn(outputs, targets)

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after ``backward``, before ``optimizer.step`` (gradients are in ``p.grad``)."""


def train_local(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epochs: int = 1,
    steps: int | None = None,
    first_epoch: int = 0,
    hooks: "LocalHooks | None" = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """Train in place for ``epochs`` epochs (each a full pass, or ``steps`` steps); returns the
    mean loss, steps, examples and the next epoch index.

    ``hooks`` (an algorithm's local work, e.g. FedProx's proximal term or SCAFFOLD's gradient
    correction) add a loss term and act between backward and the optimiser step; ``scheduler`` is
    stepped after every batch. A non-finite batch loss stops the training at once (more steps
    only spread NaN through the weights); the returned loss is then that value, and the caller
    refuses the result.
    """
    model.train()
    total, seen, n_steps, last_epoch = 0.0, 0, 0, first_epoch - 1
    for last_epoch, (x, y) in batches(loader, epochs, steps, first_epoch):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) if hooks is None else hooks.batch_loss(loss_fn, model(x), y)
        term = hooks.loss_term(model) if hooks is not None else None
        if term is not None:
            loss = loss + term
        value = loss.item()
        if not math.isfinite(value):
            return {"loss": value, "steps": n_steps, "examples": seen, "next_epoch": last_epoch + 1}
        loss.backward()
        if hooks is not None:
            hooks.before_step(model, optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += value * len(x)
        seen += len(x)
        n_steps += 1
    return {"loss": total / max(seen, 1), "steps": n_steps, "examples": seen, "next_epoch": last_epoch + 1}
