"""Where metrics go: a Parquet file per run (one row per value), so any run can be re-read,
compared and plotted without the process that made it."""

from __future__ import annotations

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
