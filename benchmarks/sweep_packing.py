"""Sweep packing: the smoke sweep's 4 trials at concurrency 2 against concurrency 1, on one
local Ray with 2 CPUs. Each trial is a placement group of a 0.25-CPU driver bundle and 0.25-CPU
client bundles, so two trials fit side by side whatever their cohort (with the smoke spec's 0.5
CPUs, two 2-client trials need 3 CPUs and could never run together).

Three ways to run the trials: a new Tune worker (and new client actors) per trial
(``reuse_workers=false``); reusing a finished trial's worker and client actors when the next
trial has the same bundles (the default); and the same with ``client_slots=2``, so all trials
have one shape and every one can reuse.

Reports the wall time of each sweep, the concurrency 2 / 1 ratio per way (target <= 0.6), the
trial workers used (distinct pids in Tune's results) and the mean time from a trial's start to
its first reported round (round 0 evaluation done: data set-up, model, Ray actor start).
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
from cxrfl_ray.sweep import load_spec, make_phantoms, run_sweep  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


MODES = {"new worker per trial": ["reuse_workers=false"], "reuse (own bundles)": [],
         "reuse, client_slots=2": ["client_slots=2"]}


def first_results(sweep: Path) -> list[dict]:
    """Each trial's first reported result (its worker's pid, seconds since the trial started)."""
    firsts = []
    for result in sweep.glob("tune/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            firsts.append(rows[0])
    return firsts


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
        make_phantoms(load_spec(SMOKE, data))  # outside the timings
        for n, (mode, extra) in enumerate(MODES.items()):
            for concurrency in (1, 2):
                t = time.perf_counter()
                sweep = run_sweep(SMOKE, out=Path(tmp) / f"m{n}c{concurrency}", quiet=True,
                                  overrides=data + extra + [f"max_concurrent={concurrency}"])
                wall = time.perf_counter() - t
                firsts = first_results(sweep)
                results.append({"mode": mode, "concurrency": concurrency, "trials": len(firsts),
                                "workers": len({r["pid"] for r in firsts}), "wall_s": round(wall, 1),
                                "first_round_s_mean": round(sum(r["time_total_s"] for r in firsts) / max(1, len(firsts)), 1)})
                print(results[-1], flush=True)
    ratios = {mode: round(results[2 * n + 1]["wall_s"] / results[2 * n]["wall_s"], 3) for n, mode in enumerate(MODES)}
    lines = [f"smoke spec (tiny-conv-seg, 48 px, 3 clients, {rounds} rounds), 4 trials, Ray with 2 CPUs, "
             "0.25-CPU bundles.", "",
             *table({"mode": "trials run", "concurrency": "concurrency", "trials": "trials", "workers": "trial workers",
                     "wall_s": "sweep wall s", "first_round_s_mean": "trial start to first round s (mean)"}, results), "",
             *[f"Ratio concurrency 2 / 1, {mode}: {r:.2f} (target <= 0.6: {'met' if r <= 0.6 else 'missed'})."
               for mode, r in ratios.items()]]
    report("sweep_packing" + (" --quick" if args.quick else ""), {"results": results, "ratios": ratios}, lines)


if __name__ == "__main__":
    main()
