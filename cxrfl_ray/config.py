"""One typed, validated experiment config: YAML in, YAML out, saved next to its results.

Everything is checked before anything starts (pydantic, ``extra="forbid"``), and errors name
the field: ``train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

Task = Literal["segmentation", "classification"]


def _not_bool(value: Any) -> Any:
    """YAML's ``true`` is a bool, and Python's bool is an int: without this check ``fl.fraction:
    true`` would quietly be 1.0."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_not_bool", "Input should be a number, not a boolean")
    return value


def _count_or_sites(value: Any) -> Any:
    """One clear error for ``partition.clients`` instead of one per member of the union."""
    if value == "sites" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise PydanticCustomError("count_or_sites", "Input should be a whole number or 'sites'")


# Counts (rounds, clients, epochs, steps, sizes, seed) are strict: ``true`` or ``2.0`` or ``"3"``
# is refused with the field named rather than read as a number. Other numbers take ints and
# numeric strings (``1e-3`` from a dict built elsewhere) but not booleans.
Count = Annotated[int, Field(strict=True)]
Number = Annotated[float, BeforeValidator(_not_bool)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Section):
    """Which dataset, and how its images become tensors."""

    path: str = Field("runs/default/data", description="dataset folder written by cxrfl synth/ingest")
    size: Count = Field(128, ge=16, le=4096, description="images are resized to size x size")
    channels: Annotated[Literal[1, 3], BeforeValidator(_not_bool)] = Field(
        1, description="3 repeats grey for ImageNet-pretrained models")
    imagenet_norm: bool = Field(False, description="normalise with ImageNet mean/std (paper, 3 channels); "
                                "same as normalize: imagenet")
    normalize: Literal["none", "image", "imagenet"] | None = Field(
        None, description="input standardisation: none keeps [0, 1]; image scales each image to mean 0, std 1 "
        "(no statistics to share between sites, robust to scanner contrast); imagenet uses ImageNet's "
        "mean/std. Default: imagenet if imagenet_norm, else none")
    augment: bool | Literal["paper", "light"] = Field(
        True, description="seeded augmentations: true or paper = the CXR-FL paper's for the task (segmentation: "
        "rotations to 90 degrees, 1-2x zoom, flips), light = small rotations, zoom and contrast, no flips; false = none")
    train_splits: list[str] = Field(default_factory=lambda: ["train"])
    val_split: str = "val"
    test_split: str = "test"
    holdout_sites: list[str] = Field(default_factory=list, description="sites that never train")
    num_workers: Count = Field(0, ge=0, description="DataLoader worker processes")
    cache_mb: Count = Field(
        1024, ge=0, description="decoded, resized pixels kept per process (each Ray actor, the driver) "
        "so later epochs and rounds skip PNG decoding; MiB, 0 = decode every epoch"
    )


    @model_validator(mode="after")
    def _one_normalisation(self) -> "DataConfig":
        if self.imagenet_norm and self.normalize not in (None, "imagenet"):
            raise ValueError(f"data.imagenet_norm is true but data.normalize is {self.normalize!r}; set one of them")
        return self

    @property
    def normalization(self) -> str:
        """The input standardisation in effect (``normalize``, or ``imagenet_norm``'s)."""
        return self.normalize or ("imagenet" if self.imagenet_norm else "none")


class PartitionConfig(Section):
    """How the training rows are split into clients (see docs/DATA.md, Partitions)."""

    scheme: Literal["iid", "dirichlet", "quantity", "site"] = "iid"
    clients: Annotated[Count | Literal["sites"], BeforeValidator(_count_or_sites)] = Field(
        3, description="number of clients; 'sites' (scheme site only): one per training site of the dataset, "
        "counted when the dataset is opened")
    alpha: Number = Field(0.5, gt=0, description="dirichlet concentration (smaller = more label skew)")
    power: Number = Field(1.0, ge=0, description="quantity power-law exponent (larger = more size skew)")
    min_size: Count = Field(1, ge=0, description="minimum patients per client")
    seed: Count | None = Field(None, description="the partition's own seed (default: the config's seed); a sweep "
                                                 "with seeds: N pins it to its base seed unless partition_seed: vary")

    def scheme_args(self) -> dict[str, float]:
        extra = {"dirichlet": {"alpha": self.alpha}, "quantity": {"power": self.power}}.get(self.scheme, {})
        return {**extra, **({"min_size": self.min_size} if self.scheme in ("dirichlet", "quantity") else {})}


    @model_validator(mode="after")
    def _sites_need_site_scheme(self) -> "PartitionConfig":
        if self.clients == "sites" and self.scheme != "site":
            raise ValueError(f"partition.clients 'sites' needs partition.scheme 'site' (got {self.scheme!r})")
        if isinstance(self.clients, int) and self.clients < 1:
            raise ValueError(f"partition.clients must be at least 1 (got {self.clients})")
        return self


class ModelConfig(Section):
    """A model by registry name; pretrained weights only from a local file or an explicit hub ask."""

    name: str = "resnet18"
    pretrained: str | None = Field(
        None, description="path to a local .pth/.safetensors file, or 'hub' to download (explicit)"
    )
    norm: Literal["batch", "group"] = Field(
        "batch", description="group: BatchNorm layers become GroupNorm (no running statistics for FedAvg to average)"
    )


class TrainConfig(Section):
    """Local training: optimiser, loss, and how much work (epochs or steps)."""

    optimizer: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: Number = Field(1e-3, gt=0)
    weight_decay: Number = Field(0.0, ge=0)
    momentum: Number = Field(0.9, ge=0, lt=1, description="SGD only")
    batch_size: Count = Field(8, ge=1)
    eval_batch_size: Count = Field(32, ge=1)
    epochs: Count = Field(1, ge=1, description="epochs (centralised) or local epochs per round (federated)")
    steps: Count | None = Field(
        None, ge=1, description="an epoch is this many optimiser steps instead of one pass (comparable across client sizes)"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine decays to 0 over the run: all epochs (centralised) or all rounds "
        "(federated: each client's steps continue one schedule across rounds instead of restarting)")
    loss: Literal["dice_bce", "dice", "bce", "cross_entropy"] | None = Field(
        None, description="default: dice_bce for segmentation, cross_entropy for classification"
    )
    class_weights: list[Number] | None = Field(None, description="cross-entropy class weights")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Count | None = Field(None, ge=1, description="torch CPU threads")


StrategyName = Literal["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedavgm",
                       "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg",
                       "fedbn", "scaffold", "fednova"]


class StrategyConfig(Section):
    """A Flower strategy by name; ``options`` go to its constructor (e.g. ``eta``, ``tau``,
    ``beta_1`` for FedAdam; ``proximal_mu`` for FedProx; ``server_momentum`` for FedAvgM)."""

    name: StrategyName = "fedavg"
    options: dict[str, float | int | bool | str] = Field(default_factory=dict)


class FLConfig(Section):
    """The federation: rounds, participation, strategy, and Ray resources per client."""

    rounds: Count = Field(5, ge=1)
    fraction: Number = Field(1.0, gt=0, le=1, description="share of clients trained each round")
    min_clients: Count = Field(1, ge=1, description="at least this many clients per round")
    clients_per_round: Count | None = Field(None, ge=1, description="exact cohort size (then fraction is unused)")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    client_num_cpus: Number = Field(1.0, gt=0, description="Ray CPUs per virtual client")
    client_num_gpus: Number = Field(0.0, ge=0, description="fractional GPUs per client (0.25 packs four)")
    ray_init: dict[str, Any] = Field(default_factory=dict, description="extra ray.init arguments")
    round_timeout: Number = Field(600.0, gt=0, description="seconds to wait for a round's replies")
    client_eval: bool = Field(False, description="also evaluate on each selected client's val rows")
    overlap_evaluation: bool = Field(
        True, description="send round r+1 before the server evaluates round r, so clients train meanwhile "
                          "(simulations; the same results)")
    thresholds: dict[str, Number] = Field(default_factory=dict, description="e.g. {jaccard: 0.92}")
    min_replies: Count = Field(1, ge=1, description="a round needs this many successful (finite) client updates")
    max_failed_rounds: Count = Field(
        1, ge=1, description="the run fails after this many consecutive rounds below fl.min_replies, "
        "quoting the first client error")
    deadline_s: Number | None = Field(None, gt=0, description="simulated seconds a round waits; later replies "
                                                              "are stragglers (docs/SYSTEM.md)")
    overselect: Number = Field(1.0, ge=1, description="select ceil(overselect x cohort) available clients and "
                                                      "aggregate the cohort's worth that finish first")
    straggler: Literal["drop", "partial"] = Field(
        "drop", description="drop: a late reply is not aggregated; partial: a slow client does the local steps "
                            "that fit the deadline (needs fl.deadline_s)")
    compression: Literal["none", "fp16", "int8"] = Field(
        "none", description="how an update travels: as it is, half precision, or int8 with a scale per tensor")


class FaultsConfig(Section):
    client_failure_rate: Number = Field(0.0, ge=0, lt=1, description="seeded share of client trainings that fail")
    failure: Literal["raise", "exit"] = Field(
        "raise", description="how an injected failure looks: the client raises, or its process dies (as when OOM-killed)")


class TrackingConfig(Section):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cxrfl-ray"
    group: str | None = Field(None, description="W&B group (a sweep groups its trials by its name)")
    pictures: Count = Field(8, ge=0, le=16, description="seeded test images drawn with their predicted and true "
                                                       "lung outlines in the run folder's overlays.png "
                                                       "(segmentation; classification writes confusion.png and "
                                                       "roc.png); 0 draws none")


class AdaptiveClipConfig(Section):
    """Adaptive clipping (Andrew et al. 2021): the clip norm follows a quantile of the update
    norms, learned from a noised count of the clients that were not clipped."""

    target_quantile: Number = Field(0.5, gt=0, lt=1, description="share of updates the clip should leave unclipped")
    clip_lr: Number = Field(0.2, gt=0, description="geometric step of the clip norm per round")
    count_stddev: Number | None = Field(
        None, gt=0, description="std of the noise on the unclipped count (default: cohort / 20 as Andrew et al., "
                                  "at least noise_multiplier)")


class PrivacyConfig(Section):
    """Differential privacy: none; client-level DP-FedAvg (each client's whole update clipped on
    the server, Gaussian noise on their average); or sample-level DP-SGD on each client (Opacus).
    Give ``noise_multiplier`` or ``target_epsilon`` (docs/PRIVACY.md)."""

    mode: Literal["none", "client", "sample"] = "none"
    noise_multiplier: Number | None = Field(None, ge=0, description="noise std / clip norm (z)")
    target_epsilon: Number | None = Field(None, gt=0, description="solve z so the planned rounds end at this epsilon")
    clip_norm: Number = Field(1.0, gt=0, description="L2 clip (C): of a client's update (client) or of a "
                                                     "sample's gradient (sample); the start value with adaptive_clip")
    adaptive_clip: AdaptiveClipConfig | None = Field(None, description="client mode: learn the clip norm")
    delta: Number = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's RDP or PLD accountant")
    secure_noise: bool = Field(False, description="draw the noise from the OS's entropy, not from the config's seed "
                                                  "(a real federation: whoever knows the seed could regenerate and "
                                                  "subtract seeded noise); the run is then not reproducible")

    @model_validator(mode="after")
    def _complete(self) -> "PrivacyConfig":
        if self.mode == "none":
            given = [k for k in ("noise_multiplier", "target_epsilon", "adaptive_clip") if getattr(self, k) is not None]
            given += ["secure_noise"] if self.secure_noise else []
            if given:
                raise ValueError(f"privacy.{given[0]} is set but privacy.mode is 'none'; set privacy.mode "
                                 f"(client or sample) or remove it")
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"privacy.mode {self.mode!r}: give exactly one of privacy.noise_multiplier and "
                             f"privacy.target_epsilon")
        if self.adaptive_clip is not None and self.mode != "client":
            raise ValueError("privacy.adaptive_clip is for privacy.mode 'client' (it adapts the update clip)")
        return self


class SpeedConfig(Section):
    """Each client's compute time factor against the reference client (5: five times slower),
    drawn from the config's seed."""

    distribution: Literal["constant", "lognormal", "two_speed"] = Field(
        "constant", description="constant 1; lognormal with median 1; two_speed: a share of slow clients")
    sigma: Number = Field(0.5, gt=0, description="lognormal: the spread of log(factor)")
    slow_share: Number = Field(0.25, ge=0, le=1, description="two_speed: share of slow clients")
    slow_factor: Number = Field(5.0, ge=1, description="two_speed: their time factor")


class AvailabilityConfig(Section):
    """When each client is online: always; a seeded cycle (online ``online_share`` of every
    ``period_s``, each client at its own phase); or a trace of online intervals."""

    online_share: Number = Field(1.0, gt=0, le=1, description="share of each period a client is online")
    period_s: Number = Field(86400.0, gt=0, description="the cycle's length in simulated seconds")
    trace: str | None = Field(None, description="CSV client,start_s,end_s of online intervals (FedScale-like); "
                                                "clients it does not list follow the cycle (always online by default)")


class SystemConfig(Section):
    """The simulated system (docs/SYSTEM.md): client speeds, bandwidths and availability, and how a
    client's round time is modelled. Only the simulated clock uses it; training is unchanged."""

    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    up_mbps: Number = Field(20.0, gt=0, description="uplink of the median client (Mbit/s)")
    down_mbps: Number = Field(100.0, gt=0, description="downlink of the median client (Mbit/s)")
    bandwidth_sigma: Number = Field(0.0, ge=0, description="lognormal spread of both bandwidths (0: all equal)")
    profile_trace: str | None = Field(None, description="CSV client,speed,up_mbps,down_mbps (replaces the draws)")
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)
    compute: Literal["model", "measured"] = Field(
        "model", description="model: local steps x seconds_per_step x speed (independent of this machine); "
                             "measured: the client's measured fit time x speed")
    seconds_per_step: Number = Field(0.25, gt=0, description="model: the reference client's seconds per local step")


class ExperimentConfig(Section):
    """An experiment: task, data, model, local training, seed and where results go."""

    name: str = "experiment"
    task: Task = "classification"
    seed: Count = 0
    out_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def clients_per_round(self) -> int:
        if self.fl.clients_per_round is not None:
            return self.fl.clients_per_round
        if self.partition.clients == "sites":
            raise ConfigError("partition.clients is 'sites': the count is known once the dataset is opened "
                              "(experiment.prepare); set a number where it is needed first (e.g. a sweep)")
        return max(self.fl.min_clients, round(self.fl.fraction * self.partition.clients))

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        loss = self.train.loss
        if loss is not None:
            wanted = {"segmentation": {"dice_bce", "dice", "bce"}, "classification": {"cross_entropy"}}
            if loss not in wanted[self.task]:
                raise ValueError(f"train.loss {loss!r} does not fit task {self.task!r}; use one of {sorted(wanted[self.task])}")
        from cxrfl_ray.tasks.models import ModelError, get_spec

        try:
            get_spec(self.model.name, self.task)
        except ModelError as exc:
            raise ValueError(f"model.name: {exc}") from None
        fixed = self.partition.clients if isinstance(self.partition.clients, int) else None
        if fixed is not None and self.fl.min_clients > fixed:
            raise ValueError(
                f"fl.min_clients {self.fl.min_clients} is more than partition.clients {self.partition.clients}"
            )
        if fixed is not None and (self.fl.clients_per_round or 0) > fixed:
            raise ValueError(f"fl.clients_per_round {self.fl.clients_per_round} is more than partition.clients "
                             f"{self.partition.clients}")
        from cxrfl_ray.tasks import TASKS

        main = TASKS[self.task].main_metric
        other = sorted(set(self.fl.thresholds) - {main})
        if other:  # rounds-to-threshold follows the task's main metric only
            raise ValueError(f"fl.thresholds: {other} is not the {self.task} main metric; use {{{main}: VALUE}}")
        if self.train.class_weights is not None and self.task != "classification":
            raise ValueError("train.class_weights is for classification only")
        return self

    @property
    def loss_name(self) -> str:
        return self.train.loss or ("dice_bce" if self.task == "segmentation" else "cross_entropy")

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad field."""


def _format(exc: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """One line naming every bad field, its value, and the ``--set`` that gave it, if one did."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        text = f"{where}: {err['msg']}"
        if "input" in err and not isinstance(err["input"], dict):
            text += f" (got {err['input']!r})"
        given = [o for o in overrides if where == o.split("=", 1)[0].strip() or
                 o.split("=", 1)[0].strip().startswith(where + ".")]
        if given:
            text += f" from --set {given[-1]}"
        parts.append(text)
    return f"invalid config {source}: " + "; ".join(parts)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``train.lr=0.1`` style overrides; the value is parsed as YAML (numbers, lists, null)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted!r}: a key part is empty (expected e.g. train.lr=0.1)")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    if isinstance(value, str):
        try:
            value = yaml.load(value, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {dotted}={value}: the value is not valid YAML ({problem}); "
                              f"quote it for a plain string, e.g. {dotted}='\"{value}\"'") from None
    node[keys[-1]] = value


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None,
                 source: str = "(dict)") -> ExperimentConfig:
    """Validate a config dict plus ``key.path=value`` overrides."""
    data = copy.deepcopy(data or {})  # overrides must not change the caller's dict (e.g. PRESETS)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source, overrides or [])) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (``safe_load`` silently keeps the last one, so a pasted block can undo an edit unseen).
    Keys brought in by a ``<<`` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class raises its own error
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Writes what ``_UniqueKeyLoader`` reads back the same: a string like ``1e5`` is quoted."""


# YAML 1.2's floats: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string, so a
# ``fl.strategy.options`` value or a sweep bound written that way would arrive as text.
for _cls in (_UniqueKeyLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def dump_yaml(data: Any) -> str:
    """YAML text that ``parse_yaml``/``load_yaml`` read back equal (key order kept)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def parse_yaml(text: str, source: str = "(text)") -> Any:
    """YAML text as Python objects (duplicate keys refused); errors are one ConfigError naming
    ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


def load_yaml(path: str | Path) -> Any:
    """Read one YAML file we are given (a config, a sweep or study spec): a missing or unreadable
    file, invalid YAML and duplicate keys are a ConfigError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and validate it."""
    if path is None:
        return build_config({}, overrides, "(defaults)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = load_yaml(path)
    if data is None:  # valid YAML (a template with every line commented out), but likely a mistake
        print(f"cxrfl: warning: {path} is empty: running the built-in defaults", file=sys.stderr)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return build_config(data, overrides, str(path))
