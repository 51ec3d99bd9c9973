"""Scaling with the client population and the cohort, through `cxrfl simulate` on one local Ray.

1. Population 10, 100, 1,000 (and 10,000 in full mode) with a fixed cohort of 8 per round, on one
   dataset with one patient per image: plan time, steady-state round time (median of rounds 2..R, the
   server evaluation included, identical across populations), and the driver's resident memory
   after the run. Targets: round time flat within 10%, memory flat, plan of 10,000 clients < 1 s.
   Any virtual node can play any plan client, so a run needs only the cohort's 8 nodes whatever
   the population; this measures that it stays so.
2. Cohort K = 1, 2, 4, 8 (and 16, 32 in full mode) with fixed work per client: fit-only round time (round time minus the
   server evaluation, which is logged per round) = a + b*K by least squares; a is the fixed cost
   of a round, b the cost per client, against the per-client compute (mean client fit_seconds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.config import build_config  # noqa: E402
from cxrfl_ray.data.partition import plan_partition  # noqa: E402
from cxrfl_ray.data.store import open_dataset  # noqa: E402
from cxrfl_ray.data.synth import write_synthetic_dataset  # noqa: E402
from cxrfl_ray.fl.engine import run_federated, start_ray  # noqa: E402


def rss_mb() -> tuple[float, float]:
    """Resident MB of the driver, and of the driver plus every process it started (Ray's GCS,
    raylet, client actors)."""
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return me.memory_info().rss / 2**20, total / 2**20


def config(data: Path, out: str, clients: int, cohort: int, rounds: int):
    return build_config({
        "name": f"pop{clients}-k{cohort}", "out_dir": out, "task": "classification", "seed": 0,
        "data": {"path": str(data), "size": 32, "augment": False}, "model": {"name": "tiny-conv"},
        "partition": {"clients": clients}, "train": {"steps": 3, "batch_size": 8, "eval_batch_size": 256},
        "fl": {"rounds": rounds, "clients_per_round": cohort, "client_num_cpus": 1.0},
        "tracking": {"wandb": "disabled"},
    })


def round_times(run: Path) -> tuple[list[float], list[float], float]:
    """Per-round wall time, per-round fit-only time (without evaluation) and mean client fit s."""
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    ends: dict[int, float] = {}
    for r in rows:
        ends[r["round"]] = max(ends.get(r["round"], 0.0), r["wall_time"])
    # Client replies are logged when the round's training ends: the time up to them is the fit part.
    trained: dict[int, float] = {}
    for r in rows:
        if r["scope"] == "round":
            trained[r["round"]] = r["wall_time"]
    rounds = sorted(k for k in ends if k > 0)
    wall = [ends[k] - ends[k - 1] for k in rounds]
    fit = [trained[k] - ends[k - 1] for k in rounds]
    fits = [r["value"] for r in rows if r["metric"] == "fit_seconds"]
    return wall, fit, float(np.mean(fits)) if fits else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="populations up to 1,000, 3 rounds")
    args = parser.parse_args()
    populations = [10, 100, 1000] if args.quick else [10, 100, 1000, 10000]
    rounds = 3 if args.quick else 12
    start_ray(num_cpus=2)
    pop_rows, cohort_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        n = max(populations) * 2
        write_synthetic_dataset(data, n=n, sites=4, size=32, seed=0, progress=False)
        ds = open_dataset(data)
        # Warm-up, not measured: the first run pays actor start-up and fills the pixel caches,
        # which would make whichever population runs first look slower.
        run_federated(config(data, tmp, populations[0], 8, 2), quiet=True)
        for clients in populations:
            t = time.perf_counter()
            plan_partition(ds, "iid", clients, 0)
            plan_s = time.perf_counter() - t
            run = run_federated(config(data, tmp, clients, 8, rounds), quiet=True)
            wall, fit, client_fit = round_times(run)
            driver_mb, total_mb = rss_mb()
            pop_rows.append({"clients": clients, "plan_s": round(plan_s, 3), "round_s": round(float(np.median(wall[1:])), 3),
                             "fit_round_s": round(float(np.median(fit[1:])), 3), "driver_rss_mb": round(driver_mb, 1),
                             "total_rss_mb": round(total_mb, 1)})
            print(pop_rows[-1], flush=True)
        for cohort in (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16, 32):
            run = run_federated(config(data, tmp, 64, cohort, rounds), quiet=True)
            wall, fit, client_fit = round_times(run)
            cohort_rows.append({"cohort": cohort, "fit_round_s": round(float(np.median(fit[1:])), 3),
                                "client_fit_s": round(client_fit, 3)})
            print(cohort_rows[-1], flush=True)
    base = pop_rows[0]["round_s"]
    spread = max(abs(r["round_s"] / base - 1) for r in pop_rows)
    b, a = np.polyfit([r["cohort"] for r in cohort_rows], [r["fit_round_s"] for r in cohort_rows], 1)
    client = float(np.mean([r["client_fit_s"] for r in cohort_rows]))
    lines = [f"tiny-conv at 32 px, 3 steps of 8 per client, {rounds} rounds, 2 actors of 1 CPU, one dataset of "
             f"{n} images (one patient each) for every population, after one unmeasured warm-up run.", "",
             *table({"clients": "clients", "plan_s": "plan s", "round_s": "round s (median of rounds 2..R)",
                     "fit_round_s": "fit part s (median)", "driver_rss_mb": "driver RSS MB after",
                     "total_rss_mb": "driver + Ray processes RSS MB"}, pop_rows), "",
             f"Round time across populations within {100 * spread:.0f}% of the smallest "
             f"(target 10%: {'met' if spread <= 0.10 else 'missed'}).", "",
             *table({"cohort": "cohort K", "fit_round_s": "fit part of a round s", "client_fit_s": "client fit s (mean)"},
                    cohort_rows), "",
             f"Fit round = a + b*K: a = {a:.3f} s fixed per round, b = {b:.3f} s per client, against "
             f"{client:.3f} s of compute per client (2 actors train in parallel, so b is about half of it "
             "when the actors are the bottleneck)."]
    report("population" + (" --quick" if args.quick else ""),
           {"population": pop_rows, "cohort": cohort_rows, "a_s": round(float(a), 3), "b_s": round(float(b), 3)}, lines)


if __name__ == "__main__":
    main()
