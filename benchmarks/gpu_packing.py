"""Clients packed per GPU: a real `cxrfl simulate` (run_federated on Ray) for each model with
``fl.client_num_gpus`` = 1, 0.5, 0.25, 0.125 and a cohort of 1/share clients, so a round fills
exactly one GPU. Fixed steps per client, phantom data, server evaluation on the GPU as usual.

Reports per packing: training images/s of the fit part of rounds 2..R (round start to the last
reply, the server evaluation excluded), the Ray actors placed, the clients that trained at once
(the sum of the clients' fit seconds over the fit part of a round; N means N trained side by
side), and GPU memory per client: the peak of torch.cuda.max_memory_allocated of one client's
training step measured in this process (as train_step.py does; the client does not report it),
and, where nvidia-smi lists processes, the peak device memory of each client actor (CUDA context
and the caching allocator included).

`--device cuda` on a GPU machine (Ray gets one GPU and every CPU). `--device cpu --quick` checks
the whole path on a CPU machine: tiny models, and "one device" = all CPUs, so share X is
X * CPUs per client. A hard budget (`--budget-s`) skips the cases that would not end in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from benchmarks.population import round_times  # noqa: E402
from benchmarks.train_step import step_rate  # noqa: E402
from cxrfl_ray.config import build_config  # noqa: E402
from cxrfl_ray.data.synth import write_synthetic_dataset  # noqa: E402
from cxrfl_ray.fl.backend import cluster_slots, release_idle_actors  # noqa: E402
from cxrfl_ray.fl.engine import run_federated, start_ray  # noqa: E402

SHARES = (1.0, 0.5, 0.25, 0.125)
# (model, task, px, batch, steps per client per round): the paper's models; 512 px for UNet++
# (1024 px: 4x the pixels, and at 8 clients per GPU that would not fit the time budget).
CASES = [("resnet50", "classification", 224, 8, 32),
         ("unetplusplus-efficientnet-b4", "segmentation", 512, 2, 20)]
QUICK = [("tiny-conv", "classification", 32, 8, 3), ("tiny-conv-seg", "segmentation", 48, 4, 3)]


class GpuProcessMemory:
    """Samples nvidia-smi's per-process GPU memory in a thread: peak MiB per pid. Empty where
    nvidia-smi is missing or lists no processes (some containers)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.peak: dict[int, float] = {}
        self.period_s, self._stop = period_s, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if shutil.which("nvidia-smi") else None

    def sample(self) -> dict[int, float]:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        rows = [line.split(",") for line in out.splitlines() if line.count(",") == 1]
        return {int(p): float(m) for p, m in rows if p.strip().isdigit() and m.strip().replace(".", "").isdigit()}

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                for pid, mib in self.sample().items():
                    self.peak[pid] = max(self.peak.get(pid, 0.0), mib)
            except Exception:  # a slow or failing nvidia-smi only costs this sample
                pass

    def __enter__(self) -> "GpuProcessMemory":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def case_config(data: Path, out: str, case: tuple, share: float, device: str, cpus: int, rounds: int,
                timeout_s: float):
    model, task, px, batch, steps = case
    cohort = round(1 / share)
    gpu = device == "cuda"
    return build_config({
        "name": f"pack-{model}-{share}", "out_dir": out, "task": task, "seed": 0,
        "data": {"path": str(data), "size": px, "augment": False}, "model": {"name": model},
        "partition": {"clients": cohort},
        "train": {"steps": steps, "batch_size": batch, "eval_batch_size": 16, "device": device},
        # GPU: the machine's CPUs split between the cohort. CPU: one "device" = all CPUs.
        "fl": {"rounds": rounds, "clients_per_round": cohort, "client_num_gpus": share if gpu else 0.0,
               "client_num_cpus": float(max(1, cpus // cohort)) if gpu else cpus * share,
               "round_timeout": max(30.0, timeout_s)},
        "tracking": {"wandb": "disabled"},
    })


def wait_for_exit(driver_pids: set[int], limit_s: float = 15.0) -> None:
    """After the actors of one packing are killed, wait until their processes left the GPU, so
    the next packing's memory and process count are its own."""
    if not shutil.which("nvidia-smi"):
        return
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end and set(GpuProcessMemory().sample()) - driver_pids:
        time.sleep(0.5)


def seen(size: int, steps: int, batch: int) -> int:
    """Images trained on in ``steps`` batches cycling a client's ``size`` images (the last batch of
    each pass is short)."""
    per_pass = -(-size // batch)
    return steps // per_pass * size + min(steps % per_pass * batch, size)


def measure(cfg, driver_pids: set[int]) -> dict:
    resources = {"num_cpus": cfg.fl.client_num_cpus, "num_gpus": cfg.fl.client_num_gpus}
    start = time.perf_counter()
    with GpuProcessMemory() as gpu_mem:
        run = run_federated(cfg, quiet=True)
    total = time.perf_counter() - start
    _, fit, _ = round_times(run)
    steady = fit[1:]  # rounds 2..R: the actors, their data and models are up by then
    rows = [r for r in pq.read_table(run / "metrics.parquet").to_pylist() if r["scope"] == "client" and r["round"] >= 2]
    fits = {k: [r["value"] for r in rows if r["round"] == k and r["metric"] == "fit_seconds"]
            for k in range(2, cfg.fl.rounds + 1)}
    images = sum(seen(int(size), int(steps), cfg.train.batch_size) for size, steps in zip(
        *[[r["value"] for r in rows if r["metric"] == m] for m in ("num-examples", "steps")]))
    clients_mib = [m for pid, m in gpu_mem.peak.items() if pid not in driver_pids]
    return {
        "cohort": cfg.clients_per_round, "client_cpus": cfg.fl.client_num_cpus,
        "actors": min(cluster_slots(resources), cfg.clients_per_round),
        "concurrent": round(float(np.mean([sum(fits[k]) / f for k, f in zip(fits, steady)])), 2),
        "images_per_s": round(images / sum(steady), 2),
        "fit_round_s": round(float(np.mean(steady)), 3),
        "client_fit_s": round(float(np.mean([v for f in fits.values() for v in f])), 3),
        "gpu_procs": len(clients_mib) if gpu_mem.peak else "-",
        "smi_gb_per_client": round(max(clients_mib) / 1024, 2) if clients_mib else "-",
        "run_s": round(total, 1), "status": "ok",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models at small sizes, 2 rounds")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="hard limit for the whole script; cases that would end later are skipped")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3, quick 2)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible (use --device cpu --quick on a CPU machine)")
    cases, rounds = (QUICK, args.rounds or 2) if args.quick else (CASES, args.rounds or 3)
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count() if args.device == "cuda" else 0
    results: list[dict] = []
    done = threading.Event()

    def finish(note: str) -> None:
        if done.is_set():
            return
        done.set()
        columns = {"model": "model", "px": "px",
                   "share": "num_gpus" if args.device == "cuda" else "share of the CPUs", "cohort": "clients/round",
                   "client_cpus": "CPUs/client", "actors": "actors placed", "concurrent": "clients at once",
                   "images_per_s": "train images/s", "speedup": "x vs 1 client", "fit_round_s": "fit round s",
                   "client_fit_s": "client fit s", "step_gb": "step GB/client", "gpu_procs": "GPU processes",
                   "smi_gb_per_client": "nvidia-smi GB/client", "run_s": "run s", "status": "status"}
        rows = [{k: r.get(k, "-") for k in columns} for r in results]
        unit = "GPU" if args.device == "cuda" else f"device (= {cpus} CPUs)"
        lines = [f"{', '.join(f'{m} {px}px batch {b} x {s} steps' for m, _, px, b, s in cases)} per client per "
                 f"round; {rounds} rounds; cohort = 1/share clients, all trained every round; one {unit} "
                 f"shared ({gpus} GPUs seen, Ray given {min(gpus, 1)}). images/s: the fit part of rounds 2..R. "
                 "concurrent: the clients' fit seconds over the fit part of a round. step GB: "
                 "max_memory_allocated of one client's training step (in-process); nvidia-smi GB: peak device "
                 "memory of one client actor (CUDA context and cache included).", "",
                 *table(columns, rows),
                 "", note]
        report(f"gpu_packing ({args.device}{', quick' if args.quick else ''})",
               {"budget_s": args.budget_s, "elapsed_s": round(time.perf_counter() - t0, 1), "note": note,
                "results": results}, lines)

    def watchdog() -> None:  # a run that hangs past the budget still leaves its table
        finish(f"Stopped by the watchdog at {args.budget_s + 30:.0f} s; the case running then is missing.")
        os._exit(3)

    timer = threading.Timer(args.budget_s + 30, watchdog)
    timer.daemon = True
    timer.start()

    device = torch.device(args.device)
    floor = {}
    for model, task, px, batch, steps in cases:  # one client alone, in this process
        rate, peak = step_rate(model, px, batch, device, 2 if args.quick else 5)
        floor[model] = (round(rate, 2), round(peak, 2) if peak else "-")
        print({"model": model, "in_process_images_per_s": floor[model][0], "step_gb": floor[model][1]}, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    driver_pids = set(GpuProcessMemory().sample()) if shutil.which("nvidia-smi") else set()
    # One GPU: a round of 1/share clients fills it exactly (on a machine with more, Ray sees one).
    start_ray(num_cpus=cpus, num_gpus=min(gpus, 1))
    last: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for px in {c[2] for c in cases}:  # phantoms stored at the training size: no resize per step
            write_synthetic_dataset(Path(tmp) / f"data{px}", n=64 if args.quick else 128, sites=4, size=px,
                                    seed=0, progress=False)
        for share in SHARES:  # packing by packing: the next model reuses the same actors
            for case in cases:
                model, _, px, batch, steps = case
                row = {"model": model, "px": px, "share": share, "step_gb": floor[model][1]}
                left = deadline - time.perf_counter()
                # A packing of twice the clients takes up to twice as long as the last one.
                if left < 1.6 * last.get(model, 0.0) or left < 20:
                    results.append({**row, "status": f"skipped: {left:.0f} s of the budget left"})
                    print(results[-1], flush=True)
                    continue
                cfg = case_config(Path(tmp) / f"data{px}", tmp, case, share, args.device, cpus, rounds, left)
                started = time.perf_counter()
                try:
                    row.update(measure(cfg, driver_pids))
                except Exception as exc:  # one failing packing (e.g. out of memory) must not lose the rest
                    why = " ".join(str(exc).replace("|", "/").split())[:160]
                    row.update(status=f"failed: {type(exc).__name__}: {why}", run_s=round(time.perf_counter() - started, 1))
                base = next((r for r in results if r["model"] == model and r.get("status") == "ok"), row)
                if row.get("status") == "ok":
                    row["speedup"] = round(row["images_per_s"] / base["images_per_s"], 2)
                    last[model] = row["run_s"]
                results.append(row)
                print(results[-1], flush=True)
            release_idle_actors()  # the next packing needs the GPU share these actors hold
            wait_for_exit(driver_pids)
    skipped = sum(1 for r in results if r["status"].startswith("skipped"))
    finish(f"In-process single-client step images/s: {', '.join(f'{m} {v[0]}' for m, v in floor.items())}. "
           f"{skipped} case(s) skipped for the {args.budget_s:.0f} s budget; total "
           f"{time.perf_counter() - t0:.0f} s.")
    timer.cancel()


if __name__ == "__main__":
    main()
