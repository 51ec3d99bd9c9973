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
import difflib
import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from cxrfl_ray.config import ConfigError, Count, ExperimentConfig, _merge, build_config, load_yaml, set_dotted
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


class TrialsSpec(_Spec):
    """What every spec run as Tune trials has (sweeps, benchmarks): a base experiment, seeds, and
    the resources of a trial."""

    kind: ClassVar[str] = "sweep spec"  # how messages name the spec
    name: str
    preset: str | None = Field(None, description="start from this preset; `base` overrides it")
    base: dict[str, Any] = Field(default_factory=dict, description="an experiment config (any YAML config's keys)")
    seeds: Count = Field(1, ge=1, description="each point runs with seeds base.seed, base.seed+1, ...")
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
    synthesize: dict[str, Any] | None = Field(
        None, description="write_synthetic_dataset arguments (n, sites, size, seed): phantoms made at base "
                          "data.path on first use when nothing is there")
    _source: str = PrivateAttr("")  # the spec file, for messages (load_spec sets it)


class SweepSpec(TrialsSpec):
    """A sweep: what to vary, how to search, what to optimise, and the resources of a trial."""

    space: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                             description="dotted key -> {grid|choice|uniform|loguniform|randint: ...}")
    num_samples: int = Field(1, ge=1, description="samples of the random dimensions (per grid point)")
    search: Literal["basic", "optuna"] = Field("basic", description="basic: grid x random samples; optuna if installed")
    metric: str | None = Field(None, description="e.g. central/val/jaccard (default: the task's main metric on val)")
    mode: Literal["max", "min"] | None = None
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    threshold: float | None = Field(None, description="report: rounds to reach this metric value")
    partition_seed: Literal["fixed", "vary"] = Field(
        "fixed", description="fixed: every seed trains on the same clients' data (partition.seed = the base seed), "
                             "so seeds measure the model's and selection's randomness; vary: the partition changes too")

    @field_validator("space")
    @classmethod
    def _dimensions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, dim in space.items():
            if len(dim) != 1 or next(iter(dim)) not in KINDS:
                unknown = [k for k in dim if k not in KINDS]
                close = difflib.get_close_matches(unknown[0], KINDS, n=1) if unknown else []
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ValueError(f"space.{key}: give exactly one of {', '.join(KINDS)} (got {sorted(dim)}{hint})")
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
    ``model`` validates it (default ``SweepSpec``; the study spec uses the same loader). Errors are
    one line naming the file and each bad key (an unknown key with the closest known one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} not found: {path}")
    data = load_yaml(path)  # invalid YAML and duplicate keys are refused, naming the file
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path}: expected a mapping at the top level (got {type(data).__name__})")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), value)
    model = model or SweepSpec
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {kind} {path}: " + "; ".join(_spec_error(model, e) for e in exc.errors())) from None
    if "_source" in model.__private_attributes__:
        spec._source = str(path)
    return spec


def _spec_error(model: type[BaseModel], error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as ``key: message``; an unknown key gets the closest known key's name."""
    where = prefix + (".".join(str(p) for p in error["loc"]) or "(top level)")
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(f"{where}.") or message.startswith(f"{where}:"):
        return message  # our validators name the key themselves
    if error["type"] == "extra_forbidden":
        return f"{where}: {message} (unknown key{_did_you_mean(model, tuple(error['loc']), prefix)})"
    return f"{where}: {message}"


def _did_you_mean(model: type[BaseModel], loc: tuple, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
    return f"; did you mean {prefix}{'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) spec section at ``loc``; [] where it is not a section."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        section = field.annotation if field is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return []
        model = section
    return list(model.model_fields)


def _where(spec: TrialsSpec) -> str:
    """How messages name a spec: its file, where it was read from one."""
    return f"{spec.kind} {spec._source}" if spec._source else f"{spec.kind.removesuffix(' spec')} {spec.name}"


def base_config(spec: TrialsSpec) -> dict[str, Any]:
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
        for i, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):  # e.g. seed.x: a value, not a section, cannot hold keys
                raise ConfigError(f"{dotted}: {'.'.join(parents[:i + 1])} is not a section (it is {node!r})")
        node[leaf] = _merge(node.get(leaf) or {}, value) if isinstance(value, dict) else value
    return out


def trial_config(spec: SweepSpec, params: dict[str, Any], source: str = "trial") -> ExperimentConfig:
    def data() -> dict[str, Any]:
        base = base_config(spec)
        out = apply_params(base, params)
        out.setdefault("tracking", {})["group"] = spec.name
        if spec.partition_seed == "fixed":  # a user's own partition.seed is kept
            out.setdefault("partition", {}).setdefault("seed", base.get("seed", 0))
        return out

    return config_from(data, source)


def config_from(make: Callable[[], dict[str, Any]], source: str) -> ExperimentConfig:
    """``build_config(make())``, its errors (and those of making the dict) one line naming ``source``."""
    try:
        return build_config(make(), source=source)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(one_line(text if text.startswith("invalid config") else f"{source}: {text}")) from None


def one_line(text: str) -> str:
    """A multi-line config message (a header, then one indented line per field) as one line."""
    head, *rest = [line.strip() for line in text.splitlines() if line.strip()]
    return head + (" " + "; ".join(rest) if rest else "") if head.endswith(":") else "; ".join([head, *rest])


def _corners(kind: str, values: Any) -> list[Any]:
    """The values to validate a dimension with: every listed value, or both ends of a range."""
    return list(values) if kind in ("grid", "choice") else [values[0], values[1] - (kind == "randint")]


def _inside(kind: str, values: Any) -> Any:
    """A value a random dimension draws between its ends (a fraction for uniform/loguniform), so a
    type its ends hide is found before Tune draws it: 2 and 4 fit an int field, 2.74 does not."""
    low, high = values
    if kind == "randint":
        return low + (high - 1 - low) // 2
    for share in (0.5, 0.37, 0.123):
        value = low * (high / low) ** share if kind == "loguniform" else low + (high - low) * share
        if not float(value).is_integer():
            return value
    return value


def _refusal(spec: SweepSpec, params: dict[str, Any], key: str) -> str | None:
    """Why the trial config refuses ``params[key]`` (pydantic's message for that field), or None."""
    try:
        ExperimentConfig.model_validate(apply_params(base_config(spec), params))
    except ValidationError as exc:
        parts = tuple(key.split("."))
        for error in exc.errors():
            if tuple(map(str, error["loc"][:len(parts)])) == parts:
                return error["msg"]
    except (ConfigError, ValueError):
        return None  # not this field's type: the trial checks report it
    return None


def _check_draws(spec: SweepSpec, first: dict[str, Any]) -> None:
    """A random dimension must fit its field everywhere, not only at its ends (``fl.rounds:
    {uniform: [2, 4]}`` would pass there and fail on the first trial Tune draws)."""
    for key, dim in spec.space.items():
        kind, values = next(iter(dim.items()))
        if kind not in ("uniform", "loguniform", "randint"):
            continue
        inside = _inside(kind, values)
        reason = _refusal(spec, {**first, key: inside}, key)
        if reason is None or _refusal(spec, {**first, key: values[0]}, key) is not None:
            continue  # fits, or already fails at its end (reported with the trial)
        use = "randint or choice for whole numbers" if kind != "randint" else "choice with the allowed values"
        raise ConfigError(f"{_where(spec)}: space.{key}.{kind} draws values such as {inside:.4g}, which "
                          f"{key} refuses ({reason}); use {use}")


def corner_trials(spec: SweepSpec) -> Iterator[tuple[dict[str, Any], ExperimentConfig, Any]]:
    """Every combination of the listed values and range ends, as (params, config, prepared data);
    data is prepared once per distinct (task, data, partition, seed). Raises ConfigError naming
    the first trial that cannot run, or a random dimension whose draws its field refuses."""
    from cxrfl_ray.experiment import prepare

    keys = list(spec.space)
    choices = [_corners(*next(iter(spec.space[k].items()))) for k in keys]
    _check_draws(spec, {k: c[0] for k, c in zip(keys, choices)})
    prepared: dict[str, Any] = {}
    for combo in itertools.product(*choices):
        params = dict(zip(keys, combo))
        label = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(base)"
        cfg = trial_config(spec, params, source=f"{_where(spec)} trial {label}")
        key = json.dumps([cfg.task, cfg.data.model_dump(mode="json"), cfg.partition.model_dump(mode="json"), cfg.seed])
        if key not in prepared:
            try:
                prepared[key] = prepare(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{_where(spec)} trial {label}: {exc}") from None
        yield params, cfg, prepared[key]


# One image's (segmentation) or one image per class's (classification) outputs, in the form each
# task's ``collect`` returns them: ``summarise`` on these names every metric a trial reports.
_EXAMPLE_OUTPUTS = {
    "segmentation": lambda k: {"loss": np.ones(1), "tp": np.ones(1), "fp": np.zeros(1), "fn": np.zeros(1)},
    "classification": lambda k: {"probs": np.eye(k), "targets": np.arange(k), "loss": np.zeros(k)},
}


def metric_names(task: str, num_classes: int) -> list[str]:
    """The metric names a trial of ``task`` reports per view (``jaccard``, ``auroc_macro``, ...)."""
    return sorted(TASKS[task].summarise(_EXAMPLE_OUTPUTS[task](num_classes)))


def check_metric(spec: SweepSpec, metric: str, cfg: ExperimentConfig, prep: Any) -> None:
    """The metric must be one a trial reports (Tune would fail every trial on its first result):
    scope/id a view of this data (or round/server), name one of the task's metrics."""
    example = default_metric(cfg)
    if metric.count("/") != 2:
        raise ConfigError(f"{_where(spec)}: metric {metric!r}: write scope/id/name, e.g. {example}")
    scope, vid, name = metric.split("/")
    if scope == "round" and vid == "server":
        return  # the server's round counts (selected, replied, failures, train_loss)
    views = [f"{s}/{i}" for s, i in prep.views]
    from cxrfl_ray.fl.algorithms import algorithm_class

    if scope == "personal" and algorithm_class(cfg.fl.strategy.name).personal:
        views += [f"personal/{i}" for s, i in prep.views if s == "site"]
        scope_ok = ("site", vid) in prep.views  # each site's own model, on that site's test rows
    else:
        scope_ok = (scope, vid) in prep.views
    if not scope_ok:
        close = difflib.get_close_matches(f"{scope}/{vid}", views, n=1)
        raise ConfigError(f"{_where(spec)}: metric {metric!r}: no view {scope}/{vid} in this data"
                          + (f" (did you mean {close[0]}/{name}?)" if close else "")
                          + f"; views: {', '.join(views)}, round/server")
    names = metric_names(cfg.task, prep.num_classes)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"{_where(spec)}: metric {metric!r}: {cfg.task} trials report no {name!r}"
                          + (f" (did you mean {scope}/{vid}/{close[0]}?)" if close else "")
                          + f"; metrics: {', '.join(names)}")


def _check_keys(spec: SweepSpec) -> None:
    """Every key of ``base`` and ``space`` must be a config key (a typo named as such, with the
    closest key, rather than as a failing trial)."""
    for key in spec.space:
        loc = tuple(key.split("."))
        known = _fields_at(ExperimentConfig, loc[:-1])  # [] inside a free-form dict (strategy options)
        if known and loc[-1] not in known:
            raise ConfigError(f"{_where(spec)}: space.{key}: not a config key{_did_you_mean(ExperimentConfig, loc)}")
    try:
        ExperimentConfig.model_validate(base_config(spec))
    except ValidationError as exc:
        unknown = [_spec_error(ExperimentConfig, e, "base.") for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            raise ConfigError(f"{_where(spec)}: {'; '.join(unknown)}") from None


def validate(spec: SweepSpec) -> list[ExperimentConfig]:
    """Every combination of the listed values and range ends must be a valid, runnable config
    (data present, fits the task, enough patients), every random dimension's draws must fit their
    field, and the metric must be one the trials report; raises ConfigError naming the trial."""
    _check_keys(spec)
    trials = [(cfg, prep) for _, cfg, prep in corner_trials(spec)]
    configs = [cfg for cfg, _ in trials]
    metric = spec.metric or default_metric(configs[0])
    for cfg, prep in trials:
        check_metric(spec, metric, cfg, prep)
    if spec.search == "optuna":
        if any("grid" in d for d in spec.space.values()):
            raise ConfigError(f"{_where(spec)}: search optuna: use choice instead of grid dimensions")
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search optuna needs the optuna package (pip install optuna)")
    return configs


def check_trials_fit(spec: TrialsSpec, configs: list[ExperimentConfig], nodes: list[dict[str, float]]) -> None:
    """Every trial's placement group (a driver bundle, then one bundle per client slot) must fit
    on these nodes (Ray resources per node): Tune would wait for one that never fits forever,
    behind its "insufficient resources" warning. Raises ConfigError saying what to lower."""
    from cxrfl_ray.fl.backend import slots_in_bundles

    driver = {"CPU": spec.driver_cpus, "GPU": spec.driver_gpus}
    for cfg in configs:
        slots = spec.client_slots or cfg.clients_per_round
        client = {"num_cpus": cfg.fl.client_num_cpus, "num_gpus": cfg.fl.client_num_gpus}
        fits = 0  # client slots beside the driver, at best
        for i, node in enumerate(nodes):
            if all(node.get(r, 0.0) + 1e-9 >= need for r, need in driver.items() if need > 0):
                rest = [node if j != i else {r: node.get(r, 0.0) - driver.get(r, 0.0) for r in ("CPU", "GPU")}
                        for j, node in enumerate(nodes)]
                fits = max(fits, slots_in_bundles(rest, client))
        if fits >= slots:
            continue
        have = {r: sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
        largest = {r: max((n.get(r, 0.0) for n in nodes), default=0.0) for r in ("CPU", "GPU")}
        each = {"CPU": cfg.fl.client_num_cpus, "GPU": cfg.fl.client_num_gpus}
        need = {r: driver[r] + slots * each[r] for r in ("CPU", "GPU")}
        short = [r for r in ("CPU", "GPU") if need[r] > have[r] + 1e-9 or max(driver[r], each[r]) > largest[r] + 1e-9] \
            or [r for r in ("CPU", "GPU") if need[r] > 0]
        knobs = {"CPU": ["fl.client_num_cpus", "driver_cpus"], "GPU": ["fl.client_num_gpus", "driver_gpus"]}
        lower = ["client_slots" if spec.client_slots else "fl.clients_per_round (or set client_slots)"] \
            + [k for r in short for k in knobs[r]]
        raise ConfigError(
            f"{_where(spec)}: a trial's placement group needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs "
            f"(driver_cpus {driver['CPU']:g}, driver_gpus {driver['GPU']:g}, plus {slots} client slot(s) of "
            f"fl.client_num_cpus {each['CPU']:g}, fl.client_num_gpus {each['GPU']:g}), but this Ray cluster "
            f"({have['CPU']:g} CPUs, {have['GPU']:g} GPUs on {len(nodes)} node(s)) fits {fits} client slot(s) "
            f"beside the driver, and Tune would wait for it forever: lower {', '.join(lower)}")


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


def placement(spec: TrialsSpec, cfg: ExperimentConfig):
    """A federated trial's placement group: one bundle for its driver, one per client slot."""
    from ray import tune

    slots = spec.client_slots or cfg.clients_per_round
    client = {"CPU": cfg.fl.client_num_cpus, **({"GPU": cfg.fl.client_num_gpus} if cfg.fl.client_num_gpus else {})}
    driver = {"CPU": spec.driver_cpus, **({"GPU": spec.driver_gpus} if spec.driver_gpus else {})}
    return tune.PlacementGroupFactory([driver] + [client] * slots, strategy="PACK")


def _resources(spec: SweepSpec):
    def for_trial(params: dict[str, Any]):
        return placement(spec, trial_config(spec, params))

    return for_trial


def close_wandb() -> None:
    """Close W&B's service (if a run used it) before Ray ends a trial's worker."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


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

        def report(rnd: int, metrics: dict[str, float]) -> None:
            tune.report({**metrics, "round": rnd, "run_dir": str(run_dir)})

        if (run_dir / "summary.json").is_file():  # finished before an interruption: report, don't rerun
            report(cfg.fl.rounds, _final_metrics(run_dir))
            return  # nothing ran: not an attempt
        attempts = run_dir.with_suffix(".attempts")  # Tune's retries, counted where the report can see them
        attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.is_file() else 1))
        done = saved_round(run_dir)
        try:
            if done is not None and done < cfg.fl.rounds:
                run_federated(resume=run_dir, quiet=True, on_round=report)
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # started but never saved a round: start again
                run_federated(cfg, quiet=True, run_dir=run_dir, on_round=report)
        finally:
            close_wandb()

    return run_trial


# What a trial reports and trials.parquet keeps: the global model's views, the server's round
# counts, and a personal algorithm's per-site models (FedBN: global + the site's BatchNorm).
TRIAL_SCOPES = ("central", "site", "holdout", "round", "personal")


def _final_metrics(run_dir: Path) -> dict[str, float]:
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    last = max(r["round"] for r in rows)
    return {f"{r['scope']}/{r['id']}/{r['metric']}": r["value"] for r in rows
            if r["round"] == last and r["scope"] in TRIAL_SCOPES}


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


def make_phantoms(spec: TrialsSpec) -> None:
    """The spec's synthetic data, written on first use (so smoke sweeps run on a fresh checkout)."""
    data = base_config(spec).get("data")
    path = data.get("path") if isinstance(data, dict) else None  # a bad data section is validate's to report
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
    if resume and (sweep_dir / SPEC_FILE).is_file():
        # Fields added since the sweep started count as their defaults (so it still resumes).
        saved = {**SweepSpec.model_construct(name=spec.name).model_dump(mode="json"),
                 **yaml.safe_load((sweep_dir / SPEC_FILE).read_text())}
        if saved != spec.model_dump(mode="json"):
            changed = sorted(k for k in set(saved) | set(spec.model_dump(mode="json"))
                             if saved.get(k) != spec.model_dump(mode="json").get(k))
            raise ConfigError(f"--resume: {spec_path} differs from the spec this sweep started with "
                              f"({sweep_dir / SPEC_FILE}) in: {', '.join(changed)}")

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our one line per round instead of Tune's tables
    import ray
    from ray import tune

    from cxrfl_ray.fl.engine import start_ray

    if not ray.is_initialized():
        start_ray(**({**spec.ray_init, "address": address} if address else spec.ray_init))
    if (address or spec.ray_init.get("address") or os.environ.get("RAY_ADDRESS") or "local") == "local":
        # A local Ray is all there will be; a cluster we join may add nodes (autoscaling) while trials wait.
        check_trials_fit(spec, configs, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    from cxrfl_ray.fl.backend import release_idle_actors

    release_idle_actors()  # actors kept from earlier simulations in this process hold CPUs trials need
    sweep_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused sweep leaves no folder behind
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    spec = with_absolute_paths(spec)
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
                if r["scope"] in TRIAL_SCOPES:
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
