"""The benchmark spec (``cxrfl benchmark SPEC``, see ``cxrfl_ray.benchmark``) and the trials it
plans. Everything is checked here, before Ray starts: the spec's fields, every trial's experiment
config, every federated method's options, and run folders left by an earlier run of another spec.

The same budget for every model: a federated run trains ``fl.rounds x train.epochs`` on its
expected cohort; pooled and local-only training get as many epochs as see about as many rows
(``study.epochs_for``; exactly as many when ``train.steps`` fixes an epoch's rows).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from cxrfl_ray.config import ConfigError, ExperimentConfig, StrategyName, Task, load_config, load_yaml
from cxrfl_ray.sweep import (_Spec, TrialsSpec, _absolute, _spec_error, _where, apply_params, base_config,
                             config_from, load_spec, trial_name)

BASELINES = ("pooled", "local")
METHODS = (*BASELINES, *get_args(StrategyName))
DEFAULT_METHODS = ("pooled", "local", "fedavg")


def _method_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class MethodSpec(_Spec):
    """One row of the table: pooled, local-only (one model per client), or a federated strategy."""

    name: str = Field(description="pooled, local, or an fl.strategy.name (fedavg, fedprox, fedbn, ...)")
    options: dict[str, float | int | bool | str] = Field(default_factory=dict,
                                                         description="fl.strategy.options, e.g. {proximal_mu: 0.01}")
    label: str | None = Field(None, description="its name in the table (default: name), to run one method twice")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in METHODS:
            close = difflib.get_close_matches(name, METHODS, n=1)
            raise ValueError(f"unknown method {name!r}{f' (did you mean {close[0]}?)' if close else ''}; "
                             f"methods: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _options(self) -> "MethodSpec":
        if self.name in BASELINES and self.options:
            raise ValueError(f"method {self.name}: options are for federated methods")
        if self.name == "fedprox" and not float(self.options.get("proximal_mu", 0) or 0) > 0:
            raise ValueError("method fedprox: give options.proximal_mu > 0 (with 0 FedProx trains as FedAvg)")
        return self

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def federated(self) -> bool:
        return self.name not in BASELINES


class BenchmarkSpec(TrialsSpec):
    """A benchmark: the base experiment, its tasks, the methods, seeds and the resources of a trial."""

    kind = "benchmark spec"
    tasks: dict[Task, dict[str, Any]] = Field(
        default_factory=dict, description="task -> config overrides for it (nested or dotted keys); "
                                          "none: the base config's task alone")
    methods: list[Annotated[MethodSpec, BeforeValidator(_method_name)]] = Field(
        default_factory=lambda: [MethodSpec(name=m) for m in DEFAULT_METHODS], min_length=1)
    out_dir: str = "runs/benchmarks"

    @model_validator(mode="after")
    def _distinct(self) -> "BenchmarkSpec":
        titles = [m.title for m in self.methods]
        if len(set(titles)) != len(titles):
            twice = sorted({t for t in titles if titles.count(t) > 1})
            raise ValueError(f"methods: {', '.join(twice)} listed twice; give each run a distinct label")
        return self


def _spec_file(path: Path) -> bool:
    """A benchmark spec has keys no experiment config has (methods, base, tasks, ...)."""
    data = load_yaml(path)
    own = set(BenchmarkSpec.model_fields) - set(ExperimentConfig.model_fields)
    return isinstance(data, dict) and bool(own & set(data))


def load_benchmark(path: str | Path, overrides: list[str] | None = None, methods: list[str] | None = None,
                   seeds: int | None = None, max_concurrent: int | None = None) -> BenchmarkSpec:
    """A benchmark spec file, or an experiment config file made one (pooled, local and its own
    strategy unless ``methods``); ``overrides`` are KEY=VALUE on the spec (a config: on the
    config). ``methods`` (names or labels; options from the spec, or from a config's own
    strategy), ``seeds`` and ``max_concurrent`` replace the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark spec (or experiment config) not found: {path}")
    if _spec_file(path):
        spec = load_spec(path, overrides, model=BenchmarkSpec, kind="benchmark spec")
        listed = {m.name: m for m in reversed(spec.methods)} | {m.title: m for m in spec.methods}
    else:
        cfg = load_config(path, overrides)  # one line naming the file and the field
        spec = BenchmarkSpec(name=cfg.name, base=cfg.model_dump(mode="json"))
        spec._source = str(path)
        own = cfg.fl.strategy
        listed = {own.name: MethodSpec(name=own.name, options=dict(own.options))} if own.options else {}
        methods = methods if methods is not None else ["pooled", "local", own.name]  # against its own strategy
    update: dict[str, Any] = {}
    if methods is not None:
        update["methods"] = [listed.get(m) or _cli_method(m) for m in methods]
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: at least 1")
        update["seeds"] = seeds
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {max_concurrent}: at least 1")
        update["max_concurrent"] = max_concurrent
    if not update:
        return spec
    try:
        fresh = BenchmarkSpec.model_validate({**spec.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError(f"benchmark {path}: " + "; ".join(_spec_error(BenchmarkSpec, e) for e in exc.errors())) from None
    fresh._source = spec._source
    return fresh


def _cli_method(name: str) -> MethodSpec:
    try:
        return MethodSpec(name=name)
    except ValidationError as exc:
        raise ConfigError(f"--methods {name}: " + exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


# -- trials ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    """One model of the benchmark: a task, a method, a seed, and (local-only) the client it trains on."""

    task: str
    method: str  # the method's title
    kind: Literal["pooled", "local", "federated"]
    seed: int
    train_site: str  # the site (or client<i>) a local-only model trains on, else "all"
    client: int | None
    cfg: ExperimentConfig

    @property
    def params(self) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "seed": self.seed, "client": self.client}

    @property
    def name(self) -> str:
        """Its run folder's name: from the parameters alone, so a rerun finds it."""
        return trial_name(self.params)

    @property
    def label(self) -> str:
        site = f"/{self.train_site}" if self.kind == "local" else ""
        return f"{self.task}/{self.method}{site}/seed{self.seed}"


def task_names(spec: BenchmarkSpec) -> list[str]:
    """The spec's tasks, or the base config's own (its validation names a bad one)."""
    return list(spec.tasks) or [base_config(spec).get("task", ExperimentConfig.model_fields["task"].default)]


def experiment(spec: BenchmarkSpec, task: str, name: str, seed: int | None, out: Path, **fixed: Any) -> ExperimentConfig:
    """The preset and base, the task's overrides, then what the benchmark fixes; local paths made
    absolute (trials run in their own working folder). Errors are one line naming the spec and run."""
    def merged() -> dict[str, Any]:
        cfg = apply_params(base_config(spec), {"task": task})
        cfg = apply_params(cfg, spec.tasks.get(task, {}))
        cfg = apply_params(cfg, {**({"seed": seed} if seed is not None else {}), "name": f"{spec.name}-{name}",
                                 "out_dir": str(out), "tracking.group": spec.name, **fixed})
        data, model = cfg.get("data") or {}, cfg.get("model") or {}
        paths = {k: _absolute(k, section.get(k.split(".")[1])) for k, section in
                 (("data.path", data), ("model.pretrained", model)) if isinstance(section, dict)}
        return apply_params(cfg, {k: v for k, v in paths.items() if v is not None})

    return config_from(merged, f"{_where(spec)}: {task} {name}")


def _check_method(spec: BenchmarkSpec, method: MethodSpec, cfg: ExperimentConfig, clients: int) -> None:
    """The strategy and its algorithm accept the options and the config (as ``run_federated`` checks)."""
    from cxrfl_ray.fl.rounds import ServerHooks
    from cxrfl_ray.fl.strategies import make_strategy

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower warns about options we set on purpose
    try:
        make_strategy(method.name, dict(method.options), num_clients=clients, per_round=cfg.clients_per_round,
                      seed=cfg.seed, client_eval=cfg.fl.client_eval)
        ServerHooks.check(cfg, clients)
    except ImportError as exc:
        raise ConfigError(f"{_where(spec)}: methods {method.title}: not available here ({exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{_where(spec)}: methods {method.title}: {exc}") from None
    finally:
        flwr_log.setLevel(level)


def plan_trials(spec: BenchmarkSpec, out: Path) -> list[Trial]:
    """Every trial of the benchmark, validated, its data prepared once per (task, seed); configs
    with ``partition.clients: sites`` counted, as their run folders keep them. Federated trials
    come first (the longest, so the short ones fill in beside them)."""
    from cxrfl_ray.experiment import prepare, resolve_site_clients
    from cxrfl_ray.study import client_sites, epochs_for

    runs = out / "trials"
    federated, baselines = [], []
    for task in task_names(spec):
        base_seed = experiment(spec, task, task, None, runs).seed  # seeds base.seed, base.seed + 1, ...
        for seed in range(base_seed, base_seed + spec.seeds):
            try:
                prep = prepare(experiment(spec, task, f"{task}-s{seed}", seed, runs))
            except ConfigError as exc:
                raise ConfigError(f"{_where(spec)}: {task} seed {seed}: {exc}") from None
            sites = client_sites(prep)

            def trial(method: MethodSpec, kind: str, name: str, site: str = "all", client: int | None = None,
                      **fixed: Any) -> Trial:
                cfg = resolve_site_clients(experiment(spec, task, f"{task}-{name}-s{seed}", seed, runs, **fixed),
                                           prep.dataset)
                return Trial(task, method.title, kind, seed, site, client, cfg)

            for m in spec.methods:
                if m.federated:
                    t = trial(m, "federated", m.title, **{"fl.strategy": {"name": m.name, "options": dict(m.options)}})
                    _check_method(spec, m, t.cfg, len(prep.plan.clients))
                    federated.append(t)
                elif m.name == "pooled":
                    baselines.append(trial(m, "pooled", "pooled",
                                           **{"train.epochs": epochs_for(prep, prep.pooled_train_rows.size)}))
                else:
                    baselines += [trial(m, "local", f"local-{site}", site, i, **{"train.epochs": epochs_for(prep, rows.size)})
                                  for i, (site, rows) in enumerate(zip(sites, prep.plan.clients))]
    return federated + baselines
