"""Round state saved after every round, so an interrupted simulation resumes exactly.

One safetensors file: the global weights, the strategy's own state (FedAdam/FedYogi/FedAdagrad
moments ``m_t``/``v_t``, FedAvgM's ``momentum_vector``), the algorithm's server state (``algorithm/``:
SCAFFOLD's server control variate, the round of each client's last accepted state file) and, as
metadata, the round, the best
score so far, the failure counts and the config the rounds ran with (canonical JSON and its
sha256). Client selection and client randomness are pure functions of (seed, round, client), so
nothing else is needed to continue identically, provided the config is the same: ``check_resume``
refuses one that was edited since (the folder would claim settings its first rounds never used).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cxrfl_ray.config import ConfigError
from cxrfl_ray.fl.arrays import torch_views
from cxrfl_ray.jsonio import dumps

STATE_FILE = "state.safetensors"
_DICT_STATES = ("m_t", "v_t")
log = logging.getLogger("cxrfl.fl")


def canonical_config(cfg: Any) -> str:
    """The config as canonical JSON (sorted keys, no spaces): equal configs, equal text."""
    return dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (the dotted names ``--set`` takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``{"train.lr": (0.001, 0.01)}``: the dotted fields whose values differ (``ignore`` aside)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and k not in ignore}


def format_changes(changes: dict[str, tuple], limit: int = 8) -> str:
    """``train.lr: 0.001 -> 0.01, data.size: 64 -> 128``."""
    show = lambda v: repr(v) if isinstance(v, str) else str(v)  # noqa: E731
    shown = ", ".join(f"{k}: {show(a)} -> {show(b)}" for k, (a, b) in list(changes.items())[:limit])
    return shown + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


def save_state(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy: Any, extra: dict,
               cfg: Any = None, algorithm: dict[str, np.ndarray] | None = None) -> Path:
    """``algorithm``: the algorithm's server state (SCAFFOLD's c, which client state each client's
    last accepted round left), read back by ``load_algorithm_state``."""
    tensors = {f"global/{k}": v for k, v in torch_views(arrays).items()}
    for k, v in (algorithm or {}).items():
        tensors[f"algorithm/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    for attr in _DICT_STATES:
        for k, v in (getattr(strategy, attr, None) or {}).items():
            tensors[f"{attr}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    for i, v in enumerate(getattr(strategy, "momentum_vector", None) or []):
        tensors[f"momentum_vector/{i:06d}"] = torch.from_numpy(np.ascontiguousarray(v))
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    meta = {"round": str(server_round), "extra": dumps(extra)}
    if cfg is not None:
        meta["config"] = canonical_config(cfg)
        meta["config_sha256"] = hashlib.sha256(meta["config"].encode()).hexdigest()
        meta["inputs"] = dumps(input_digests(cfg))
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)
    return path


def input_digests(cfg: Any) -> dict[str, str]:
    """sha256 of the files a config names besides its dataset whose contents decide the run (the
    system traces): the config holds their paths, not what is in them."""
    paths = [getattr(cfg.system, "profile_trace", None), getattr(cfg.system.availability, "trace", None)] \
        if hasattr(cfg, "system") else []
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else "missing"
            for p in paths if p}


def saved_round(run_dir: Path) -> int | None:
    """The last completed round saved in ``run_dir`` (None: no state, or no such folder)."""
    return int(_metadata(run_dir)["round"]) if (run_dir / STATE_FILE).is_file() else None


def _metadata(run_dir: Path) -> dict[str, str]:
    with safe_open(str(run_dir / STATE_FILE), framework="pt") as fh:
        return fh.metadata()


def check_resume(run_dir: Path, cfg: Any) -> None:
    """Refuse to resume ``run_dir`` with a config other than the one its saved rounds ran with,
    naming the changed fields. More ``fl.rounds`` is allowed (said in the log), unless the
    learning rate follows a schedule over all rounds (the rounds done used the old length).
    State saved before fingerprints existed resumes with a warning."""
    meta = _metadata(run_dir)
    if "config" not in meta:
        log.warning("%s: the saved round state has no config fingerprint (saved by an older version); "
                    "resuming with %s as it is, unchecked", run_dir, run_dir / "config.yaml")
        return
    saved = json.loads(meta["config"])
    edited = sorted(p for p, digest in json.loads(meta.get("inputs", "{}")).items()
                    if input_digests(cfg).get(p) != digest)
    if edited:
        raise ConfigError(f"--resume {run_dir}: {', '.join(edited)} changed (or went) after rounds ran with it; "
                          f"restore it, or start a new run")
    if hashlib.sha256(canonical_config(cfg).encode()).hexdigest() == meta["config_sha256"]:
        return
    try:  # a field added to the schema after the run started reads as its default, not as a change
        saved = type(cfg).model_validate(saved).model_dump(mode="json")
    except ValueError:
        pass
    # out_dir is unused on resume; the pictures drawn at the end do not touch the rounds
    changes = config_changes(saved, cfg.model_dump(mode="json"), ignore=("out_dir", "tracking.pictures"))
    rounds = changes.get("fl.rounds")
    if rounds is not None and rounds[1] > rounds[0] and cfg.train.lr_schedule == "constant":
        changes.pop("fl.rounds")
        if not changes:
            log.warning("--resume %s: fl.rounds %d -> %d: the same run continues to round %d (more rounds is "
                        "the one change a resume allows)", run_dir, rounds[0], rounds[1], rounds[1])
    if changes:
        why = (" (with train.lr_schedule %r the rate follows all rounds: the rounds done used the old count)"
               % cfg.train.lr_schedule if "fl.rounds" in changes and rounds[1] > rounds[0] else "")
        raise ConfigError(f"--resume {run_dir}: {run_dir / 'config.yaml'} was changed after rounds ran with it "
                          f"({format_changes(changes)}){why}; restore it, or start a new run")


def load_state(run_dir: Path) -> tuple[int, ArrayRecord, dict[str, Any], dict]:
    """``(round, global arrays, strategy state, extra)`` of the last completed round."""
    path = run_dir / STATE_FILE
    meta = _metadata(run_dir)
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    strategy_state: dict[str, Any] = {a: {k: v.numpy() for k, v in groups[a].items()} for a in _DICT_STATES if a in groups}
    if "momentum_vector" in groups:
        strategy_state["momentum_vector"] = [groups["momentum_vector"][k].numpy() for k in sorted(groups["momentum_vector"])]
    return int(meta["round"]), ArrayRecord(groups["global"]), strategy_state, json.loads(meta["extra"])


def load_algorithm_state(run_dir: Path) -> dict[str, np.ndarray]:
    """The algorithm's server state saved with the last completed round (empty: none)."""
    with safe_open(str(run_dir / STATE_FILE), framework="pt") as fh:
        return {k.split("/", 1)[1]: fh.get_tensor(k).numpy() for k in fh.keys() if k.startswith("algorithm/")}


def restore_strategy(strategy: Any, state: dict[str, Any]) -> None:
    for attr, value in state.items():
        setattr(strategy, attr, value)
