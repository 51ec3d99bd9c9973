"""FedBN (Li et al. 2021): BatchNorm stays local to each client; the server averages the rest.

Hospitals' scanners shift the features each BatchNorm layer sees, so averaged BatchNorm
statistics describe no site (on phantoms they broke FedAvg: val Jaccard 0.21 against 0.92 with
GroupNorm). Under FedBN each client keeps every ``_BatchNorm`` module's weight, bias, running
mean/var and step counter in its own state file (``fl/client_state.py``) and never sends them:

client (``FedBNWork``)                           server (``FedBN``)
  begin   its accepted BN state over the global   aggregate  Flower's FedAvg of the non-BN tensors,
          weights (none yet: the global's BN)                 the previous global's BN kept
  reply   every trainable tensor but BN's          evaluate_personal  each site's model (global +
  finish  BN tensors -> RUN/clients/<cid>/<r>                 its clients' BN) on its own test rows

The global model's BN tensors therefore stay at their initial values, and its own evaluation
(scope ``central``/``site``/``holdout``, as for every strategy) shows what a site without a BN of
its own (a new hospital) would get; the scope ``personal`` shows what each site's model does, and
the scope ``adapted`` what a new hospital gets by computing its own BatchNorm statistics from its
unlabeled images (AdaBN, Li et al. 2016; ``fl.strategy.options.unseen_bn``, default ``adabn``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cxrfl_ray.fl.algorithms.base import Algorithm, LocalWork, model_skeleton, trainable_state
from cxrfl_ray.fl.arrays import record_of
from cxrfl_ray.fl.client_state import ClientStateStore

log = logging.getLogger("cxrfl.fl")

PERSONAL_SCOPE = "personal"
ADAPTED_SCOPE = "adapted"  # the global model with BatchNorm statistics of a held-out site's own images (AdaBN)
DEFAULT_PERSONAL_CLIENTS = 8
UNSEEN_BN = ("adabn", "none")


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm module (parameters and buffers, ``num_batches_tracked``
    included), in the model's order."""
    return [f"{name}.{key}" if name else key for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) for key in module.state_dict()]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader, device: torch.device) -> None:
    """AdaBN: every BatchNorm layer's running statistics recomputed from the images of ``loader``
    (labels unused), as the average of its batches' statistics; nothing else changes (other layers
    stay in eval mode)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    try:
        for x, _ in loader:
            model(x.to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


def load_batchnorm(model: nn.Module, state: dict[str, torch.Tensor], keys: list[str], what: str) -> None:
    """Copy a BN state into the model; one that does not fit the model's BN layers is an error."""
    if set(state) != set(keys):
        extra, missing = sorted(set(state) - set(keys)), sorted(set(keys) - set(state))
        raise ValueError(f"{what} does not fit the model's BatchNorm layers: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


class FedBNWork(LocalWork):
    """One client's FedBN round: train with its own BN, send the rest, keep its BN."""

    def begin(self) -> None:
        model = self.ctx.model
        self.keys = batchnorm_keys(model)
        state = self.ctx.load_state()
        if state:
            load_batchnorm(model, state, self.keys,
                           f"client {self.ctx.cid}'s state of round {self.ctx.state_round}")
        else:  # first round: the global BN; the step counters (never sent) start at 0 whichever
            # client this actor played before, so the saved state does not depend on the actor
            for module in model.modules():
                if isinstance(module, _BatchNorm) and module.num_batches_tracked is not None:
                    module.num_batches_tracked.zero_()

    def reply_weights(self) -> dict[str, torch.Tensor]:
        local = set(self.keys)
        return {k: v for k, v in trainable_state(self.ctx.model).items() if k not in local}

    def finish(self, fit: dict[str, float]) -> dict[str, ArrayRecord]:
        state = self.ctx.model.state_dict()
        self.ctx.save_state({k: state[k] for k in self.keys})
        return {}


class FedBN(Algorithm):
    """FedBN's hooks; the averaging of the non-BN tensors is Flower's FedAvg.

    ``fl.strategy.options.personal_clients`` (default 8, 0: none): how many clients per site the
    personalised evaluation runs each round (see ``evaluate_personal``); ``unseen_bn`` (``adabn``
    or ``none``): how the global model meets a held-out site."""

    name = "fedbn"
    options = ("personal_clients", "unseen_bn")
    keeps_client_state = True
    personal = True

    def __init__(self, cfg, options) -> None:
        super().__init__(cfg, options)
        self.personal_clients = int(options.get("personal_clients", DEFAULT_PERSONAL_CLIENTS))
        self.unseen_bn = str(options.get("unseen_bn", "adabn"))
        self._sites: dict[str, list[int]] | None = None

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a model without BatchNorm: FedBN would then be FedAvg under another name, and a
        benchmark would report a method that did not run (an error costs less than a wrong table)."""
        value = cfg.fl.strategy.options.get("personal_clients", DEFAULT_PERSONAL_CLIENTS)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fl.strategy.options.personal_clients: a count >= 0 of clients evaluated per site, "
                             f"not {value!r}")
        unseen = cfg.fl.strategy.options.get("unseen_bn", "adabn")
        if unseen not in UNSEEN_BN:
            raise ValueError(f"fl.strategy.options.unseen_bn: {' or '.join(UNSEEN_BN)} (how the global model meets "
                             f"a held-out site), not {unseen!r}")
        fix = "use model.norm: batch with a BatchNorm model, or fl.strategy.name: fedavg"
        if cfg.model.norm != "batch":
            raise ValueError(f"fl.strategy.name fedbn keeps BatchNorm local, but model.norm is {cfg.model.norm!r} "
                             f"(no BatchNorm layer): FedBN would be FedAvg; {fix}")
        if not batchnorm_keys(model_skeleton(cfg)):
            raise ValueError(f"fl.strategy.name fedbn keeps BatchNorm local, but model.name {cfg.model.name!r} has "
                             f"no BatchNorm layer: FedBN would be FedAvg; {fix}")

    def local(self, ctx):
        return FedBNWork(self, ctx)

    def aggregate(self, strategy, server_round, arrays, replies):
        """Flower's average of what the clients sent (every tensor but BN's), merged into a full
        global record in the previous global's key order, its BN tensors kept as they were."""
        averaged, metrics = strategy.aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        unknown = sorted(set(averaged.keys()) - set(arrays.keys()))
        if unknown:
            raise ValueError(f"fedbn: the clients sent tensors the global model does not have: {unknown[:3]}")
        return record_of({k: averaged[k] if k in averaged else arrays[k] for k in arrays.keys()}), metrics

    # personalised evaluation (server side, simulation only)

    def site_clients(self, prep) -> dict[str, list[int]]:
        """Per site with test rows (a ``("site", S)`` view): the clients whose training rows all
        come from S (``partition.scheme: site`` makes every client one), in a seeded order. A
        client with rows of several sites has no site of its own and is not evaluated here."""
        if self._sites is None:
            sites = np.asarray(prep.dataset.metadata.column("site").to_pylist())
            order = np.random.default_rng([self.cfg.seed, 15]).permutation(len(prep.plan.clients))
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            found: dict[str, list[int]] = {}
            for cid, rows in enumerate(prep.plan.clients):
                own = np.unique(sites[rows])
                if own.size == 1 and ("site", str(own[0])) in prep.views:
                    found.setdefault(str(own[0]), []).append(cid)
            self._sites = {s: sorted(c, key=lambda cid: rank[cid]) for s, c in sorted(found.items())}
            if not self._sites and self.personal_clients:
                log.warning("fedbn: no client trains on one site only (partition.scheme %s), so no site has a model "
                            "of its own to evaluate; partition.scheme: site gives each client one site",
                            self.cfg.partition.scheme)
        return self._sites

    def evaluate_personal(self, server_round, model, prep, accepted, evaluate):
        """Each site's model, the global weights plus a client's BN, on that site's test rows.

        Per site, up to ``personal_clients`` of its clients that have an accepted state (the first
        in a seeded order, so the same clients each round once they have trained) are evaluated,
        one pass over the site's test rows each, and the mean of their metrics is logged as
        ``("personal", S)`` with ``clients``: how many. With one client per site (``partition
        .scheme: site``, ``clients: sites``) that is the site's own model exactly. The cap keeps the
        cost per round at most ``personal_clients`` passes over the test split, whatever the
        number of clients: clients of one site are IID splits of it, so a few represent it.

        Held-out sites get the ``adapted`` scope (``evaluate_adapted``), on the server in either case.
        In a real federation (``accepted.root`` is None) the BN states are on the sites, out of
        the server's reach, and no personal result is returned: the way to one there is
        client-side evaluation (``fl.client_eval``) on each site with its own BN (the ClientApp's
        ``evaluate`` scores the global model as sent today; loading the site's BN there is the
        step left).
        """
        keys = batchnorm_keys(model)
        global_bn = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}
        results: dict[tuple[str, str], dict[str, float]] = {}
        on_server = accepted is not None and accepted.root is not None and self.personal_clients > 0
        try:
            if self.unseen_bn == "adabn":
                results.update(self.evaluate_adapted(model, prep, evaluate))
                model.load_state_dict(global_bn, strict=False)
            for site, clients in (self.site_clients(prep) if on_server else {}).items():
                chosen = [c for c in clients if accepted.rounds[c] > 0][: self.personal_clients]
                per_client = []
                for cid in chosen:
                    state = ClientStateStore(accepted.root, cid).load(int(accepted.rounds[cid]))
                    load_batchnorm(model, state, keys, f"client {cid}'s state of round {int(accepted.rounds[cid])}")
                    per_client.append(evaluate([("site", site)])[("site", site)])
                if per_client:
                    results[(PERSONAL_SCOPE, site)] = {
                        **{k: float(np.mean([m[k] for m in per_client])) for k in per_client[0]},
                        "clients": float(len(per_client))}
        finally:
            model.load_state_dict(global_bn, strict=False)
        return results

    def evaluate_adapted(self, model, prep, evaluate) -> dict[tuple[str, str], dict[str, float]]:
        """The global weights on each held-out site, with BatchNorm statistics computed from that
        site's own images (AdaBN): what a new hospital without a BN of its own can do with its
        unlabeled images before it scores the model. Transductive: the statistics come from the
        images scored (all of the held-out site's rows, as the ``holdout`` view scores them)."""
        device = next(model.parameters()).device
        results = {}
        for scope, site in [k for k in prep.views if k[0] == "holdout"]:
            adapt_batchnorm(model, prep.loader(prep.views[(scope, site)], train=False), device)
            results[(ADAPTED_SCOPE, site)] = evaluate([(scope, site)])[(scope, site)]
        return results
