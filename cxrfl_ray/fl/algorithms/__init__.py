"""Federated algorithms by name, on one seam (``base.py``): what a client does around its local
training and what the server does with the replies. The server's averaging itself stays
Flower's strategy (``fl/strategies.py``)."""

from __future__ import annotations

import importlib

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.algorithms.base import Algorithm, ClientRound, LocalWork

# name -> "module:Class" (imported when used, so an actor imports only the algorithm it runs)
ALGORITHMS: dict[str, str] = {
    "fedprox": "cxrfl_ray.fl.algorithms.fedprox:FedProx",
    "fedbn": "cxrfl_ray.fl.algorithms.fedbn:FedBN",
    "scaffold": "cxrfl_ray.fl.algorithms.scaffold:Scaffold",
    "fednova": "cxrfl_ray.fl.algorithms.fednova:FedNova",
}


def algorithm_class(strategy_name: str) -> type[Algorithm]:
    """The algorithm a strategy name brings (plain FedAvg hooks for Flower's own strategies)."""
    if strategy_name not in ALGORITHMS:
        return Algorithm
    module, _, cls = ALGORITHMS[strategy_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_algorithm(cfg: ExperimentConfig) -> Algorithm:
    cls = algorithm_class(cfg.fl.strategy.name)
    return cls(cfg, {k: v for k, v in cfg.fl.strategy.options.items() if k in cls.options})


__all__ = ["ALGORITHMS", "Algorithm", "ClientRound", "LocalWork", "algorithm_class", "make_algorithm"]
