"""One federated job several ways: the compute floors, stock Flower, and ours (issue 19).

The job: resnet18 at 128 px, 100 clients of about 32 synthetic images, a cohort of 10, 10 rounds
of K = 5 plain SGD steps of 8 at lr 0.05, inputs standardised per image (``data.normalize:
image``), the central evaluation rows evaluated after every round, two 1-CPU client actors on 2
cores.

- **floor**: an in-process loop on one thread doing our engine's exact local steps and FedAvg
  (``engine_overhead.floor_run``): no messages, no processes. Two actors on two cores could at best
  halve its round (0.50x) if two trainings at once ran as fast as one (the two-core floor says).
- **two-core floor**: the floor's fits on two one-thread processes sharing memory, the driver
  averaging and evaluating on all cores in between (``two_core_floor.two_core_floor_run``): what
  two cores give this job with no framework. Its final weights must be the floor's, bit for bit.
- **stock Flower**: ``flwr.simulation.run_simulation`` with Flower's ``FedAvg`` and a ClientApp
  that keeps nothing between messages (``straightforward.straightforward_app``: it builds the
  model and decodes its PNGs for every message), the same rows, model, steps, optimiser and
  standardisation; in a subprocess (Flower's backend shuts Ray down).
- **ours**: ``run_federated`` on a freshly started Ray (cold), then the same job again in the same
  process (warm: Ray and the client actors are kept), then once more warm in the strict order
  (``fl.overlap_evaluation: false``: each round sent only after the last one is evaluated), so
  the gain of training through the server's evaluation is measured in the same run.

Reported per way: total seconds, seconds to the end of round 1 from the call (start-up
included), mean steady round (rounds 2..R), their ratios to the floor, and the final test
accuracy (the ways select clients differently, so their accuracies differ a little; each must
learn the job), and clients/s in steady rounds. Targets: ours <= 0.55x the floor per steady round
(stock Flower measured in the same run); ours' round 1 at most 5 s (cold) and 1 s (warm) later
than the floor's. On a GPU (``--device cuda --model resnet50 --size 224``, ``--packed`` clients on
the one GPU, every CPU for Ray): ours >= 3x stock Flower's clients/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from benchmarks.engine_overhead import floor_run  # noqa: E402
from benchmarks.straightforward import export_pngs  # noqa: E402
from benchmarks.two_core_floor import two_core_floor_run  # noqa: E402

CLIENTS, PER_ROUND, IMAGES_PER_CLIENT, STEPS, BATCH, LR, SIZE = 100, 10, 32, 5, 8, 0.05, 128
STEADY_TARGET, COLD_S, WARM_S, GPU_TARGET = 0.55, 5.0, 1.0, 3.0


def job(data: Path, out: Path, rounds: int, model: str, size: int = SIZE, device: str = "cpu", packed: int = 8):
    """The job as our config. On a GPU: ``packed`` clients share it (``fl.client_num_gpus``
    1/packed, 1 CPU each), Ray gets every CPU and the GPU."""
    from cxrfl_ray.config import build_config

    gpu = device == "cuda"
    return build_config({
        "name": "versus-flower", "out_dir": str(out), "task": "classification", "seed": 0,
        "data": {"path": str(data), "size": size, "augment": False, "normalize": "image"},
        "model": {"name": model}, "partition": {"clients": CLIENTS},
        "train": {"optimizer": "sgd", "momentum": 0.0, "lr": LR, "steps": STEPS, "batch_size": BATCH,
                  "device": device},
        "fl": {"rounds": rounds, "clients_per_round": PER_ROUND, "client_num_cpus": 1.0,
               "client_num_gpus": 1.0 / packed if gpu else 0.0,
               "ray_init": {"num_cpus": os.cpu_count() or 2, "num_gpus": 1} if gpu else {"num_cpus": 2}},
        "tracking": {"wandb": "disabled", "pictures": 0},
    })


def strict_order(cfg):
    """The job with each round sent only after the round before is evaluated."""
    from cxrfl_ray.config import build_config

    data = cfg.model_dump(mode="json")
    data["fl"]["overlap_evaluation"] = False
    return build_config(data)


def ours(cfg) -> dict:
    from cxrfl_ray.fl.engine import run_federated

    marks: dict[int, float] = {}
    start = time.perf_counter()
    run = run_federated(cfg, quiet=True, on_round=lambda rnd, _: marks.__setitem__(rnd, time.perf_counter()))
    total = time.perf_counter() - start
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    test = [r["value"] for r in rows if (r["scope"], r["id"], r["metric"], r["round"])
            == ("central", cfg.data.test_split, "accuracy", cfg.fl.rounds)]
    rounds = [marks[k] - marks[k - 1] for k in range(1, cfg.fl.rounds + 1)]
    return {"total_s": total, "to_round1_s": marks[1] - start, "rounds_s": rounds, "final_test_accuracy": test[0]}


def stock(cfg, png: Path) -> dict:
    gpus = cfg.fl.client_num_gpus
    spec = {"model": cfg.model.name, "size": cfg.data.size, "device": cfg.train.device, "num_gpus": gpus,
            "ray_init": {"num_cpus": cfg.fl.ray_init["num_cpus"], **({"num_gpus": 1} if gpus else {})},
            "steps": STEPS, "batch": BATCH, "rounds": cfg.fl.rounds,
            "clients": CLIENTS, "per_round": PER_ROUND, "seed": cfg.seed, "data_dir": str(png),
            "lr": LR, "optimizer": "sgd", "normalize": "image"}
    script = Path(__file__).with_name("straightforward.py")
    child = subprocess.run([sys.executable, str(script), "--stock-spec", json.dumps(spec)],
                           capture_output=True, text=True, timeout=1800)
    found = [ln for ln in child.stdout.splitlines() if ln.startswith("STOCK ")]
    if child.returncode != 0 or not found:
        sys.stderr.write(child.stdout[-4000:] + child.stderr[-4000:])
        raise SystemExit(f"stock Flower run failed (exit {child.returncode})")
    return json.loads(found[-1][len("STOCK "):])


def floor_row(cfg, run: dict) -> dict:
    """A floor's answer (``floor_run``'s keys) in the form ``row`` reads."""
    return {"total_s": run["total_s"], "to_round1_s": run["setup_s"] + run["rounds_s"][0], "rounds_s": run["rounds_s"],
            "final_test_accuracy": run["results"][("central", cfg.data.test_split)]["accuracy"]}


def row(way: str, got: dict, base: dict | None) -> dict:
    steady = float(np.mean(got["rounds_s"][1:]))
    out = {"way": way, "total_s": round(got["total_s"], 2), "to_round1_s": round(got["to_round1_s"], 2),
           "steady_round_s": round(steady, 3), "clients_per_s": round(PER_ROUND / steady, 2),
           "final_test_accuracy": round(got["final_test_accuracy"], 4)}
    if base is not None:
        out["total_x"] = round(got["total_s"] / base["total_s"], 3)
        out["round1_extra_s"] = round(got["to_round1_s"] - base["to_round1_s"], 2)
        out["steady_x"] = round(steady / float(np.mean(base["rounds_s"][1:])), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rounds instead of 10")
    parser.add_argument("--model", default="resnet18", help="classification model (resnet50 on a GPU)")
    parser.add_argument("--size", type=int, default=SIZE, help="image size in px (224 on a GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: clients share one GPU (--packed), all ways train on it")
    parser.add_argument("--packed", type=int, default=8, help="clients per GPU with --device cuda")
    args = parser.parse_args()
    rounds = 4 if args.quick else 10

    import ray

    from cxrfl_ray.data.synth import write_synthetic_dataset
    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.fl.backend import release_idle_actors

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ~3,200 training images (100 clients of ~32) and ~180 val + ~180 test rows
        write_synthetic_dataset(tmp / "data", n=int(CLIENTS * IMAGES_PER_CLIENT / 0.9), sites=4, size=args.size,
                                seed=0, val_frac=0.05, test_frac=0.05, progress=False)
        cfg = job(tmp / "data", tmp / "runs", rounds, args.model, args.size, args.device, args.packed)
        prep = prepare(cfg)
        export_pngs(prep, tmp / "png")
        sizes = [len(rows) for rows in prep.plan.clients]
        eval_rows = len(np.unique(np.concatenate(list(prep.views.values()))))

        floor = floor_run(cfg)
        floor_got = floor_row(cfg, floor)
        print("floor", row("floor", floor_got, None), flush=True)
        two_core_got = None
        if args.device == "cpu":  # a property of the CPUs: the GPU's rows compare clients/s only
            two_core = two_core_floor_run(cfg)
            if two_core["hash"] != floor["hash"]:
                raise SystemExit(f"the two-core floor's final weights ({two_core['hash']}) are not the floor's "
                                 f"({floor['hash']}): it did different work")
            two_core_got = floor_row(cfg, two_core)
            print("two-core floor", row("two-core floor", two_core_got, floor_got), flush=True)
        stock_got = stock(cfg, tmp / "png")
        print("stock", row("stock", stock_got, floor_got), flush=True)
        if ray.is_initialized():
            release_idle_actors()
            ray.shutdown()
        cold = ours(cfg)  # starts its own Ray and actors
        print("ours cold", row("ours", cold, floor_got), flush=True)
        warm = ours(cfg)  # the same process: Ray and the actors kept
        print("ours warm", row("ours", warm, floor_got), flush=True)
        strict = ours(strict_order(cfg))
        print("ours warm strict", row("ours", strict, floor_got), flush=True)

    two = row("two-core floor (2 processes of 1 thread, shared memory, no framework)", two_core_got, floor_got) \
        if two_core_got else None
    results = [row("floor (in-process, 1 thread)", floor_got, None), *([two] if two else []),
               row("stock Flower (run_simulation, FedAvg, ClientApp keeps nothing)", stock_got, floor_got),
               row("ours, cold (new Ray)", cold, floor_got), row("ours, warm (second simulation)", warm, floor_got),
               row("ours, warm, strict order (fl.overlap_evaluation false)", strict, floor_got)]
    flwr, cold_row, warm_row, strict_row = results[-4:]
    steady = cold_row["steady_x"]
    verdicts = [
        f"steady round ours <= {STEADY_TARGET}x the floor: {'met' if steady <= STEADY_TARGET else 'missed'} "
        f"({steady}x; stock Flower {flwr['steady_x']}x)",
    ]
    if two:
        def of_two(way: dict) -> float:
            return round(way["steady_round_s"] / two["steady_round_s"], 3)

        verdicts.append(f"two cores with no framework (the two-core floor): {two['steady_x']}x the floor per steady "
                        f"round; ours {of_two(cold_row)}x it cold and {of_two(warm_row)}x warm, stock Flower "
                        f"{of_two(flwr)}x")
    verdicts += [
        f"round 1 extra over the floor's, cold <= {COLD_S:.0f} s: "
        f"{'met' if cold_row['round1_extra_s'] <= COLD_S else 'missed'} ({cold_row['round1_extra_s']} s); "
        f"warm <= {WARM_S:.0f} s: {'met' if warm_row['round1_extra_s'] <= WARM_S else 'missed'} "
        f"({warm_row['round1_extra_s']} s)",
        f"training through the server's evaluation: warm steady round {warm_row['steady_round_s']} s "
        f"against {strict_row['steady_round_s']} s in the strict order "
        f"({round(warm_row['steady_round_s'] / strict_row['steady_round_s'], 3)}x)",
    ]
    for line in verdicts:
        print(line, flush=True)
    where = (f"{args.packed} clients packed on one GPU (1 CPU each)" if args.device == "cuda"
             else "2 client actors of 1 CPU on 2 cores")
    if args.device == "cuda":
        speedup = round(cold_row["clients_per_s"] / flwr["clients_per_s"], 2)
        verdicts.append(f"clients/s ours >= {GPU_TARGET:.0f}x stock Flower's on the GPU: "
                        f"{'met' if speedup >= GPU_TARGET else 'missed'} ({speedup}x)")
    lines = [f"{args.model} at {args.size} px on {args.device}, {CLIENTS} clients of {min(sizes)}-{max(sizes)} images, cohort {PER_ROUND}, "
             f"{rounds} rounds of {STEPS} SGD steps of {BATCH} (lr {LR}), per-image standardisation, "
             f"{eval_rows} evaluation rows after every round, {where}; ratios to "
             "the floor measured in this run.", "",
             *table({"way": "way", "total_s": "total s", "total_x": "total / floor", "to_round1_s": "to end of round 1 s",
                     "round1_extra_s": "round 1 extra over floor s", "steady_round_s": "steady round s",
                     "steady_x": "steady / floor", "clients_per_s": "clients/s (steady)",
                     "final_test_accuracy": "final test accuracy"}, results),
             "", *[v + "." for v in verdicts]]
    report("versus_flower" + (" --quick" if args.quick else "") + (f" {args.model}" if args.model != "resnet18" else "")
           + (f" {args.device} {args.size}px" if args.device != "cpu" else ""),
           {"results": results, "rounds": rounds, "model": args.model, "device": args.device, "size": args.size}, lines)


if __name__ == "__main__":
    main()
