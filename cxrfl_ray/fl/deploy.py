"""A real federation on Flower's deployment engine (docs/DEPLOYMENT.md).

The same ClientApp as the simulation (``fl/client.py``) runs on each hospital's SuperNode and
trains on that node's own dataset (``--node-config 'data-path="/data/site"'``, no partition
plan); this ServerApp runs the simulation's round loop (``fl/server.serve``) against the
connected SuperNodes. ``pyproject.toml``'s ``[tool.flwr.app]`` names both, so ``flwr run .``
from the repository root ships them to a SuperLink.

Run config (``flwr run . SUPERLINK --run-config 'config="/abs/exp.yaml" out="/abs/run"'``):
``config`` the experiment YAML (``partition.clients`` = the number of sites; ``data.path`` = the
server's evaluation data), ``out`` the run folder, ``set`` overrides as ``"key=value ..."``.
Paths are read on the SuperLink's machine. A run folder with saved rounds is resumed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cxrfl_ray.config import ConfigError, load_config
from cxrfl_ray.experiment import prepare
from cxrfl_ray.fl.server import Outcome, serve
from cxrfl_ray.fl.rounds import ServerHooks
from cxrfl_ray.fl.state import check_resume, saved_round

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if not str(rc.get("config", "")):
        raise ConfigError("run config 'config' is empty: pass --run-config 'config=\"/path/to/experiment.yaml\"'")
    cfg = load_config(str(rc["config"]), shlex.split(str(rc.get("set", ""))))
    prep = prepare(cfg, role="server")  # checks the evaluation data before any site trains
    try:
        ServerHooks.check(prep.cfg, prep.cfg.partition.clients, sites=True)  # e.g. FedBN without BN, DP-SGD with it
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run_dir = Path(str(rc.get("out") or Path(cfg.out_dir) / f"{cfg.name}-deploy"))
    done = saved_round(run_dir)
    if done is not None and done >= cfg.fl.rounds:
        raise ConfigError(f"run folder {run_dir}: all {cfg.fl.rounds} rounds are already done")
    if done is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    else:
        check_resume(run_dir, prep.cfg)
    serve(grid, prep, run_dir, Outcome(), resume=done is not None, sites=True)
