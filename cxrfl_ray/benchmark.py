"""``cxrfl benchmark``: pooled, local-only and federated training compared FLamby-style, as Ray
Tune trials.

For every task and seed of the spec (``benchmark_spec.py``), one trial per model: pooled training,
local-only training of each client, and one federated run per method, all with the same budget
(rows seen). Trials run in parallel (``max_concurrent``), each in its own placement group, into
``OUT/trials/<hash of its parameters>``: a rerun skips the finished ones (a run folder holding
another config is refused before anything starts) and resumes an interrupted federated run from
its saved round. Every model is its best checkpoint by the central val split, read from its run
folder: its evaluation on the pooled test split, each site's test rows and every held-out site
(the server evaluates every view each round; a baseline evaluates its best epoch on all of them).

Outputs (``benchmark_report.py``): ``benchmark.csv`` (long: task, method, seed, train_site, test,
metric, value), ``trials.csv`` (budget and wall time per trial), ``benchmark.md`` and a PNG per task.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml

from cxrfl_ray.benchmark_spec import BenchmarkSpec, Trial, load_benchmark, plan_trials
from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.jsonio import write_json

CSV_FILE, TRIALS_FILE, TUNE_DIR = "benchmark.csv", "trials.csv", "tune"
COLUMNS = ["task", "method", "seed", "train_site", "test", "metric", "value"]
# The scopes a model is compared on; "personal": a site's own model (FedBN: the global weights
# plus that site's BatchNorm) on the site's test rows, beside the global model's "site" row;
# "adapted": the global model on a held-out site with that site's own BatchNorm statistics (FedBN's AdaBN).
TESTS = ("central", "site", "holdout", "personal", "adapted")
NOT_METRICS = ("examples", "clients")  # a view's row count, the personal models averaged


class BenchmarkError(ValueError):
    """Trials that failed (after their retries); their names and first error line."""


def test_name(scope: str, vid: str, cfg: ExperimentConfig) -> str | None:
    """The test set a view is: ``pooled``, ``site:S`` (S's test rows), ``holdout:S``, ``personal:S``
    (S's own model on S's test rows), ``adapted:S`` (held-out S, AdaBN); None for others (val)."""
    if scope == "central":
        return "pooled" if vid == cfg.data.test_split else None
    return f"{scope}:{vid}" if scope in TESTS else None


def best_evaluation(run: Path) -> dict[str, dict[str, float]]:
    """The best checkpoint's metrics on every test set, as its run folder recorded them: a
    federated run's server evaluation at its best round, a baseline's final evaluation at its best
    epoch (both the round of ``best.safetensors``, picked by the central val split). The sites' own
    models (``personal``, FedBN) are the last round's: they are not evaluated on val, and the global
    model's val score (its BatchNorm at the initial values) says nothing about them."""
    from cxrfl_ray.config import load_config

    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_round"] if "best_round" in summary else summary["best_epoch"]
    cfg = load_config(run / "config.yaml")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    last_personal = max((r["round"] for r in rows if r["scope"] == "personal"), default=None)
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        test = test_name(r["scope"], r["id"], cfg)
        at = last_personal if r["scope"] == "personal" else best
        if test is not None and r["round"] == at and r["metric"] not in NOT_METRICS:
            out.setdefault(test, {})[r["metric"]] = r["value"]
    return out


def trial_rows(trial: Trial, run: Path) -> list[dict[str, Any]]:
    """The long CSV rows of one finished trial."""
    return [{"task": trial.task, "method": trial.method, "seed": trial.seed, "train_site": trial.train_site,
             "test": test, "metric": metric, "value": value}
            for test, metrics in best_evaluation(run).items() for metric, value in sorted(metrics.items())]


def trial_record(trial: Trial, run: Path) -> dict[str, Any]:
    """A finished trial's budget and cost, from its run folder."""
    from cxrfl_ray.study import rows_seen

    summary = json.loads((run / "summary.json").read_text())
    cfg = trial.cfg
    federated = trial.kind == "federated"
    return {"task": trial.task, "method": trial.method, "kind": trial.kind, "seed": trial.seed,
            "train_site": trial.train_site, "run": f"trials/{trial.name}",
            "rounds": cfg.fl.rounds if federated else None, "epochs": cfg.train.epochs,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "clients_per_round": cfg.clients_per_round if federated else None,
            "train_rows": summary.get("train_rows"), "rows_seen": rows_seen(run),
            "best_at": summary["best_round"] if federated else summary["best_epoch"],
            "wall_time_s": summary["wall_time_s"]}


# -- trials on Ray Tune ------------------------------------------------------------------------

def _finished(trial: Trial, run: Path) -> bool:
    """Done with this trial's config; raises (``StudyError``) where the folder holds another one."""
    from cxrfl_ray.study import _complete

    return _complete(run, trial.cfg)


def _trainable(trials: dict[str, Trial], runs: Path):
    """The function Tune runs per trial (pickled to the trial's worker)."""

    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune

        from cxrfl_ray.experiment import prepare
        from cxrfl_ray.study import rows_seen, run_baseline, run_fl
        from cxrfl_ray.sweep import close_wandb

        trial = trials[params["run"]]
        run = runs / trial.name
        runs.mkdir(parents=True, exist_ok=True)
        run.with_suffix(".params.json").write_text(json.dumps(trial.params, sort_keys=True))
        try:
            prep = prepare(trial.cfg)
            if trial.kind == "federated":
                run_fl(trial.cfg, run, prep, quiet=True)  # resumes from its saved round
            else:
                run_baseline(trial.cfg, run, prep, trial.client, quiet=True)
        finally:
            close_wandb()
        tune.report({"rows_seen": rows_seen(run), "round": trial.cfg.fl.rounds if trial.kind == "federated"
                     else trial.cfg.train.epochs})

    return run_trial


def _resources(spec: BenchmarkSpec, trials: dict[str, Trial]):
    from ray import tune

    from cxrfl_ray.sweep import placement

    def for_trial(params: dict[str, Any]):
        trial = trials[params["run"]]
        if trial.kind == "federated":
            return placement(spec, trial.cfg)
        fl = trial.cfg.fl  # a baseline trains like one client, and evaluates like a driver
        bundle = {"CPU": max(spec.driver_cpus, fl.client_num_cpus)}
        gpus = max(spec.driver_gpus, fl.client_num_gpus)
        return tune.PlacementGroupFactory([{**bundle, **({"GPU": gpus} if gpus else {})}])

    return for_trial


def run_trials(spec: BenchmarkSpec, pending: list[Trial], out: Path, address: str | None,
               quiet: bool) -> dict[str, str]:
    """Run the pending trials as Tune trials; returns the failed ones' labels -> last error line."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our one line per trial instead of Tune's tables
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from cxrfl_ray.fl.backend import release_idle_actors
    from cxrfl_ray.fl.engine import start_ray
    from cxrfl_ray.sweep import _progress, check_trials_fit

    if not ray.is_initialized():
        start_ray(**({**spec.ray_init, "address": address} if address else spec.ray_init))
    if (address or spec.ray_init.get("address") or os.environ.get("RAY_ADDRESS") or "local") == "local":
        check_trials_fit(spec, [t.cfg for t in pending if t.kind == "federated"],
                         [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    release_idle_actors()  # actors kept from earlier simulations in this process hold CPUs trials need
    by_label = {t.label: t for t in pending}
    shutil.rmtree(out / TUNE_DIR, ignore_errors=True)  # Tune's bookkeeping only: the run folders are the record
    trainable = tune.with_resources(_trainable(by_label, (out / "trials").resolve()), _resources(spec, by_label))
    tuner = tune.Tuner(
        trainable, param_space={"run": tune.grid_search(list(by_label))},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=spec.max_concurrent),
                                    reuse_actors=spec.reuse_workers),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out.resolve()),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                                  callbacks=[] if quiet else [_progress("rows_seen")], verbose=0))
    failed = {}
    for result in tuner.fit():
        if result.error:
            failed[result.config["run"]] = str(result.error).strip().splitlines()[-1][:300]
    return failed


def run_benchmark(path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None,
                  methods: list[str] | None = None, seeds: int | None = None, max_concurrent: int | None = None,
                  address: str | None = None, quiet: bool = False) -> Path:
    """Run (or continue) the benchmark of ``path`` (a spec, or an experiment config); returns its
    folder with ``benchmark.md``. Raises ``BenchmarkError`` after the report when trials failed."""
    from cxrfl_ray.benchmark_report import write_report
    from cxrfl_ray.sweep import make_phantoms

    spec = load_benchmark(path, overrides, methods, seeds, max_concurrent)
    make_phantoms(spec)
    out = Path(out) if out is not None else Path(spec.out_dir) / spec.name
    trials = plan_trials(spec, out.resolve())  # every config, strategy and dataset checked here
    runs = out / "trials"
    pending = [t for t in trials if not _finished(t, runs / t.name)]
    print(f"[benchmark {spec.name}] {len(trials)} trials, {len(trials) - len(pending)} finished before, "
          f"{len(pending)} to run", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    failed = run_trials(spec, pending, out, address, quiet) if pending else {}
    done = [t for t in trials if (runs / t.name / "summary.json").is_file()]
    if not done:
        raise BenchmarkError(f"no trial finished ({'; '.join(f'{k}: {v}' for k, v in failed.items())})")
    rows = [row for t in done for row in trial_rows(t, runs / t.name)]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out / CSV_FILE, index=False)
    records = pd.DataFrame([trial_record(t, runs / t.name) for t in done])
    records.astype({c: "Int64" for c in ("rounds", "steps", "clients_per_round", "train_rows")}) \
        .to_csv(out / TRIALS_FILE, index=False)  # whole numbers, blank where a kind has none
    write_json(out / "failed.json", failed, indent=1)
    write_report(out, spec, failed)
    if failed:
        raise BenchmarkError(f"{len(failed)} of {len(trials)} trials failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); "
                             f"the report covers the rest; run the benchmark again to retry them")
    return out
