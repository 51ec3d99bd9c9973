"""Ray Tune sweeps over FL parameters: one trial is one federated simulation.

A sweep spec (YAML, see ``tune_configs/``) is a base experiment config plus a search space over
dotted config keys. Every trial config is validated before Ray starts. Each trial runs
``run_federated`` inside its own placement group (one bundle for the trial's driver, one per
client actor), reports every round to Tune (so ASHA can stop it early), and writes its run folder
under ``SWEEP/trials/``, named from its parameters: a trial that Tune starts again after an
interruption resumes its simulation from the saved round, and a finished one is not rerun.
``trials.parquet`` (one row per trial and round) is rebuilt from those run folders.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxrfl_ray.config import ConfigError, ExperimentConfig, _merge, build_config, set_dotted
from cxrfl_ray.presets import PRESETS
from cxrfl_ray.tasks import TASKS

SPEC_FILE, TRIALS_FILE, TUNE_DIR = "spec.yaml", "trials.parquet", "tune"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Spec):
    """``none`` runs every trial to the end; ``asha`` stops weak trials early, by round."""

    name: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="rounds every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Spec):
    """A sweep: what to vary, how to search, what to optimise, and the resources of a trial."""

    name: str
    preset: str | None = Field(None, description="start from this preset; `base` overrides it")
    base: dict[str, Any] = Field(default_factory=dict, description="an experiment config (any YAML config's keys)")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                             description="dotted key -> {grid|choice|uniform|loguniform|randint: ...}")
    seeds: int = Field(1, ge=1, description="each point runs with seeds base.seed, base.seed+1, ...")
    num_samples: int = Field(1, ge=1, description="samples of the random dimensions (per grid point)")
    search: Literal["basic", "optuna"] = Field("basic", description="basic: grid x random samples; optuna if installed")
    metric: str | None = Field(None, description="e.g. central/val/jaccard (default: the task's main metric on val)")
    mode: Literal["max", "min"] | None = None
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent: int = Field(1, ge=1, description="trials at once")
    max_retries: int = Field(1, ge=0, description="times a failed trial is retried before it is reported as failed")
    driver_cpus: float = Field(1.0, gt=0, description="CPUs of a trial's driver (server evaluation)")
    driver_gpus: float = Field(0.0, ge=0)
    client_slots: int | None = Field(None, ge=1, description="client actors per trial (default: its clients per round); "
                                                             "one value for all trials lets every trial reuse workers")
    reuse_workers: bool = Field(True, description="a trial starts in a finished trial's Tune worker, with its client "
                                                  "actors, when both have the same bundles (Tune's reuse_actors): "
                                                  "their start-up is paid once, not per trial")
    out_dir: str = "runs/sweeps"
    ray_init: dict[str, Any] = Field(default_factory=dict, description="ray.init arguments when Ray starts here")
    threshold: float | None = Field(None, description="report: rounds to reach this metric value")
    synthesize: dict[str, Any] | None = Field(
        None, description="write_synthetic_dataset arguments (n, sites, size, seed): phantoms made at base "
                          "data.path on first use when nothing is there")

    @field_validator("space")
    @classmethod
    def _dimensions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, dim in space.items():
            if len(dim) != 1 or next(iter(dim)) not in KINDS:
                raise ValueError(f"space.{key}: give exactly one of {', '.join(KINDS)} (got {sorted(dim)})")
            kind, values = next(iter(dim.items()))
            if kind in ("grid", "choice") and (not isinstance(values, list) or not values):
                raise ValueError(f"space.{key}.{kind}: a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if not (isinstance(values, list) and len(values) == 2 and values[0] < values[1]):
                    raise ValueError(f"space.{key}.{kind}: [low, high] with low < high (got {values!r})")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform: bounds must be > 0 (got {values!r})")
        return space


def load_spec(path: str | Path, overrides: list[str] | None = None, model: type[BaseModel] | None = None,
              kind: str = "sweep spec") -> Any:
    """Read a spec; ``overrides`` are ``KEY=VALUE`` on the spec, e.g. ``base.data.path=/data/x``.
    ``model`` validates it (default ``SweepSpec``; the study spec uses the same loader)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not KEY=VALUE")
            key, value = item.split("=", 1)
            set_dotted(data, key.strip(), value)
        return (model or SweepSpec).model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        lines = [f"invalid {kind} {path}:"]
        lines += [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def base_config(spec: SweepSpec) -> dict[str, Any]:
    if spec.preset is not None and spec.preset not in PRESETS:
        raise ConfigError(f"preset {spec.preset!r} is unknown; presets: {', '.join(sorted(PRESETS))}")
    return _merge(PRESETS[spec.preset] if spec.preset else {}, spec.base)


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config with ``{"train.epochs": 2, "partition": {...}}`` applied (dict values merge);
    ``base`` (often a preset's nested dicts) is left unchanged."""
    out = copy.deepcopy(base)
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _merge(node.get(leaf) or {}, value) if isinstance(value, dict) else value
    return out


def trial_config(spec: SweepSpec, params: dict[str, Any], source: str = "trial") -> ExperimentConfig:
    data = apply_params(base_config(spec), params)
    data.setdefault("tracking", {})["group"] = spec.name
    return build_config(data, source=source)


def _corners(kind: str, values: Any) -> list[Any]:
    """The values to validate a dimension with: every listed value, or both ends of a range."""
    return list(values) if kind in ("grid", "choice") else [values[0], values[1] - (kind == "randint")]


def corner_trials(spec: SweepSpec) -> Iterator[tuple[dict[str, Any], ExperimentConfig, Any]]:
    """Every combination of the listed values and range ends, as (params, config, prepared data);
    data is prepared once per distinct (task, data, partition, seed). Raises ConfigError naming
    the first trial that cannot run."""
    from cxrfl_ray.experiment import prepare

    keys = list(spec.space)
    choices = [_corners(*next(iter(spec.space[k].items()))) for k in keys]
    prepared: dict[str, Any] = {}
    for combo in itertools.product(*choices):
        params = dict(zip(keys, combo))
        label = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(base)"
        cfg = trial_config(spec, params, source=f"sweep {spec.name} trial {label}")
        key = json.dumps([cfg.task, cfg.data.model_dump(mode="json"), cfg.partition.model_dump(mode="json"), cfg.seed])
        if key not in prepared:
            try:
                prepared[key] = prepare(cfg)
            except ConfigError as exc:
                raise ConfigError(f"sweep {spec.name} trial {label}: {exc}") from None
        yield params, cfg, prepared[key]


def validate(spec: SweepSpec) -> list[ExperimentConfig]:
    """Every combination of the listed values and range ends must be a valid, runnable config
    (data present, fits the task, enough patients); raises ConfigError naming the trial."""
    configs = [cfg for _, cfg, _ in corner_trials(spec)]
    first = configs[0]
    metric = spec.metric or default_metric(first)
    if metric.count("/") != 2:
        raise ConfigError(f"metric {metric!r}: write scope/id/name, e.g. {default_metric(first)}")
    if spec.search == "optuna":
        if any("grid" in d for d in spec.space.values()):
            raise ConfigError("search optuna: use choice instead of grid dimensions")
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search optuna needs the optuna package (pip install optuna)")
    return configs


def estimate_cost(spec: SweepSpec, throughput: float | None = None) -> list[dict[str, Any]]:
    """What each sweep point asks of a cluster, from the spec alone (``cxrfl sweep --dry-run``).

    Per point: trials (seeds x samples), the GPUs and CPUs a trial reserves (its placement
    group), images trained and evaluated. With ``throughput`` (training images/s of one client
    on its GPU share, e.g. from ``benchmarks/train_step.py --device cuda``), also hours and
    GPU-hours: clients of a round train in parallel, evaluation is counted at 3x training speed.
    """
    random_dims = any(kind not in ("grid",) for dim in spec.space.values() for kind in dim)
    rows = []
    for params, cfg, prep in corner_trials(spec):
        client_rows = float(np.mean([c.size for c in prep.plan.clients]))
        eval_rows = int(np.unique(np.concatenate(list(prep.views.values()))).size)
        cohort = cfg.clients_per_round
        slots = spec.client_slots or cohort
        per_client = cfg.train.epochs * (cfg.train.steps * cfg.train.batch_size if cfg.train.steps else client_rows)
        train_images = cfg.fl.rounds * cohort * per_client
        eval_images = (cfg.fl.rounds + 1) * eval_rows
        gpus = spec.driver_gpus + slots * cfg.fl.client_num_gpus
        row = {**{k: v for k, v in params.items()}, "trials": spec.seeds * (spec.num_samples if random_dims else 1),
               "gpus_per_trial": round(gpus, 3), "cpus_per_trial": spec.driver_cpus + slots * cfg.fl.client_num_cpus,
               "train_images": int(train_images), "eval_images": int(eval_images)}
        if throughput:
            waves = -(-cohort // slots)  # rounds of client training the slots need per FL round
            seconds = (train_images / cohort) * waves / throughput + eval_images / (3 * throughput)
            row["hours_per_trial"] = round(seconds / 3600, 3)
            row["gpu_hours"] = round(row["trials"] * gpus * seconds / 3600, 3)
        rows.append(row)
    return rows


def default_metric(cfg: ExperimentConfig) -> str:
    return f"central/{cfg.data.val_split}/{TASKS[cfg.task].main_metric}"


def default_mode(cfg: ExperimentConfig, metric: str) -> str:
    task = TASKS[cfg.task]
    name = metric.rsplit("/", 1)[-1]
    return task.mode if name == task.main_metric else ("min" if "loss" in name else "max")


def param_space(spec: SweepSpec, base_seed: int) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    space = {key: make[kind](values) for key, dim in spec.space.items() for kind, values in dim.items()}
    if spec.seeds > 1:
        space["seed"] = tune.grid_search([base_seed + i for i in range(spec.seeds)])
    return space


def trial_name(params: dict[str, Any]) -> str:
    """A run folder name that follows from the parameters alone (so a restarted trial finds it)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _resources(spec: SweepSpec):
    from ray import tune

    def for_trial(params: dict[str, Any]):
        cfg = trial_config(spec, params)
        slots = spec.client_slots or cfg.clients_per_round
        client = {"CPU": cfg.fl.client_num_cpus, **({"GPU": cfg.fl.client_num_gpus} if cfg.fl.client_num_gpus else {})}
        driver = {"CPU": spec.driver_cpus, **({"GPU": spec.driver_gpus} if spec.driver_gpus else {})}
        return tune.PlacementGroupFactory([driver] + [client] * slots, strategy="PACK")

    return for_trial


def _trainable(spec: SweepSpec, sweep_dir: Path):
    """The function Tune runs per trial (it is pickled to the trial's worker)."""

    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune

        from cxrfl_ray.fl.engine import run_federated
        from cxrfl_ray.fl.state import saved_round

        cfg = trial_config(spec, params)
        run_dir = sweep_dir / "trials" / trial_name(params)
        (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
        (run_dir.with_suffix(".params.json")).write_text(json.dumps(params, sort_keys=True, default=str))
        attempts = run_dir.with_suffix(".attempts")  # Tune's retries, counted where the report can see them
        attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.is_file() else 1))

        def report(rnd: int, metrics: dict[str, float]) -> None:
            tune.report({**metrics, "round": rnd, "run_dir": str(run_dir)})

        if (run_dir / "summary.json").is_file():  # finished before an interruption: report, don't rerun
            report(cfg.fl.rounds, _final_metrics(run_dir))
            return
        done = saved_round(run_dir)
        try:
            if done is not None and done < cfg.fl.rounds:
                run_federated(resume=run_dir, quiet=True, on_round=report)
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # started but never saved a round: start again
                run_federated(cfg, quiet=True, run_dir=run_dir, on_round=report)
        finally:
            if "wandb" in sys.modules:  # close W&B's service before Ray ends this worker
                sys.modules["wandb"].teardown()

    return run_trial


def _final_metrics(run_dir: Path) -> dict[str, float]:
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    last = max(r["round"] for r in rows)
    return {f"{r['scope']}/{r['id']}/{r['metric']}": r["value"] for r in rows
            if r["round"] == last and r["scope"] in ("central", "site", "holdout", "round")}


def _absolute(key: str, value: Any) -> Any:
    """A local data or weights path made absolute (URIs, ``hub`` and None stay as they are)."""
    if key not in ("data.path", "model.pretrained") or not isinstance(value, str):
        return value
    if "://" in value or value == "hub" or Path(value).is_absolute():
        return value
    return str(Path(value).resolve())


def with_absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Trials run in their own working folder: make local paths in the base and space absolute."""
    base = base_config(spec)
    fixes = {key: _absolute(key, base.get(key.split(".")[0], {}).get(key.split(".")[1]))
             for key in ("data.path", "model.pretrained")}
    fixes = {k: v for k, v in fixes.items() if v is not None}
    space = {key: {kind: [_absolute(key, v) for v in values] if kind in ("grid", "choice") else values
                   for kind, values in dim.items()} for key, dim in spec.space.items()}
    return spec.model_copy(update={"base": apply_params(spec.base, fixes), "space": space})


def make_phantoms(spec: SweepSpec) -> None:
    """The spec's synthetic data, written on first use (so smoke sweeps run on a fresh checkout)."""
    path = base_config(spec).get("data", {}).get("path")
    if spec.synthesize is not None and path and not Path(path).exists():
        from cxrfl_ray.data.synth import write_synthetic_dataset

        write_synthetic_dataset(path, **spec.synthesize, progress=False)


def run_sweep(spec_path: str | Path, *, out: str | Path | None = None, resume: bool = False,
              address: str | None = None, quiet: bool = False, overrides: list[str] | None = None) -> Path:
    """Run (or, with ``resume``, continue) a sweep; returns the sweep folder.

    ``resume`` continues the sweep in its folder if there is one and starts it otherwise, so a
    retried job (a KubeRay RayJob's backoff) picks up where the last attempt stopped.
    """
    spec = load_spec(spec_path, overrides)
    make_phantoms(spec)
    configs = validate(spec)  # before Ray starts
    first = configs[0]
    sweep_dir = Path(out) if out else Path(spec.out_dir) / spec.name
    tune_dir = sweep_dir / TUNE_DIR
    if not resume and sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"sweep folder {sweep_dir} exists; continue it with --resume, or pick another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if resume and (sweep_dir / SPEC_FILE).is_file():
        # Fields added since the sweep started count as their defaults (so it still resumes).
        saved = {**SweepSpec.model_construct(name=spec.name).model_dump(mode="json"),
                 **yaml.safe_load((sweep_dir / SPEC_FILE).read_text())}
        if saved != spec.model_dump(mode="json"):
            changed = sorted(k for k in set(saved) | set(spec.model_dump(mode="json"))
                             if saved.get(k) != spec.model_dump(mode="json").get(k))
            raise ConfigError(f"--resume: {spec_path} differs from the spec this sweep started with "
                              f"({sweep_dir / SPEC_FILE}) in: {', '.join(changed)}")
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    spec = with_absolute_paths(spec)

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our one line per round instead of Tune's tables
    import ray
    from ray import tune

    from cxrfl_ray.fl.engine import start_ray

    if not ray.is_initialized():
        start_ray(**({**spec.ray_init, "address": address} if address else spec.ray_init))
    from cxrfl_ray.fl.backend import release_idle_actors

    release_idle_actors()  # actors kept from earlier simulations in this process hold CPUs trials need
    metric = spec.metric or default_metric(first)
    mode = spec.mode or default_mode(first, metric)
    trainable = tune.with_resources(_trainable(spec, sweep_dir.resolve()), _resources(spec))
    if resume and tune.Tuner.can_restore(str(tune_dir.resolve())):
        tuner = tune.Tuner.restore(str(tune_dir.resolve()), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec, first.seed),
                           tune_config=_tune_config(spec, metric, mode, first.fl.rounds),
                           run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir.resolve()),
                                                     failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                                                     callbacks=[] if quiet else [_progress(metric)], verbose=0))
    results = tuner.fit()
    write_trials_table(sweep_dir, results)
    return sweep_dir


def _progress(metric: str):
    """A Tune callback printing one line per trial result (Tune imports lazily, hence the nesting)."""
    from ray.tune import Callback

    class Progress(Callback):
        """One line per trial result: which trial, its parameters, the round and the metric."""

        def __init__(self, metric: str) -> None:
            self.metric = metric

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(self.metric)
            params = ", ".join(f"{k}={v}" for k, v in trial.config.items())
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"[{trial.trial_id}] {params}: round {result.get('round')} {self.metric} {shown}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] done", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{trial.trial_id}] failed: {trial.error_file}", flush=True)

    return Progress(metric)


def _tune_config(spec: SweepSpec, metric: str, mode: str, rounds: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    seed = build_config(base_config(spec)).seed
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=seed)
    else:
        search = BasicVariantGenerator(random_state=seed, max_concurrent=spec.max_concurrent)
    # BasicVariantGenerator limits concurrency itself; Tune's max_concurrent_trials is for Searchers.
    limit = {"max_concurrent_trials": spec.max_concurrent} if spec.search == "optuna" else {}
    return tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search,
                           num_samples=spec.num_samples, reuse_actors=spec.reuse_workers, **limit)


def write_trials_table(sweep_dir: Path, results=None) -> Path:
    """``trials.parquet``: one row per trial and round, every parameter and metric, from the run
    folders (the record of what ran), plus Tune's status and error for each trial."""
    status = {}
    if results is not None:
        for result in results:
            params = {k: v for k, v in (result.config or {}).items()}
            status[trial_name(params)] = ("ERROR" if result.error else "TERMINATED",
                                          str(result.error).strip().splitlines()[-1][:500] if result.error else None)
    rows = []
    for params_file in sorted((sweep_dir / "trials").glob("*.params.json")):
        name = params_file.name.removesuffix(".params.json")
        params = json.loads(params_file.read_text())
        run_dir = sweep_dir / "trials" / name
        state, error = status.get(name, ("UNKNOWN", None))
        attempts = run_dir.with_suffix(".attempts")
        base = {"trial": name, "status": state, "error": error, "run_dir": str(run_dir),
                "attempts": int(attempts.read_text()) if attempts.is_file() else 0,
                "finished": (run_dir / "summary.json").is_file(),
                **{f"param:{k}": json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in params.items()}}
        metrics_file = run_dir / "metrics.parquet"
        per_round: dict[int, dict] = {}
        if metrics_file.is_file():
            for r in pq.read_table(metrics_file).to_pylist():
                if r["scope"] in ("central", "site", "holdout", "round"):
                    per_round.setdefault(r["round"], {})[f"{r['scope']}/{r['id']}/{r['metric']}"] = r["value"]
        if not per_round:
            rows.append({**base, "round": None})
        for rnd in sorted(per_round):
            rows.append({**base, "round": rnd, **per_round[rnd]})
    columns = list(dict.fromkeys(k for row in rows for k in row))  # rows differ (round 0 has no train loss)
    table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]) if rows \
        else pa.table({"trial": pa.array([], pa.string())})
    path = sweep_dir / TRIALS_FILE
    pq.write_table(table, path)
    return path
