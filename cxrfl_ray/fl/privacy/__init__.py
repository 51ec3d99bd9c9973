"""Differential privacy on the round seam (``base.py``), by ``privacy.mode``: none, client-level
DP-FedAvg on the server (``client_level.py``), or sample-level DP-SGD with Opacus on each client
(``sample_level.py``); epsilon from dp-accounting (``accounting.py``). docs/PRIVACY.md says what
each protects and what the epsilon assumes."""

from __future__ import annotations

import importlib

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.privacy.base import SCOPE, NoPrivacy

# mode -> "module:Class" (imported when used: an actor without DP never imports Opacus)
MODES: dict[str, str] = {
    "none": "cxrfl_ray.fl.privacy.base:NoPrivacy",
    "client": "cxrfl_ray.fl.privacy.client_level:ClientLevelDP",
    "sample": "cxrfl_ray.fl.privacy.sample_level:SampleLevelDP",
}


def privacy_class(mode: str) -> type[NoPrivacy]:
    module, _, cls = MODES[mode].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_privacy(cfg: ExperimentConfig, num_clients: int, per_round: int) -> NoPrivacy:
    return privacy_class(cfg.privacy.mode)(cfg, num_clients, per_round)


__all__ = ["MODES", "SCOPE", "NoPrivacy", "make_privacy", "privacy_class"]
