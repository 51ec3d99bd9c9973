"""Where metrics go: a Parquet file per run (one row per value), so any run can be re-read,
compared and plotted without the process that made it."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

METRICS_SCHEMA = pa.schema([
    ("round", pa.int32()),      # epoch (centralised) or round (federated)
    ("scope", pa.string()),     # train | central | site | holdout | client
    ("id", pa.string()),        # split, site or client id
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("wall_time", pa.float64()),  # seconds since the run started
])


class MetricsSink:
    """Collects metric rows and rewrites ``metrics.parquet`` atomically on each flush."""

    def __init__(self, path: str | Path, start: float | None = None) -> None:
        self.path = Path(path)
        self.start = start or time.time()
        self.rows: list[dict] = []

    @classmethod
    def resume(cls, path: str | Path, up_to_round: int) -> "MetricsSink":
        """Reopen a run's metrics, keeping rows of completed rounds (a killed run may have
        written part of the next one); wall time continues from where it stopped."""
        rows = [r for r in pq.read_table(path).to_pylist() if r["round"] <= up_to_round] if Path(path).exists() else []
        last = max((r["wall_time"] for r in rows), default=0.0)
        sink = cls(path, start=time.time() - last)
        sink.rows = rows
        return sink

    def log(self, round_: int, scope: str, id_: str, metrics: Mapping[str, float]) -> None:
        now = time.time() - self.start
        for name, value in metrics.items():
            self.rows.append({"round": int(round_), "scope": scope, "id": str(id_), "metric": name,
                              "value": float(value), "wall_time": now})

    def flush(self) -> Path:
        tmp = self.path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist(self.rows, schema=METRICS_SCHEMA), tmp)
        tmp.replace(self.path)
        return self.path

    def series(self, scope: str, id_: str, metric: str) -> list[tuple[int, float]]:
        return [(r["round"], r["value"]) for r in self.rows
                if r["scope"] == scope and r["id"] == id_ and r["metric"] == metric]


def read_metrics(path: str | Path) -> pa.Table:
    return pq.read_table(path)


class WandbRun:
    """One W&B run per simulation: the config once, then one ``log`` per round.

    Offline by default and never asks for a login: the mode goes through ``WANDB_MODE`` (Ray's
    W&B integration ignores a ``mode=`` argument), files land in the run folder, and nothing is
    sent unless the config says ``tracking.wandb: online``.
    """

    def __init__(self, mode: str, run_dir: Path, config: dict, name: str, group: str | None = None,
                 project: str = "cxrfl-ray") -> None:
        self.run = None
        if mode == "disabled":
            return
        import os

        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_GIT", "true")
        run_dir.mkdir(parents=True, exist_ok=True)  # W&B needs its dir to exist
        import wandb

        # The id follows the run folder, so a resumed simulation continues its W&B run.
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, name=name, group=group, dir=str(run_dir), config=config,
                              mode=mode, id=run_id, resume="allow", reinit="finish_previous")

    def log_round(self, round_: int, rows: list[dict]) -> None:
        if self.run is not None:
            self.run.log({f"{r['scope']}/{r['id']}/{r['metric']}": r["value"] for r in rows if r["round"] == round_},
                         step=round_)

    def finish(self, summary: dict | None = None) -> None:
        if self.run is not None:
            for key, value in _scalars(summary or {}).items():
                self.run.summary[key] = value
            self.run.finish()
            self.run = None


def _scalars(summary: dict, prefix: str = "") -> dict:
    """The summary's scalars, nested sections flattened (``privacy/epsilon``), for W&B's run summary."""
    out: dict = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str)) or value is None:
            out[f"{prefix}{key}"] = value
    return out
