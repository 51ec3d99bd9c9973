"""Planning time: 10,000 clients over 100,000 rows for every scheme (target < 1 s)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report  # noqa: E402
from cxrfl_ray.data.partition import plan_partition  # noqa: E402

SCHEMES = {"iid": {}, "dirichlet": {"alpha": 1.0}, "quantity": {"power": 1.0}, "site": {}}


def metadata(rows: int, sites: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    patients = np.arange(rows) // 2  # two images per patient
    return pa.table({
        "site": pa.array([f"site{p % sites}" for p in patients]),
        "patient_id": pa.array([f"P{p}" for p in patients]),
        "split": pa.array(["train"] * rows),
        "label": pa.array(rng.integers(0, 3, patients.max() + 1)[patients], pa.int16()),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=10_000)
    args = parser.parse_args()
    meta = metadata(args.rows, sites=100)
    results = {}
    for scheme, kwargs in SCHEMES.items():
        start = time.perf_counter()
        plan = plan_partition(meta, scheme, args.clients, seed=0, **kwargs)
        results[scheme] = round(time.perf_counter() - start, 3)
        assert sum(c.size for c in plan.clients) == args.rows
    lines = [f"{args.clients} clients over {args.rows} rows (2 images per patient), seconds to plan:", "",
             "| scheme | seconds | target |", "|---|---|---|"]
    lines += [f"| {k} | {v} | < 1 s {'met' if v < 1 else 'MISSED'} |" for k, v in results.items()]
    report("partition", {"rows": args.rows, "clients": args.clients, "seconds": results}, lines)


if __name__ == "__main__":
    main()
