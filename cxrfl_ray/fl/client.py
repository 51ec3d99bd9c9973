"""The Flower ClientApp: one virtual client's local training, with the same task code as the
baselines. Importable (so Ray actors import it once): the prepared data and the model stay
resident per actor in ``_RUNTIMES`` instead of being rebuilt for every message."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from cxrfl_ray.config import ExperimentConfig, build_config
from cxrfl_ray.data.torch_dataset import ClientImages
from cxrfl_ray.experiment import Prepared, prepare
from cxrfl_ray.fl.algorithms import Algorithm, ClientRound, make_algorithm
from cxrfl_ray.fl.algorithms.base import trainable_state
from cxrfl_ray.fl.arrays import npy_record, torch_views
from cxrfl_ray.fl.flat_weights import FlatWeights
from cxrfl_ray.fl.privacy import privacy_class
from cxrfl_ray.fl.compression import compressed_work
from cxrfl_ray.fl.client_state import STATE_DIR_KEY, STATE_ROUND_KEY, ClientStateStore
from cxrfl_ray.fl.strategies import CLIENT_KEY
from cxrfl_ray.fl.system.policy import BUDGET_KEY
from cxrfl_ray.tasks.models import create_model
from cxrfl_ray.tasks.training import (LocalHooks, make_optimizer, make_scheduler, seed_everything, select_device,
                                      train_local)

EXPERIMENT_KEY = "experiment"  # the resolved config YAML, carried by every message
SITE_DATA_KEY = "data-path"  # a real SuperNode's own dataset: --node-config 'data-path="/data/site"'


class InjectedClientFailure(RuntimeError):
    """A failure injected by ``faults.client_failure_rate`` (to test and study dropout)."""


@dataclass
class Runtime:
    """What an actor keeps between messages for one experiment."""

    cfg: ExperimentConfig
    prep: Prepared
    model: torch.nn.Module
    device: torch.device
    loss_fn: torch.nn.Module
    algorithm: Algorithm
    site: bool = False  # a real federation's node: its own dataset is its one client
    images: dict[int, ClientImages] = field(default_factory=dict)
    weights: FlatWeights = field(init=False)  # the model's weights in one buffer (one-copy load and reply)

    def __post_init__(self) -> None:
        self.weights = FlatWeights(self.model)

    def load_global(self, arrays: ArrayRecord) -> None:
        """The global weights into the model: one copy of a packed record, else ``load_global``."""
        if not self.weights.load(arrays):
            load_global(self.model, arrays)

    def rows(self, cid: int) -> np.ndarray:
        return self.prep.plan.clients[0 if self.site else cid]

    def client_images(self, cid: int) -> ClientImages:
        if cid not in self.images:
            self.images[cid] = self.prep.images(self.rows(cid), train=True, seed_offset=cid)
        return self.images[cid]


_RUNTIMES: dict[str, Runtime] = {}


def runtime(config_yaml: str, site_data: str | None = None) -> Runtime:
    """The actor's runtime for the experiment in a message. ``site_data``: in a real federation the
    node trains on its own dataset (all its training rows), not on its rows of the plan."""
    key = hashlib.sha1(f"{config_yaml}\0{site_data or ''}".encode()).hexdigest()
    if key not in _RUNTIMES:
        import yaml

        raw = yaml.safe_load(config_yaml)
        if site_data:
            raw["data"]["path"] = site_data
        cfg = build_config(raw, source="(message)")
        # A virtual client gets the CPUs Ray gave it, not the whole machine (no oversubscription);
        # a real site's node has its machine to itself.
        if cfg.train.num_threads or not site_data:
            torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.fl.client_num_cpus)))
        prep = prepare(cfg, role="site" if site_data else "simulation")
        device = select_device(cfg.train.device)
        model = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes, norm=cfg.model.norm).to(device)
        loss_fn = prep.task.make_loss(cfg.loss_name, cfg.train.class_weights).to(device)
        _RUNTIMES.clear()  # one experiment per actor at a time
        _RUNTIMES[key] = Runtime(cfg, prep, model, device, loss_fn, make_algorithm(cfg), site=bool(site_data))
    return _RUNTIMES[key]


def warm(config_yaml: str) -> None:
    """Build this actor's runtime for an experiment before its first message arrives (the engine
    queues it on every actor as it starts). A failure here is left to that message, which raises
    it again and is reported as the client's failure."""
    try:
        runtime(config_yaml)
    except Exception:  # noqa: BLE001 - reported by the first message
        pass


def weights_record(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable state in Flower's npy form (the server's first global weights)."""
    return npy_record(trainable_state(model))


def load_global(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy the global weights into the model, straight from the message's memory (one copy)."""
    missing, unexpected = model.load_state_dict(torch_views(arrays), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"global weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _failure_draw(seed: int, server_round: int, cid: int) -> float:
    return float(np.random.default_rng([seed, 13, server_round, cid]).random())


def fit_client(rt: Runtime, cid: int, server_round: int, hooks: LocalHooks | None = None,
               budget: int | None = None) -> dict[str, float]:
    """One client's local work in one round, on the model as it is (the global weights);
    ``budget``: at most that many local steps (a slow client's partial work, fl.straggler partial).

    Every random choice comes from (seed, round, client), so the result does not depend on
    which actor or process runs it: the engine and the in-process benchmark floor both call this.
    """
    cfg = rt.cfg
    seed_everything(cfg.seed * 1_000_003 + server_round * 10_007 + cid)
    images = rt.client_images(cid)
    loader = DataLoader(images, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed + 7919 * server_round + cid),
                        num_workers=cfg.data.num_workers)
    optimizer = make_optimizer(rt.model.parameters(), cfg.train)
    per_round = (cfg.train.steps or len(loader)) * cfg.train.epochs
    scheduler = make_scheduler(optimizer, cfg.train, per_round * cfg.fl.rounds, per_round * (server_round - 1))
    epochs, steps = (1, budget) if budget is not None and budget < per_round else (cfg.train.epochs, cfg.train.steps)
    return train_local(rt.model, loader, rt.loss_fn, optimizer, rt.device, epochs=epochs,
                       steps=steps, first_epoch=server_round * cfg.train.epochs, hooks=hooks,
                       scheduler=scheduler)


def _site_data(context: Context) -> str | None:
    return str(context.node_config[SITE_DATA_KEY]) if SITE_DATA_KEY in context.node_config else None


def _state_store(rt: Runtime, context: Context, config, cid: int) -> ClientStateStore | None:
    """Where this client's state files are: on a real site its own ``state-dir`` (node config),
    in a simulation the run folder the server names."""
    if not rt.algorithm.keeps_client_state:
        return None
    root = context.node_config.get(STATE_DIR_KEY) or config.get(STATE_DIR_KEY)
    if not root:
        raise ValueError(f"{rt.algorithm.name} keeps client state, but neither the node config nor the message "
                         f"names a {STATE_DIR_KEY}")
    return ClientStateStore(str(root), cid)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    rt = runtime(str(config[EXPERIMENT_KEY]), _site_data(context))
    cid, server_round = int(config[CLIENT_KEY]), int(config["server-round"])
    _maybe_fail(rt.cfg, server_round, cid)
    started = time.perf_counter()
    rt.load_global(msg.content["arrays"])
    work = _begin_work(rt, msg, context, cid, server_round)
    budget = int(config[BUDGET_KEY]) if BUDGET_KEY in config else None  # the round policy's partial work
    fit = fit_client(rt, cid, server_round, hooks=work, budget=budget)
    extra = work.finish(fit)
    metrics = MetricRecord({CLIENT_KEY: cid, "num-examples": len(rt.client_images(cid)), "train_loss": fit["loss"],
                            "steps": fit["steps"], "fit_seconds": time.perf_counter() - started})
    arrays = rt.weights.record_like(work.reply_weights(), like=msg.content["arrays"])  # raw inside a simulation
    content = RecordDict({"arrays": arrays, "metrics": metrics, **extra})
    return Message(content=content, reply_to=msg)


def _maybe_fail(cfg: ExperimentConfig, server_round: int, cid: int) -> None:
    """The seeded failure of ``faults.client_failure_rate`` (to test and study dropout)."""
    if _failure_draw(cfg.seed, server_round, cid) < cfg.faults.client_failure_rate:
        if cfg.faults.failure == "exit":
            os._exit(1)  # the actor's process dies; the backend replaces it
        raise InjectedClientFailure(f"injected failure of client {cid} in round {server_round}")


def _begin_work(rt: Runtime, msg: Message, context: Context, cid: int, server_round: int):
    """The algorithm's local work for this client's round, begun (the model holds the global weights)."""
    config = msg.content["config"]
    ctx = ClientRound(cid, server_round, rt.model, rt.cfg, msg.content, _state_store(rt, context, config, cid),
                      int(config.get(STATE_ROUND_KEY, 0)), len(rt.client_images(cid)))
    # The algorithm's work, trained as the privacy mode says, its reply compressed (fl.compression).
    work = compressed_work(rt.cfg, privacy_class(rt.cfg.privacy.mode).local_work(rt.cfg, rt.algorithm.local(ctx), ctx),
                           ctx)
    work.begin()
    return work


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the client's own rows (client-side evaluation)."""
    config = msg.content["config"]
    rt = runtime(str(config[EXPERIMENT_KEY]), _site_data(context))
    cid = int(config[CLIENT_KEY])
    rt.load_global(msg.content["arrays"])
    rows = rt.rows(cid)
    metrics = rt.prep.task.evaluate(rt.model, rt.prep.loader(rows, train=False), rt.device, rt.loss_fn)
    record = {CLIENT_KEY: cid, "num-examples": int(rows.size)}
    record.update({k: float(v) for k, v in metrics.items() if not k.startswith("cm_")})
    return Message(content=RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)
