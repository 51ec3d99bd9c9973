"""SCAFFOLD (Karimireddy et al. 2020), option II: control variates correct each client's drift.

The server keeps c, one tensor per trainable parameter (``requires_grad``; BatchNorm's running
statistics have no gradient and none), and sends it with every training message (``C_KEY``).
Client i keeps c_i in its state file (``fl/client_state.py``; zeros before it first trains),
adds c - c_i to every gradient before the optimiser step, and after its K steps sets

    c_i+ = c_i - c + (x - y_i) / sum_k(lr_k)        (option II; the paper's K * lr for a constant rate)

which, for plain SGD, is the lr-weighted mean of the raw gradients it saw. It saves c_i+ and
replies with delta c_i = c_i+ - c_i (``DELTA_KEY``). The server sets

    x <- x + eta_g * (avg_i(y_i) - x)      avg: Flower's FedAvg, weighted by examples
    c <- c + (1/N) * sum_{i in S} delta c_i   N: all clients of the plan, S: the round's usable replies

so c stays the mean of all clients' accepted c_i. The paper averages the y_i unweighted; we keep
Flower's example weighting, the same as ``fedavg``/``fedprox``, so a benchmark row differs from
FedAvg's only by the control variates (with equal-sized clients both are the same). ``server_lr``
(eta_g, default 1: plain averaging) is applied to the parameters only; buffers (BatchNorm
statistics) are averaged as FedAvg does. c starts at zero and is not sent while it has never been
updated (round 1 messages carry no ``C_KEY``: the client takes zeros).

Cost: c, c_i and delta c_i are each the size of the parameters (resnet18: 44.7 MB in float32), so
a training message and its reply carry twice FedAvg's bytes, and a client keeps one or two state
files (the accepted one and its newest). In a real federation (``fl/deploy.py``) the files are on
the site (its ``state-dir``), and the server holds only c and each site's accepted round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.algorithms.base import Algorithm, LocalWork, take_records
from cxrfl_ray.fl.arrays import npy_record, record_like, record_of, torch_views, view
from cxrfl_ray.fl.strategies import reply_client

C_KEY = "scaffold-c"  # training message: the server's control variate
DELTA_KEY = "scaffold-dc"  # training reply: the client's control delta c_i+ - c_i


class ScaffoldWork(LocalWork):
    """One client's round: corrected gradients, then option II's c_i+."""

    def begin(self) -> None:
        model, content = self.ctx.model, self.ctx.content
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        c = torch_views(content[C_KEY]) if C_KEY in content else {}
        c_i = self.ctx.load_state()
        for name, found in (("the server's control variate", c), (f"client {self.ctx.cid}'s state", c_i)):
            if found and (missing := sorted(self.params.keys() - found.keys())):
                raise ValueError(f"scaffold: {name} has no tensor for parameter(s) {missing[:3]}")
        zero = lambda k: torch.zeros_like(self.params[k])  # noqa: E731
        self.x = {k: p.detach().clone() for k, p in self.params.items()}
        self.c_i = {k: c_i[k].to(p) if k in c_i else zero(k) for k, p in self.params.items()}
        self.correction = {k: (c[k].to(p) if k in c else zero(k)) - self.c_i[k] for k, p in self.params.items()}
        self.lr_sum = 0.0

    def before_step(self, model, optimizer) -> None:
        """grad <- grad + c - c_i; a parameter without a gradient this step (unused in the
        forward) still moves by the correction, as the paper's update does."""
        for k, p in self.params.items():
            if p.grad is None:
                p.grad = self.correction[k].clone()
            else:
                p.grad.add_(self.correction[k])
        self.lr_sum += float(optimizer.param_groups[0]["lr"])  # this step's rate (a cosine schedule moves it)

    def finish(self, fit: dict[str, float]) -> dict[str, ArrayRecord]:
        with torch.no_grad():  # in place: x and c_i are not needed after this (two model-sized buffers less)
            if self.lr_sum > 0:  # c_i - c + (x - y_i) / sum(lr) = (x - y_i) / sum(lr) - (c - c_i)
                new = {k: self.x[k].sub_(p).div_(self.lr_sum).sub_(self.correction[k]) for k, p in self.params.items()}
            else:  # no step taken: nothing learnt about the gradient
                new = {k: v.clone() for k, v in self.c_i.items()}
            delta = {k: self.c_i[k].neg_().add_(new[k]).cpu() for k in new}
            new = {k: v.cpu() for k, v in new.items()}
        self.ctx.save_state(new)
        return {DELTA_KEY: record_like(delta, like=self.ctx.content["arrays"])}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Scaffold(Algorithm):
    """Server side: c, the server step, and the c update (see the module docstring)."""

    name = "scaffold"
    options = ("server_lr",)
    keeps_client_state = True

    def __init__(self, cfg: ExperimentConfig, options: dict[str, Any]) -> None:
        super().__init__(cfg, options)
        self.server_lr = float(options.get("server_lr", 1.0))
        self.c: dict[str, np.ndarray] = {}  # float32, one per trainable parameter once a round was aggregated
        self._record: ArrayRecord | None = None  # c as sent (one object for all messages of a round)

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Option II reads the gradient off the SGD displacement (x - y_i) / sum(lr): it holds for
        plain SGD steps only. Momentum is refused rather than approximated: its steps move by the
        momentum buffer, so (x - y_i) / sum(lr) overestimates the gradient (by up to 1/(1 - momentum),
        10x at the default 0.9) and every c_i would be biased. Weight decay is allowed: c_i is then
        the gradient of the regularised local loss, the objective the client actually descends."""
        t = cfg.train
        if t.optimizer != "sgd":
            raise ValueError(f"train.optimizer {t.optimizer!r}: scaffold (option II) needs plain SGD steps; "
                             f"set train.optimizer=sgd and train.momentum=0")
        if t.momentum > 0:
            raise ValueError(f"train.momentum {t.momentum:g}: scaffold (option II) needs plain SGD steps "
                             f"(momentum biases c_i); set train.momentum=0")
        lr = cfg.fl.strategy.options.get("server_lr", 1.0)
        if _number(lr) is None or not math.isfinite(_number(lr)) or _number(lr) <= 0:
            raise ValueError(f"fl.strategy.options.server_lr {lr!r}: scaffold's server step size must be a "
                             f"number > 0 (1: plain averaging)")

    def local(self, ctx) -> ScaffoldWork:
        return ScaffoldWork(self, ctx)

    @property
    def num_clients(self) -> int:
        n = self.cfg.partition.clients
        if not isinstance(n, int):  # 'sites' is resolved by experiment.prepare before the server starts
            raise ValueError(f"scaffold needs the number of clients, got partition.clients {n!r}")
        return n

    def message_records(self, server_round: int, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        if not self.c:
            return {}
        if self._record is None:
            self._record = npy_record(self.c)  # sent to the clients: Flower's form
        return {C_KEY: self._record}

    def aggregate(self, strategy, server_round: int, arrays: ArrayRecord, replies):
        replies = sorted(replies, key=reply_client)
        deltas = take_records(replies, DELTA_KEY)
        missing = [reply_client(r) for r, d in zip(replies, deltas) if DELTA_KEY not in d]
        if missing:
            raise ValueError(f"scaffold: client(s) {missing} replied without a control delta ({DELTA_KEY})")
        new, metrics = strategy.aggregate_train(server_round, replies)
        if new is None or not deltas:
            return new, metrics
        names = list(deltas[0][DELTA_KEY].keys())  # the trainable parameters
        if self.server_lr != 1.0:  # x + eta_g * (avg - x) for the parameters, in their dtype
            x = {k: view(arrays[k]) for k in names}
            stepped = npy_record({k: (x[k] + self.server_lr * (view(new[k]).astype(np.float64) - x[k])).astype(x[k].dtype)
                                  for k in names})
            new = record_of({k: stepped[k] if k in names else v for k, v in new.items()})
        n = self.num_clients
        for k in names:  # float32, summed in client-id order (seeded runs stay bit-identical)
            total = np.array(view(deltas[0][DELTA_KEY][k]), dtype=np.float32)
            for d in deltas[1:]:
                total += view(d[DELTA_KEY][k])
            total /= n
            self.c[k] = total if k not in self.c else self.c[k] + total
        self._record = None
        return new, metrics

    def state(self) -> dict[str, np.ndarray]:
        return {f"c/{k}": v for k, v in self.c.items()}

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        self.c = {k[2:]: np.array(v, np.float32) for k, v in tensors.items() if k.startswith("c/")}
        self._record = None
