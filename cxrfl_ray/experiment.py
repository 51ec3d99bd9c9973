"""What every run needs before it trains: the dataset checked against the task, the client
plan, the evaluation views, and data loaders, built the same way for every caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrfl_ray.config import ConfigError, ExperimentConfig, build_config
from cxrfl_ray.data.partition import PartitionError, Plan, evaluation_plan, plan_partition
from cxrfl_ray.data.store import DatasetError, StoredDataset, open_dataset
from cxrfl_ray.data.torch_dataset import ClientImages
from cxrfl_ray.tasks import TASKS, Task


@dataclass
class Prepared:
    """A validated experiment's data side."""

    cfg: ExperimentConfig
    dataset: StoredDataset
    task: Task
    plan: Plan
    views: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    _eval_images: dict[bytes, ClientImages] = field(default_factory=dict, repr=False)

    @property
    def label_names(self) -> list[str]:
        return self.dataset.label_names

    @property
    def num_classes(self) -> int:
        return max(len(self.label_names), 1)

    @property
    def pooled_train_rows(self) -> np.ndarray:
        return np.sort(np.concatenate(self.plan.clients))

    def images(self, rows: np.ndarray, train: bool, seed_offset: int = 0) -> ClientImages:
        """The rows as a Dataset; evaluation sets are kept, so every round reuses their bytes
        instead of reading the same row groups again."""
        if not train:
            key = np.asarray(rows, dtype=np.int64).tobytes()
            if key not in self._eval_images:
                self._eval_images[key] = self._make_images(rows, train=False, seed_offset=0)
            return self._eval_images[key]
        return self._make_images(rows, train, seed_offset)

    def _make_images(self, rows: np.ndarray, train: bool, seed_offset: int) -> ClientImages:
        d = self.cfg.data
        return ClientImages(self.dataset, rows, task=self.task.name, size=d.size,
                            augment=d.augment if train else False, seed=self.cfg.seed + seed_offset,
                            channels=d.channels, normalize=d.normalization, cache_mb=d.cache_mb)

    def loader(self, rows: np.ndarray, train: bool, seed_offset: int = 0) -> DataLoader:
        t = self.cfg.train
        generator = torch.Generator().manual_seed(self.cfg.seed + seed_offset)
        return DataLoader(self.images(rows, train, seed_offset),
                          batch_size=t.batch_size if train else t.eval_batch_size,
                          shuffle=train, generator=generator if train else None,
                          num_workers=self.cfg.data.num_workers, drop_last=False)


def evaluate_views(prep: Prepared, model, device, loss_fn, keys) -> dict[tuple[str, str], dict[str, float]]:
    """Metrics of each view in ``keys``, from ONE model pass over the union of their rows
    (site views are subsets of the test split; they are not recomputed)."""
    keys = [k for k in keys if k in prep.views]
    if not keys:
        return {}
    rows = np.unique(np.concatenate([prep.views[k] for k in keys]))
    outputs = prep.task.collect(model, prep.loader(rows, train=False), device, loss_fn)
    return {k: prep.task.summarise(prep.task.subset(outputs, np.searchsorted(rows, prep.views[k])))
            for k in keys}


Role = Literal["simulation", "site", "server"]


def resolve_site_clients(cfg: ExperimentConfig, ds: StoredDataset, role: Role = "simulation") -> ExperimentConfig:
    """``partition.clients: sites`` becomes the number of the dataset's training sites (held-out
    sites excluded), so one preset fits a federation of any size; other configs are unchanged."""
    if cfg.partition.clients != "sites":
        return cfg
    if role != "simulation":
        raise ConfigError("partition.clients 'sites': in a real federation the sites are the SuperNodes; "
                          "set partition.clients to their number")
    held = set(cfg.data.holdout_sites)
    train, meta = set(cfg.data.train_splits), ds.metadata  # a test-only site is no client
    sites = sorted({s for s, split in zip(meta.column("site").to_pylist(), meta.column("split").to_pylist())
                    if split in train and s not in held})
    if not sites:
        raise ConfigError(f"partition.clients 'sites': dataset {ds.path} has no training site "
                          f"(sites {sorted(ds.card['counts']['site'])}, held out {sorted(held)})")
    data = cfg.model_dump(mode="json")
    data["partition"]["clients"] = len(sites)
    return build_config(data, source=f"(partition.clients: sites = {len(sites)} in {ds.path})")


def prepare(cfg: ExperimentConfig, role: Role = "simulation") -> Prepared:
    """Open the dataset, check it fits the task, plan the clients and the evaluation views.

    Every check runs here, before any training or Ray start, and names what is wrong. ``role``:
    a simulation plans ``cfg.partition``'s clients over the dataset. In a real federation the
    dataset is one hospital's own (``site``: all its training rows are its one client), or the
    server's evaluation data (``server``: no clients).
    """
    try:
        ds = open_dataset(cfg.data.path)
    except DatasetError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    task = TASKS[cfg.task]
    card = ds.card
    cfg = resolve_site_clients(cfg, ds, role)
    if task.needs_masks and card.get("num_masks", 0) == 0:
        raise ConfigError(
            f"task {cfg.task!r} needs lung masks, but dataset {ds.path} has none (num_masks=0)"
        )
    if cfg.task == "classification":
        labelled = sum(v for k, v in card["counts"]["label"].items() if k != "none")
        if not labelled:
            raise ConfigError(f"task 'classification' needs labels, but dataset {ds.path} has none")
        if cfg.train.class_weights is not None and len(cfg.train.class_weights) != len(ds.label_names):
            raise ConfigError(
                f"train.class_weights has {len(cfg.train.class_weights)} values for "
                f"{len(ds.label_names)} classes {ds.label_names}"
            )
    p = cfg.partition
    seed = cfg.seed if p.seed is None else p.seed  # a sweep's seeds vary the model, not the clients' data
    try:
        if role == "simulation":
            plan = plan_partition(ds, p.scheme, p.clients, seed, holdout_sites=cfg.data.holdout_sites,
                                  train_splits=cfg.data.train_splits, **p.scheme_args())
        elif role == "site":
            plan = plan_partition(ds, "iid", 1, seed, train_splits=cfg.data.train_splits)
        else:
            plan = evaluation_plan(ds, seed, holdout_sites=cfg.data.holdout_sites,
                                   train_splits=cfg.data.train_splits)
    except PartitionError as exc:
        raise ConfigError(f"{'partition' if role == 'simulation' else f'{role} dataset {ds.path}'}: {exc}") from None
    meta = ds.metadata
    sites = np.asarray(meta.column("site").to_pylist())
    labels = meta.column("label").to_numpy()
    has_mask = None
    if task.needs_masks and card.get("num_masks") != ds.num_rows:
        # Rows without a mask (or classification rows without a label) cannot be used.
        has_mask = ~ds.take(np.arange(ds.num_rows), ["mask"]).column("mask").is_null().to_numpy(zero_copy_only=False)
    if task.needs_masks:
        usable = has_mask if has_mask is not None else np.ones(ds.num_rows, dtype=bool)
    else:
        usable = labels >= 0

    def keep(rows: np.ndarray) -> np.ndarray:
        return rows[usable[rows]]

    plan.clients = [keep(c) for c in plan.clients]
    empty = [i for i, c in enumerate(plan.clients) if c.size == 0]
    if empty:
        raise ConfigError(f"partition: client(s) {empty[:5]} of {ds.path} have no usable rows "
                          f"(no {'mask' if has_mask is not None else 'label'})")
    views: dict[tuple[str, str], np.ndarray] = {}
    for split, rows in plan.central.items():
        rows = keep(rows)
        views[("central", split)] = rows
        if split == cfg.data.test_split:
            for site in np.unique(sites[rows]):
                views[("site", str(site))] = rows[sites[rows] == site]
    for site, rows in plan.holdout.items():
        views[("holdout", site)] = keep(rows)
    return Prepared(cfg, ds, task, plan, {k: v for k, v in views.items() if v.size})
