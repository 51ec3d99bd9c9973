"""The seam every federated algorithm plugs into: small hook objects the round loop calls.

Shaped after pfl-research (``train_one_user`` on the client, ``process_aggregated_statistics``
on the server) and Flower's strategy hooks. An ``Algorithm`` lives on the server for the whole
run and in each Ray actor (built from the config); for one client's round it hands out a
``LocalWork``:

client side (``fl/client.train``)             server side (``fl/rounds.finish_round``)
  work = algorithm.local(ClientRound(...))      records = algorithm.message_records(round, arrays)
  work.begin()          model holds global      -> sent with every training message
  train_local(hooks=work)  loss_term, before_step
  work.reply_weights()  what the server averages  algorithm.aggregate(strategy, round, arrays, replies)
  work.finish(fit)      extra reply records,      -> new global arrays (Flower's math by default)
                        client state written     algorithm.state() / restore(): server state in
                                                  the round state, so --resume is exact

Plain FedAvg (the base classes) adds nothing. Per-client state goes through ``ClientRound.store``
(``fl/client_state.py``): files per client, never kept in the actor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.client_state import ClientStateStore
from cxrfl_ray.tasks.training import LocalHooks

WEIGHTS_KEY = "arrays"  # the one ArrayRecord Flower's aggregation reads in a reply


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without BatchNorm's step counters, which must not be averaged."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@functools.cache
def _skeleton(name: str, task: str, channels: int, norm: str) -> nn.Module:
    from cxrfl_ray.tasks.models import create_model

    with torch.device("meta"):  # the layers without their memory (milliseconds for a ResNet)
        return create_model(name, task, channels, 2, norm=norm)


def model_skeleton(cfg: ExperimentConfig) -> nn.Module:
    """The config's model on the meta device, to read its structure (which layers, which buffers)
    on the server without allocating its weights; built once per model."""
    return _skeleton(cfg.model.name, cfg.task, cfg.data.channels, cfg.model.norm)


@dataclass
class ClientRound:
    """One client's round as an algorithm sees it (client side)."""

    cid: int
    server_round: int
    model: nn.Module  # holds the round's global weights when the work begins
    cfg: ExperimentConfig
    content: RecordDict  # the training message: global "arrays", "config", the algorithm's records
    store: ClientStateStore | None  # the client's state files (algorithms with client state only)
    state_round: int = 0  # round of the client's last accepted state (0: none yet)
    rows: int = 0  # the client's training rows (DP-SGD's sampling rate batch_size / rows; 0: not known)

    def load_state(self) -> dict[str, torch.Tensor]:
        return self.store.load(self.state_round) if self.store is not None else {}

    def save_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.store is None:
            raise RuntimeError("this algorithm keeps no client state (keeps_client_state is False)")
        self.store.save(self.server_round, tensors, keep_from=self.state_round)


class LocalWork(LocalHooks):
    """One client's local work in one round; FedAvg's does nothing beyond training."""

    def __init__(self, algorithm: "Algorithm", ctx: ClientRound) -> None:
        self.algorithm, self.ctx = algorithm, ctx

    def begin(self) -> None:
        """Before training; the model holds the global weights."""

    def reply_weights(self) -> dict[str, torch.Tensor]:
        """The tensors sent back for averaging."""
        return trainable_state(self.ctx.model)

    def finish(self, fit: dict[str, float]) -> dict[str, ArrayRecord]:
        """After training: extra records for the reply (and the client's state, saved here)."""
        return {}


class Algorithm:
    """A federated algorithm's hooks; this base is FedAvg (Flower's strategy does the math)."""

    name = "fedavg"
    options: tuple[str, ...] = ()  # keys of fl.strategy.options that are the algorithm's, not Flower's
    keeps_client_state = False  # whether clients read and write state files
    personal = False  # whether each client's own model (global + its state) is evaluated too

    def __init__(self, cfg: ExperimentConfig, options: dict[str, Any]) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Refuse a config the algorithm cannot run (a ``ValueError`` naming the field), before Ray."""

    # client side
    def local(self, ctx: ClientRound) -> LocalWork:
        return LocalWork(self, ctx)

    # server side
    def message_records(self, server_round: int, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """Records sent with every training message of the round besides the global weights."""
        return {}

    def aggregate(self, strategy, server_round: int, arrays: ArrayRecord,
                  replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global weights from the round's usable replies (client-id order)."""
        return strategy.aggregate_train(server_round, replies)

    def evaluate_personal(self, server_round: int, model: nn.Module, prep, accepted,
                          evaluate: Callable[[list[tuple[str, str]]], dict]) -> dict[tuple[str, str], dict[str, float]]:
        """Results of the clients' own models (``personal`` algorithms), as ``{(scope, id): metrics}``
        logged beside the global model's. ``model`` holds the global weights and must hold them
        again on return; ``accepted`` says which state file of each client counts;
        ``evaluate(view keys)`` evaluates ``model`` as it is on ``prep.views``."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Server-side state saved with the round state."""
        return {}

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        """Back from ``state()`` on ``--resume``."""


def take_records(replies: Iterable[Message], *names: str) -> list[dict[str, ArrayRecord]]:
    """Remove the named extra records from each reply (Flower's aggregation wants exactly one
    ArrayRecord per reply) and return them, in the replies' order."""
    taken = []
    for reply in replies:
        taken.append({name: reply.content[name] for name in names if name in reply.content})
        for name in names:
            if name in reply.content:
                del reply.content[name]
    return taken
