"""The only module that calls Flower's simulation engine (and so starts Ray).

``run_federated(cfg)`` validates everything first (dataset vs task, plan, strategy options),
then runs the ServerApp and ClientApp on Flower's Ray backend. Flower's
``run_simulation`` is deprecated in flwr 1.42; swapping it is a change to this file only.

Note: Flower's Ray backend calls ``ray.shutdown()`` when a simulation ends, also when Ray was
started before it; each simulation therefore starts its own Ray runtime.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cxrfl_ray.baseline import new_run_dir
from cxrfl_ray.config import ConfigError, ExperimentConfig, load_config
from cxrfl_ray.experiment import prepare
from cxrfl_ray.fl.state import STATE_FILE, saved_round
from cxrfl_ray.fl.strategies import make_strategy

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class _DropKnownNoise(logging.Filter):
    """Flower warnings that say nothing to our users (we skip client evaluation on purpose, and
    the deprecation of run_simulation is this module's to handle)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "fraction_evaluate is set to 0.0" not in text and "run_simulation` function is deprecated" not in text


def backend_config(cfg: ExperimentConfig) -> dict:
    """Client resources and ray.init arguments for Flower's Ray backend."""
    init = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
            "object_store_memory": 256 * 1024**2, "logging_level": logging.WARNING,
            "log_to_driver": True}
    init.update(cfg.fl.ray_init)
    return {"client_resources": {"num_cpus": cfg.fl.client_num_cpus, "num_gpus": cfg.fl.client_num_gpus},
            "init_args": init}


def run_federated(cfg: ExperimentConfig | None = None, quiet: bool = False, verbose: bool = False,
                  resume: str | Path | None = None) -> Path:
    """Run one federated simulation; returns its run folder.

    ``resume``: a run folder of an interrupted simulation; it continues after the last completed
    round with that folder's own config (``cfg`` is then ignored).
    """
    if resume is not None:
        run_dir = Path(resume)
        done = saved_round(run_dir) if run_dir.is_dir() else None
        if done is None:
            raise ConfigError(f"--resume {run_dir}: no saved round state ({STATE_FILE}) in that folder")
        cfg = load_config(run_dir / "config.yaml")
        if done >= cfg.fl.rounds:
            raise ConfigError(f"--resume {run_dir}: all {cfg.fl.rounds} rounds are already done")
    assert cfg is not None
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(_DropKnownNoise())
    prep = prepare(cfg)
    try:  # strategy options are checked before Ray starts
        make_strategy(cfg.fl.strategy.name, dict(cfg.fl.strategy.options), num_clients=len(prep.plan.clients),
                      per_round=cfg.clients_per_round, seed=cfg.seed, client_eval=cfg.fl.client_eval)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    from flwr.simulation import run_simulation

    from cxrfl_ray.fl.client import app as client_app
    from cxrfl_ray.fl.server import Outcome, make_server_app

    if resume is None:
        run_dir = new_run_dir(cfg, "fl")
        cfg.save(run_dir / "config.yaml")
    outcome = Outcome()
    # Any virtual node can play any plan client, so only a round's cohort of nodes is needed.
    server_app = make_server_app(prep, run_dir, outcome, quiet, resume=resume is not None)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.clients_per_round, backend_config=backend_config(cfg),
                   verbose_logging=verbose)
    if outcome.error is not None:
        raise RuntimeError(f"federated run failed: {outcome.error}") from outcome.error
    if not outcome.summary:
        raise RuntimeError(f"federated run ended without a summary (see logs); run folder {run_dir}")
    return run_dir
