"""Sweep packing: the smoke sweep's 4 trials at concurrency 2 against concurrency 1, on one
local Ray with 2 CPUs. Each trial is a placement group of a 0.25-CPU driver bundle and 0.25-CPU
client bundles, so two trials fit side by side whatever their cohort (with the smoke spec's 0.5
CPUs, two 2-client trials need 3 CPUs and could never run together).

Reports the wall time of each sweep, their ratio (target <= 0.6), and the per-trial overhead:
from a trial's start (Tune's trial start time) to its first reported round (round 0 evaluation
done), which holds the trial worker's imports, the data set-up and Ray actor start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.fl.engine import start_ray  # noqa: E402
from cxrfl_ray.sweep import run_sweep  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


def first_round_delays(sweep: Path) -> list[float]:
    """Seconds from each trial's start to its first reported result, from Tune's result files."""
    delays = []
    for result in sweep.glob("tune/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            delays.append(float(rows[0]["time_total_s"]))
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke spec as it is (3 rounds)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    start_ray(num_cpus=2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = [f"base.data.path={tmp}/phantoms", "base.tracking.wandb=disabled", f"base.fl.rounds={rounds}",
                "base.fl.client_num_cpus=0.25", "driver_cpus=0.25"]
        for concurrency in (1, 2):
            t = time.perf_counter()
            sweep = run_sweep(SMOKE, out=Path(tmp) / f"c{concurrency}", quiet=True,
                              overrides=data + [f"max_concurrent={concurrency}"])
            wall = time.perf_counter() - t
            delays = first_round_delays(sweep)
            results.append({"concurrency": concurrency, "trials": 4, "wall_s": round(wall, 1),
                            "first_round_s_mean": round(sum(delays) / max(1, len(delays)), 1)})
            print(results[-1], flush=True)
    ratio = results[1]["wall_s"] / results[0]["wall_s"]
    lines = [f"smoke spec (tiny-conv-seg, 48 px, 3 clients, {rounds} rounds), 4 trials, Ray with 2 CPUs, "
             "0.25-CPU bundles.", "",
             *table({"concurrency": "concurrency", "trials": "trials", "wall_s": "sweep wall s",
                     "first_round_s_mean": "trial start to first round s (mean)"}, results), "",
             f"Ratio concurrency 2 / 1: {ratio:.2f} (target <= 0.6: {'met' if ratio <= 0.6 else 'missed'})."]
    report("sweep_packing" + (" --quick" if args.quick else ""), {"results": results, "ratio": round(ratio, 3)}, lines)


if __name__ == "__main__":
    main()
