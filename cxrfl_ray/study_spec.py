"""The study spec (``cxrfl study SPEC``, see ``cxrfl_ray.study``): a small validated model of
where the hospitals' data is and how each step runs, and the experiment configs it yields. Every
field is checked (``extra="forbid"``, errors name the field) before any step runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from cxrfl_ray.cascade import LUNG_THRESHOLD
from cxrfl_ray.config import ConfigError, ExperimentConfig, StrategyConfig
from cxrfl_ray.presets import PRESETS
from cxrfl_ray.sweep import apply_params, config_from, load_spec


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_preset(name: str, task: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    if PRESETS[name].get("task") != task:
        raise ValueError(f"preset {name!r} is a {PRESETS[name].get('task')} preset, not {task}")
    return name


class IngestSpec(_Spec):
    """How the source folders become rows (``cxrfl ingest``'s options)."""

    max_size: int | None = Field(256, ge=16, description="longer side at most this many pixels")
    val_frac: float = Field(0.1, ge=0, lt=1)
    test_frac: float = Field(0.2, gt=0, lt=1, description="patient share for test where the source has no split")
    seed: int = 0
    columns: dict[str, str] = Field(default_factory=dict, description="field -> CSV column (manifest, lungseg)")
    workers: int = Field(2, ge=1, description="decoding threads")


class StrategySpec(StrategyConfig):
    """One federated segmentation run: a Flower strategy, its options, optional config overrides."""

    label: str | None = Field(None, description="run name fl-LABEL (default: the strategy name)")
    set: dict[str, Any] = Field(default_factory=dict, description="config overrides for this run only")

    @property
    def run_name(self) -> str:
        return f"fl-{self.label or self.name}"


class SegmentationSpec(_Spec):
    preset: str = "real-segmentation"
    set: dict[str, Any] = Field(default_factory=dict, description="config overrides (nested or dotted keys)")
    strategies: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec()], min_length=1)
    baselines: bool = Field(True, description="also pooled and local-only training with the same rows seen")

    @field_validator("preset")
    @classmethod
    def _segmentation_preset(cls, name: str) -> str:
        return _check_preset(name, "segmentation")

    @model_validator(mode="after")
    def _distinct_runs(self) -> "SegmentationSpec":
        names = [s.run_name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategies: run names {names} repeat; give each a distinct label")
        return self


class ClassificationSpec(_Spec):
    preset: str = "real-classification"
    set: dict[str, Any] = Field(default_factory=dict, description="config overrides (nested or dotted keys)")

    @field_validator("preset")
    @classmethod
    def _classification_preset(cls, name: str) -> str:
        return _check_preset(name, "classification")


class MaskSpec(_Spec):
    """``cxrfl mask``'s options (flagged images are kept: the partitions must match)."""

    threshold: float = Field(LUNG_THRESHOLD, gt=0, lt=1)
    min_area: float = Field(0.05, ge=0, le=1)
    max_area: float = Field(0.8, ge=0, le=1)
    max_components: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)


class CamSpec(_Spec):
    """``cxrfl cam``'s options."""

    n: int = Field(16, ge=1)
    method: Literal["gradcam", "gradcam++", "scorecam", "eigencam"] = "gradcam"
    layer: str | None = None
    split: str = "test"
    seed: int = 0


class StudySpec(_Spec):
    """A study: where the hospitals' data is, and how each step runs."""

    name: str = Field(min_length=1)
    out_dir: str = Field("runs/studies", description="the study folder is out_dir/name unless --out")
    layout: Literal["manifest", "lungseg", "rsna", "folders"] = "manifest"
    sources: list[str] = Field(min_length=1, description="one folder per hospital")
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    set: dict[str, Any] = Field(default_factory=dict, description="config overrides for every experiment")
    segmentation: SegmentationSpec = Field(default_factory=SegmentationSpec)
    classification: ClassificationSpec = Field(default_factory=ClassificationSpec)
    mask: MaskSpec = Field(default_factory=MaskSpec)
    cam: CamSpec = Field(default_factory=CamSpec)
    _source: str = PrivateAttr("")  # the spec file, for messages (load_spec sets it)

    @field_validator("sources")
    @classmethod
    def _sources_exist(cls, sources: list[str]) -> list[str]:
        missing = [s for s in sources if not Path(s).is_dir()]
        if missing:
            raise ValueError(f"source folder(s) not found: {missing}")
        return sources


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Read and validate a study spec; ``overrides`` are ``KEY=VALUE`` on the spec."""
    return load_spec(path, overrides, model=StudySpec, kind="study spec")


# -- experiment configs ------------------------------------------------------------------------

def experiment(spec: StudySpec, section: SegmentationSpec | ClassificationSpec, name: str, data: Path,
               out: Path, strategy: StrategySpec | None = None, **fixed: Any) -> ExperimentConfig:
    """The preset, then the spec's ``set``, the section's, the strategy's, then what the study fixes.
    Errors are one line naming the spec file and the experiment."""
    def merged() -> dict[str, Any]:
        cfg = apply_params(PRESETS[section.preset], spec.set)
        cfg = apply_params(cfg, section.set)
        if strategy is not None:
            cfg = apply_params(cfg, strategy.set)
            cfg.setdefault("fl", {})["strategy"] = {"name": strategy.name, "options": dict(strategy.options)}
        return apply_params(cfg, {"name": f"{spec.name}-{name}", "data.path": str(data), "out_dir": str(out),
                                  "tracking.group": spec.name, **fixed})

    return config_from(merged, f"{_where(spec)}: {name}")


def _where(spec: StudySpec) -> str:
    """How messages name a study: its spec file, where it was read from one."""
    return f"study spec {spec._source}" if spec._source else f"study {spec.name}"


def validate(spec: StudySpec, out: Path) -> None:
    """Build every experiment config and strategy now, so a typo fails before any step runs."""
    from cxrfl_ray.fl.strategies import make_strategy

    full, n = out / "data" / "full", len(spec.sources)
    experiment(spec, spec.segmentation, "segmentation", full, out)
    experiment(spec, spec.classification, "classification", full, out)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower warns about options we set on purpose
    try:
        for s in spec.segmentation.strategies:
            experiment(spec, spec.segmentation, s.run_name, full, out, s)
            try:
                make_strategy(s.name, dict(s.options), num_clients=n, per_round=n, seed=0, client_eval=False)
            except ValueError as exc:
                raise ConfigError(f"{_where(spec)}: segmentation.strategies {s.run_name}: {exc}") from None
    finally:
        flwr_log.setLevel(level)
