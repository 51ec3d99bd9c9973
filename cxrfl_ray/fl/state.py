"""Round state saved after every round, so an interrupted simulation resumes exactly.

One safetensors file: the global weights, the strategy's own state (FedAdam/FedYogi/FedAdagrad
moments ``m_t``/``v_t``, FedAvgM's ``momentum_vector``) and, as metadata, the round, the best
score so far and the failure count. Client selection and client randomness are pure functions
of (seed, round, client), so nothing else is needed to continue identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
_DICT_STATES = ("m_t", "v_t")


def save_state(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy: Any, extra: dict) -> Path:
    tensors = {f"global/{k}": v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    for attr in _DICT_STATES:
        for k, v in (getattr(strategy, attr, None) or {}).items():
            tensors[f"{attr}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    for i, v in enumerate(getattr(strategy, "momentum_vector", None) or []):
        tensors[f"momentum_vector/{i:06d}"] = torch.from_numpy(np.ascontiguousarray(v))
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"round": str(server_round), "extra": json.dumps(extra)})
    tmp.replace(path)
    return path


def saved_round(run_dir: Path) -> int | None:
    """The last completed round saved in ``run_dir`` (None: no state, or no such folder)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        return int(fh.metadata()["round"])


def load_state(run_dir: Path) -> tuple[int, ArrayRecord, dict[str, Any], dict]:
    """``(round, global arrays, strategy state, extra)`` of the last completed round."""
    path = run_dir / STATE_FILE
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    strategy_state: dict[str, Any] = {a: {k: v.numpy() for k, v in groups[a].items()} for a in _DICT_STATES if a in groups}
    if "momentum_vector" in groups:
        strategy_state["momentum_vector"] = [groups["momentum_vector"][k].numpy() for k in sorted(groups["momentum_vector"])]
    return int(meta["round"]), ArrayRecord(groups["global"]), strategy_state, json.loads(meta["extra"])


def restore_strategy(strategy: Any, state: dict[str, Any]) -> None:
    for attr, value in state.items():
        setattr(strategy, attr, value)
