"""`cxrfl simulate` against the compute floor: an in-process loop doing exactly the same local
steps with the same seeds, the model kept in memory, FedAvg and the same server evaluation.

Reports, per model: total wall time of each, their ratio, the engine's start-up (Ray, actors,
imports, each actor's data and model: everything up to the end of round 1 beyond the floor's
set-up and first round), and the mean steady-state round time (rounds 2..R) of each. With one
CPU per actor and 2 actors, the engine trains two clients at once where the floor trains one
after the other, so a steady-state ratio below 1 is possible on 2 cores.

"Same work" is checked, not assumed: the final global weights (a sha256 over every array, in name
order) and the final validation loss and metric must be identical for both (the floor averages
with FedAvg's own float32 arithmetic, so they agree exactly). The metric alone proves little: a
model stuck at the majority class scores the same accuracy whatever it learnt. A case whose work
differs fails the benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import keeps_torch_threads, report, table  # noqa: E402
from cxrfl_ray.config import build_config  # noqa: E402
from cxrfl_ray.data.synth import write_synthetic_dataset  # noqa: E402
from cxrfl_ray.experiment import evaluate_views  # noqa: E402
from cxrfl_ray.fl.client import fit_client, runtime, trainable_state  # noqa: E402
from cxrfl_ray.fl.engine import run_federated  # noqa: E402
from cxrfl_ray.fl.state import load_state  # noqa: E402
from cxrfl_ray.fl.strategies import select_clients  # noqa: E402
from cxrfl_ray.tasks import TASKS  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402
from cxrfl_ray.tasks.training import seed_everything  # noqa: E402

CASES = {
    # name: (task, model, image size, steps per round, batch size)
    "tiny-conv (~50 ms/client)": ("classification", "tiny-conv", 64, 3, 8),
    "resnet18 128px (>=1 s/client)": ("classification", "resnet18", 128, 3, 8),
    "unet-resnet18 128px": ("segmentation", "unet-resnet18", 128, 3, 8),
}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Flower FedAvg's arithmetic (``aggregate_arrayrecords``): in each array's dtype, clients in
    the given (client-id) order, so the floor's global model is the engine's, bit for bit."""
    factors = [w / sum(weights) for w in weights]
    total = {k: v.numpy() * factors[0] for k, v in states[0].items()}
    for state, factor in zip(states[1:], factors[1:]):
        for k, v in state.items():
            total[k] += v.numpy() * factor
    return {k: torch.from_numpy(np.asarray(v)) for k, v in total.items()}


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 (12 hex digits) of the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name].detach().cpu().numpy())
        h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:12]


def final_val(results: dict, main: str) -> dict[str, float]:
    return {k: results[("central", "val")][k] for k in ("loss", main)}


def floor(cfg) -> tuple[float, float, list[float], dict, str]:
    """In-process FedAvg with the engine's exact local work; returns (setup s, total s, round s,
    final val loss and metric, final weights hash)."""
    run = floor_run(cfg)
    return run["setup_s"], run["total_s"], run["rounds_s"], final_val(run["results"], run["main"]), run["hash"]


@keeps_torch_threads
def floor_run(cfg) -> dict:
    """In-process FedAvg with the engine's exact local work, on one thread (the client's
    ``fl.client_num_cpus``; the process's thread count is restored after): set-up, total and
    per-round seconds, the last round's results of every view, the final weights' hash."""
    start = time.perf_counter()
    rt = runtime(cfg.to_yaml())
    prep = rt.prep
    # as a client actor; set here too, since runtime() sets it only when it first builds rt
    torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.fl.client_num_cpus)))
    seed_everything(cfg.seed)
    server = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes, norm=cfg.model.norm)
    arrays = trainable_state(server)
    evaluate_views(prep, server, rt.device, rt.loss_fn, list(prep.views))
    setup = time.perf_counter() - start
    rounds = []
    for rnd in range(1, cfg.fl.rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        for cid in select_clients(len(prep.plan.clients), cfg.clients_per_round, cfg.seed, rnd):
            rt.model.load_state_dict(arrays, strict=False)
            fit_client(rt, cid, rnd)
            states.append({k: v.detach().clone() for k, v in trainable_state(rt.model).items()})
            weights.append(len(rt.client_images(cid)))
        arrays = fedavg(states, weights)
        server.load_state_dict(arrays, strict=False)
        results = evaluate_views(prep, server, rt.device, rt.loss_fn, list(prep.views))
        rounds.append(time.perf_counter() - t)
    return {"setup_s": setup, "total_s": time.perf_counter() - start, "rounds_s": rounds, "results": results,
            "main": prep.task.main_metric, "hash": weights_hash(arrays)}


def engine(cfg) -> tuple[float, float, list[float], dict, str]:
    start = time.perf_counter()
    run = run_federated(cfg, quiet=True)
    total = time.perf_counter() - start
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    ends = {}
    for r in rows:
        ends[r["round"]] = max(ends.get(r["round"], 0.0), r["wall_time"])
    rounds = [ends[k] - ends[k - 1] for k in range(1, cfg.fl.rounds + 1)]
    main = TASKS[cfg.task].main_metric
    val = {r["metric"]: r["value"] for r in rows if (r["scope"], r["id"], r["round"]) == ("central", "val", cfg.fl.rounds)
           and r["metric"] in ("loss", main)}
    done, arrays, _, _ = load_state(run)
    assert done == cfg.fl.rounds
    return total - sum(rounds), total, rounds, val, weights_hash(arrays.to_torch_state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 4 clients, 2 per round")
    args = parser.parse_args()
    rounds, clients = (3, 4) if args.quick else (5, 8)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, n=400, sites=4, size=128, seed=0, progress=False)
        for label, (task, model, size, steps, batch) in CASES.items():
            cfg = build_config({
                "name": "bench", "out_dir": tmp, "task": task, "seed": 0,
                "data": {"path": str(data), "size": size, "augment": False}, "model": {"name": model},
                "partition": {"clients": clients}, "train": {"steps": steps, "batch_size": batch, "lr": 1e-3},
                "fl": {"rounds": rounds, "fraction": 0.5, "client_num_cpus": 1.0,
                       "ray_init": {"num_cpus": 2}}, "tracking": {"wandb": "disabled"},
            })
            f_setup, f_total, f_rounds, f_val, f_hash = floor(cfg)
            e_setup, e_total, e_rounds, e_val, e_hash = engine(cfg)
            main = TASKS[task].main_metric
            # Round 1 of the engine also starts the actors (imports, data, model): count that as
            # start-up, and compare steady-state rounds 2..R.
            e_start = e_setup + e_rounds[0] - f_rounds[0]
            results.append({
                "case": label, "floor_total_s": round(f_total, 2), "engine_total_s": round(e_total, 2),
                "ratio_total": round(e_total / f_total, 2),
                "ratio_rounds": round(float(np.mean(e_rounds[1:])) / float(np.mean(f_rounds[1:])), 2),
                "engine_startup_s": round(e_start - f_setup, 2),
                "floor_round_s": round(float(np.mean(f_rounds[1:])), 3),
                "engine_round_s": round(float(np.mean(e_rounds[1:])), 3),
                "final_val_floor": round(f_val[main], 4), "final_val_engine": round(e_val[main], 4),
                "final_loss_floor": round(f_val["loss"], 6), "final_loss_engine": round(e_val["loss"], 6),
                "weights_floor": f_hash, "weights_engine": e_hash,
                "same_work": f_val == e_val and f_hash == e_hash,  # exact, not rounded
            })
            print(results[-1], flush=True)
    lines = [f"{rounds} rounds, {clients} clients, half per round, FedAvg, 2 CPU actors of 1 CPU each.", "",
             *table({"case": "case", "floor_total_s": "floor s", "engine_total_s": "engine s",
                     "ratio_total": "ratio (total)", "ratio_rounds": "ratio (per round)",
                     "engine_startup_s": "engine start-up s", "floor_round_s": "floor round s",
                     "engine_round_s": "engine round s", "final_val_floor": "final val floor",
                     "final_val_engine": "final val engine", "final_loss_floor": "final val loss floor",
                     "final_loss_engine": "final val loss engine", "weights_engine": "final weights sha256",
                     "same_work": "same work"}, results)]
    report("engine_overhead" + (" --quick" if args.quick else ""), {"results": results}, lines)
    differ = [r["case"] for r in results if not r["same_work"]]
    if differ:
        raise SystemExit(f"engine_overhead: the engine and the floor did different work in {differ} (final weights "
                         f"or validation loss/metric differ; see the table)")


if __name__ == "__main__":
    main()
