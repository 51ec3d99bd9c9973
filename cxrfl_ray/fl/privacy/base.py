"""The privacy side of the seam: one object on the server for the whole run (``ServerHooks``), and
on each client a wrapper round the algorithm's local work. ``NoPrivacy`` (``privacy.mode: none``)
changes nothing; ``client_level`` and ``sample_level`` are the two kinds of DP (docs/PRIVACY.md).

server side (``fl/rounds.finish_round``)
  privacy.aggregate(round, arrays, replies, aggregate)
                                  the algorithm's ``aggregate`` on replies it may clip and noise
  privacy.account(round, replies) -> {id: metrics} logged under scope ``privacy`` (epsilon, ...)
  privacy.summary()               -> summary.json ``privacy``
  privacy.state() / restore()     accountant and clip state, in the round state (exact --resume)
client side (``fl/client``)
  Privacy.local_work(cfg, work, ctx)  the algorithm's local work, privatised (DP-SGD) or as it is
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.tasks.training import LocalHooks

Aggregate = Callable[[list[Message]], tuple[ArrayRecord | None, MetricRecord | None]]
SCOPE = "privacy"  # metrics.parquet scope of the accountant's rows


class NoPrivacy:
    """``privacy.mode: none``: the seam's no-op."""

    mode = "none"

    def __init__(self, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        """Refuse what cannot run (a ``ValueError`` naming the field), before Ray starts."""

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message], aggregate: Aggregate):
        return aggregate(replies)

    def account(self, server_round: int, replies: list[Message]) -> dict[str, dict[str, float]]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"mode": "none"}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        """Back from ``state()`` on ``--resume``."""

    # client side (a class method: an actor builds no server mechanism)
    @classmethod
    def local_work(cls, cfg: ExperimentConfig, work: LocalHooks, ctx) -> LocalHooks:
        """The algorithm's local work ``work`` for ``ctx`` (a ``ClientRound``), as this mode trains it."""
        return work
