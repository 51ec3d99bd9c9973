"""The Flower ServerApp: rounds of seeded client selection, Flower's aggregation, and server-side
evaluation of the global model after every round (and at round 0) on the central splits, each
site's test rows and the held-out sites. It runs in a thread of the caller, so it writes the run
folder directly."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from cxrfl_ray.experiment import Prepared, evaluate_views
from cxrfl_ray.fl.client import EXPERIMENT_KEY, load_global, weights_record
from cxrfl_ray.fl.privacy import SCOPE as PRIVACY_SCOPE
from cxrfl_ray.fl.overlap import RoundsAhead
from cxrfl_ray.fl.rounds import ServerHooks, evaluate_global
from cxrfl_ray.fl.state import load_algorithm_state, load_state, restore_strategy, save_state
from cxrfl_ray.fl.strategies import CLIENT_KEY, make_strategy, reply_client
from cxrfl_ray.jsonio import write_json
from cxrfl_ray.pictures import write_pictures
from cxrfl_ray.plots import plot_series
from cxrfl_ray.tasks.checkpoint import save_checkpoint
from cxrfl_ray.tasks.models import create_model
from cxrfl_ray.tasks.training import seed_everything, select_device
from cxrfl_ray.tracking import MetricsSink, WandbRun

log = logging.getLogger("cxrfl.fl")


@dataclass
class Outcome:
    """What the ServerApp hands back to the engine (it runs in the caller's process)."""

    summary: dict = field(default_factory=dict)
    error: BaseException | None = None


def rounds_to_thresholds(series: list[tuple[int, float]], thresholds: dict[str, float], metric: str,
                         mode: str) -> dict[str, int | None]:
    """First round at which the metric reaches each threshold (None: never)."""
    out = {}
    for name, value in thresholds.items():
        if name != metric:
            continue
        hit = [r for r, v in series if (v >= value if mode == "max" else v <= value)]
        out[f"{name}>={value}" if mode == "max" else f"{name}<={value}"] = hit[0] if hit else None
    return out


RoundHook = Callable[[int, dict[str, float]], None]


def flat_metrics(results: dict[tuple[str, str], dict[str, float]], extra: dict | None = None) -> dict[str, float]:
    """``{"central/val/jaccard": 0.8, ...}``: one name per (scope, id, metric), as W&B and Tune see them."""
    out = {f"{scope}/{vid}/{k}": float(v) for (scope, vid), metrics in results.items() for k, v in metrics.items()
           if not k.startswith("cm_")}
    out.update({f"round/{k}": float(v) for k, v in (extra or {}).items()})
    return out


def make_server_app(prep: Prepared, run_dir: Path, outcome: Outcome, quiet: bool = False,
                    resume: bool = False, on_round: RoundHook | None = None) -> ServerApp:
    """The simulation's ServerApp: ``serve`` in the caller's thread, its error kept in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, prep, run_dir, outcome, quiet=quiet, resume=resume, on_round=on_round)
        except BaseException as exc:  # surfaced by the engine after Flower returns
            outcome.error = exc
            raise

    return app


def wait_for_sites(grid: Grid, count: int, timeout: float) -> None:
    """A real federation starts once its sites' SuperNodes have connected (they may come up after
    the run was submitted)."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{connected} of {count} SuperNodes connected after {timeout:.0f} s "
                               f"(partition.clients = {count} sites)")
        time.sleep(0.5)
    if connected > count:
        log.warning("%d SuperNodes connected; the first %d (by node id) are the sites", connected, count)


def serve(grid: Grid, prep: Prepared, run_dir: Path, outcome: Outcome, *, quiet: bool = False,
          resume: bool = False, on_round: RoundHook | None = None, sites: bool = False) -> None:
    """Rounds of seeded selection, aggregation and server-side evaluation, written to ``run_dir``.

    ``on_round(round, metrics)`` is called after each round's evaluation (a sweep reports it).
    ``sites``: a real federation, where each of ``partition.clients`` SuperNodes is one site that
    trains on its own data; in a simulation any virtual node plays any client of the plan.
    """
    cfg, task = prep.cfg, prep.task
    num_clients = cfg.partition.clients if sites else len(prep.plan.clients)

    def _rounds(grid: Grid, tracker: WandbRun) -> None:
        device = select_device(cfg.train.device)
        seed_everything(cfg.seed)
        model = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes, cfg.model.pretrained,
                             norm=cfg.model.norm).to(device)
        loss_fn = task.make_loss(cfg.loss_name, cfg.train.class_weights).to(device)
        arrays = weights_record(model)
        strategy = make_strategy(cfg.fl.strategy.name, dict(cfg.fl.strategy.options),
                                 num_clients=num_clients, per_round=cfg.clients_per_round,
                                 seed=cfg.seed, client_eval=cfg.fl.client_eval, sites=sites)
        train_config = ConfigRecord({EXPERIMENT_KEY: cfg.to_yaml()})
        main_metric = task.main_metric
        select_view = ("central", cfg.data.val_split) if ("central", cfg.data.val_split) in prep.views \
            else ("central", cfg.data.test_split)
        ckpt = dict(cfg=cfg, num_classes=prep.num_classes, label_names=prep.label_names)
        best, best_round = None, None
        hooks = ServerHooks.for_run(cfg, num_clients, None if sites else run_dir / "clients", sites=sites)
        rounds = RoundsAhead(strategy, grid, train_config, cfg.fl.round_timeout, hooks, cfg.fl.rounds,
                             enabled=cfg.fl.overlap_evaluation and not sites)
        evaluate_keys = rounds.sharing_cpus(functools.partial(evaluate_views, prep, model, device, loss_fn))
        evaluate_all = functools.partial(evaluate_keys, list(prep.views))

        def evaluate_round(server_round: int) -> dict:
            """The global model on every view; a diverged one stops the run before it is saved."""
            nonlocal best, best_round
            load_global(model, arrays)
            results = evaluate_global(server_round, arrays, evaluate_all, main_metric, strategy)
            results.update(hooks.algorithm.evaluate_personal(server_round, model, prep, hooks.accepted, evaluate_keys))
            for (scope, vid), metrics in results.items():
                sink.log(server_round, scope, vid, metrics)
            score = results.get(select_view, {}).get(main_metric)
            if score is not None and task.better(score, best):
                best, best_round = score, server_round
                save_checkpoint(run_dir / "best.safetensors", model, **ckpt, info={"round": server_round, main_metric: score})
            save_checkpoint(run_dir / "last.safetensors", model, **ckpt, info={"round": server_round})
            sink.flush()
            return results

        def save(server_round: int) -> None:
            extra = {"best": best, "best_round": best_round, "failures_total": failures_total, **rounds.hooks_state[0]}
            save_state(run_dir, server_round, arrays, strategy, extra, cfg, rounds.hooks_state[1])  # hooks: before the send
            hooks.saved()

        if resume:
            done, arrays, strategy_state, extra = load_state(run_dir)
            restore_strategy(strategy, strategy_state)
            hooks.restore(load_algorithm_state(run_dir), extra)
            best, best_round, failures_total = extra["best"], extra["best_round"], extra["failures_total"]
            sink = MetricsSink.resume(run_dir / "metrics.parquet", done)
            results = {}
            if not quiet:
                print(f"resuming {run_dir} after round {done}", flush=True)
        else:
            done, failures_total = 0, 0
            sink = MetricsSink(run_dir / "metrics.parquet")
            rounds.send(1, arrays)
            results = evaluate_round(0)
            tracker.log_round(0, sink.rows)
            save(0)
            _print_round(0, cfg.fl.rounds, results, select_view, main_metric, None, quiet)
            if on_round is not None:
                on_round(0, flat_metrics(results))
        start = sink.start
        if sites:
            wait_for_sites(grid, num_clients, cfg.fl.round_timeout)
        bar = tqdm(total=cfg.fl.rounds, initial=done, unit="round", desc=cfg.name, disable=quiet, leave=False)
        for server_round in range(done + 1, cfg.fl.rounds + 1):
            trained = rounds.train(server_round, arrays)
            arrays = trained.arrays
            failures_total += len(trained.failures)
            _log_clients(sink, server_round, "client", trained.good)
            round_info = {"selected": trained.selected,
                          "failures": len(trained.failures), "failures_total": failures_total, **trained.info}
            sink.log(server_round, "round", "server", round_info)
            for pid, metrics in trained.privacy.items():
                sink.log(server_round, PRIVACY_SCOPE, pid, metrics)
            if cfg.fl.client_eval:
                eval_msgs = list(strategy.configure_evaluate(server_round, arrays, train_config, grid))
                _log_clients(sink, server_round, "client_eval", sorted(
                    grid.send_and_receive(eval_msgs, timeout=cfg.fl.round_timeout), key=reply_client))
            rounds.send(server_round + 1, arrays)
            results = evaluate_round(server_round)
            tracker.log_round(server_round, sink.rows)
            save(server_round)
            _print_round(server_round, cfg.fl.rounds, results, select_view, main_metric, round_info, quiet)
            bar.update(1)
            if on_round is not None:
                on_round(server_round, flat_metrics(results, round_info))
        bar.close()

        series = sink.series(*select_view, main_metric)
        hours = dict(sink.series("round", "server", "sim_time_s"))
        reached = rounds_to_thresholds(series, cfg.fl.thresholds, main_metric, task.mode)
        outcome.summary = {
            "task": cfg.task, "model": cfg.model.name, "strategy": cfg.fl.strategy.name,
            "clients": num_clients, "clients_per_round": cfg.clients_per_round,
            "rounds": cfg.fl.rounds, "main_metric": main_metric, "selected_by": "%s:%s" % select_view,
            "best_value": best, "best_round": best_round,
            "final": {f"{s}:{i}": m for (s, i), m in results.items()},
            "rounds_to_threshold": reached,
            "sim_hours_to_threshold": {k: None if r is None else hours.get(r, 0.0) / 3600 for k, r in reached.items()},
            "sim_hours": hooks.system.now_s / 3600, "bytes": {"down": hooks.system.bytes_down, "up": hooks.system.bytes_up},
            "client_failures": failures_total, "privacy": hooks.privacy.summary(),
            "wall_time_s": round(time.time() - start, 2),
        }
        write_json(run_dir / "summary.json", outcome.summary)
        _plot_curves(run_dir, prep, sink, main_metric, hours)
        write_pictures(run_dir, prep, device)

    tracker = WandbRun(cfg.tracking.wandb, run_dir, cfg.model_dump(mode="json"), name=run_dir.name,
                       group=cfg.tracking.group, project=cfg.tracking.project)
    try:
        _rounds(grid, tracker)
    finally:
        tracker.finish(outcome.summary)


def _plot_curves(run_dir: Path, prep: Prepared, sink: MetricsSink, metric: str, hours: dict[int, float]) -> None:
    """The central and held-out views' metric by round, and by simulated hours."""
    title = f"{prep.cfg.name}: {prep.cfg.fl.strategy.name}"
    curves = {f"{s}:{i}": sink.series(s, i, metric) for (s, i) in prep.views if s in ("central", "holdout")}
    plot_series(run_dir / f"{metric}.png", curves, ylabel=metric, xlabel="round", title=title)
    plot_series(run_dir / f"{metric}_sim_hours.png",
                {k: [(hours.get(r, 0.0) / 3600, v) for r, v in c] for k, c in curves.items()},
                ylabel=metric, xlabel="simulated hours", title=title)


def _log_clients(sink: MetricsSink, server_round: int, scope: str, replies) -> None:
    """Each client's own metrics from its reply (error replies carry none)."""
    for reply in replies:
        if not reply.has_error():
            m = reply.content["metrics"]
            sink.log(server_round, scope, str(int(m[CLIENT_KEY])), {k: float(v) for k, v in m.items() if k != CLIENT_KEY})


def _print_round(server_round: int, rounds: int, results: dict, view: tuple, metric: str,
                 info: dict | None, quiet: bool) -> None:
    if quiet:
        return
    value = results.get(view, {}).get(metric, float("nan"))
    extra = f", train loss {info['train_loss']:.4f}" if info and "train_loss" in info else ""
    fails = f", {info['failures']} failed" if info and info.get("failures") else ""
    eps = f", epsilon {info['epsilon']:.3g}" if info and "epsilon" in info else ""
    tqdm.write(f"[round {server_round}/{rounds}] {view[0]}:{view[1]} {metric} {value:.4f}{extra}{fails}{eps}")
