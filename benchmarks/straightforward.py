"""Our engine against the straightforward implementation of the same federated job.

"Straightforward" is the job written the way a first Flower app is written (Flower's PyTorch
quickstart and tutorials): a ClientApp whose train handler, for every message, builds the model
from scratch, reads its partition from a folder of PNG files through a plain torch ``Dataset``
that decodes each image with PIL every time it is read, trains, and replies with
``model.state_dict()``; a ServerApp with Flower's stock ``FedAvg`` (``flwr.serverapp.strategy``)
and a tutorial-style ``evaluate_fn`` (a fresh model, the evaluation PNGs decoded again every
round); run with Flower's stock ``flwr.simulation.run_simulation`` (its ``RayBackend`` starts
Ray and shuts it down at the end, so it runs in a subprocess, before ours).

Ours is ``cxrfl_ray.fl.engine.run_federated`` with the equivalent config. Same job for both:
the same phantoms (written once as Parquet for ours and exported once as PNG files for the
straightforward app, byte-identical PNGs), the same client partition (our plan's rows), the same
model, image size, batch size, local steps, optimiser (Adam), clients per round, rounds, one CPU
per client on 2 Ray CPUs, and server evaluation of the same rows (every row of our evaluation
views) after every round and before the first. Client selection differs (ours is seeded,
FedAvg samples nodes at random), which does not change the work: every client trains
``steps`` batches whatever its size.

Two cases: resnet18 at 128 px (engine_overhead's, local training dominates a round) and
tiny-conv at 64 px (per-message set-up and waiting dominate). Reports the total wall time of each (Ray start, actors, imports and all rounds), their ratio
(target: ours >= 3x faster), the mean round time of rounds 2..R of each and their ratio, and
our clients' mean fit time (load weights + local steps) to show how much of a round is training.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.data.torch_dataset import model_input  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402

# (model, image size, steps per round, batch size): engine_overhead's resnet18 case, where local
# training dominates a round, and a tiny model, where the per-message set-up and waiting do
CASES = [("resnet18", 128, 3, 8), ("tiny-conv", 64, 3, 8)]
LR = 1e-3
EVAL_BATCH = 32  # our train.eval_batch_size default


# -- the straightforward app (module level: Ray actors import it as benchmarks.straightforward) ----

class PngFolder(Dataset):
    """A folder of PNGs with a labels.csv (file,label[,test]): PIL decode on every read.
    ``normalize``: ``image`` standardises each image as ours does (``model_input``)."""

    def __init__(self, folder: str | Path, size: int, normalize: str = "none") -> None:
        self.folder, self.size, self.normalize = Path(folder), size, normalize
        with open(self.folder / "labels.csv") as fh:
            rows = list(csv.DictReader(fh))
        self.items = [(row["file"], int(row["label"])) for row in rows]
        self.test = [row.get("test") == "1" for row in rows]
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        file, label = self.items[index]
        image = Image.open(self.folder / file).convert("L")
        if self.normalize != "none":
            return model_input(np.asarray(image), self.size, 1, self.normalize), label
        return self.transform(image), label


def new_model(name: str) -> torch.nn.Module:
    return create_model(name, "classification", 1, 3)


def evaluate_model(model: torch.nn.Module, loader: DataLoader, device: str = "cpu") -> dict[str, float]:
    """Loss and accuracy over the loader's folder, and accuracy on its rows flagged ``test``."""
    model.eval()
    loss_fn, loss, hits = torch.nn.CrossEntropyLoss(reduction="sum"), 0.0, []
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += loss_fn(out, y).item()
            hits.extend((out.argmax(1) == y).tolist())
    test = [h for h, flagged in zip(hits, loader.dataset.test) if flagged]
    return {"loss": loss / len(hits), "accuracy": sum(hits) / len(hits),
            "test_accuracy": sum(test) / len(test) if test else float("nan")}


straightforward_app = ClientApp()


@straightforward_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    device = str(cfg.get("device", "cpu"))
    model = new_model(str(cfg["model"]))  # from scratch, every message
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    data = PngFolder(Path(str(cfg["data-dir"])) / f"client_{partition}", int(cfg["size"]),
                     str(cfg.get("normalize", "none")))
    loader = DataLoader(data, batch_size=int(cfg["batch-size"]), shuffle=True)
    if str(cfg.get("optimizer", "adam")) == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    steps, total = 0, 0.0
    while steps < int(cfg["steps"]):  # epochs until `steps` batches, like ours
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
            if steps == int(cfg["steps"]):
                break
    metrics = MetricRecord({"train_loss": total / steps, "num-examples": len(data)})
    content = RecordDict({"arrays": ArrayRecord({k: v.cpu() for k, v in model.state_dict().items()}),
                          "metrics": metrics})
    return Message(content=content, reply_to=msg)


def stock_run(spec: dict) -> dict:
    """The straightforward job on Flower's stock simulation; returns its timings."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from benchmarks.straightforward import straightforward_app  # by module name, not __main__

    eval_ends: list[float] = []
    accuracy: list[float] = []
    test_accuracy: list[float] = []
    server_app = ServerApp()
    normalize = spec.get("normalize", "none")

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = new_model(spec["model"])
        model.load_state_dict(arrays.to_torch_state_dict())
        device = spec.get("device", "cpu")
        loader = DataLoader(PngFolder(Path(spec["data_dir"]) / "eval", spec["size"], normalize), batch_size=EVAL_BATCH)
        metrics = evaluate_model(model.to(device), loader, device)
        eval_ends.append(time.perf_counter())
        accuracy.append(metrics["accuracy"])
        test_accuracy.append(metrics["test_accuracy"])
        return MetricRecord(metrics)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(spec["seed"])
        strategy = FedAvg(fraction_train=spec["per_round"] / spec["clients"], fraction_evaluate=0.0,
                          min_train_nodes=spec["per_round"], min_available_nodes=spec["clients"])
        config = ConfigRecord({"model": spec["model"], "data-dir": spec["data_dir"], "size": spec["size"],
                               "steps": spec["steps"], "batch-size": spec["batch"], "lr": spec.get("lr", LR),
                               "optimizer": spec.get("optimizer", "adam"), "normalize": normalize,
                               "device": spec.get("device", "cpu")})
        strategy.start(grid, ArrayRecord(new_model(spec["model"]).state_dict()), num_rounds=spec["rounds"],
                       train_config=config, evaluate_fn=central_evaluate)

    start = time.perf_counter()
    run_simulation(server_app, straightforward_app, num_supernodes=spec["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": spec.get("num_gpus", 0)},
                                   "init_args": {**spec.get("ray_init", {"num_cpus": 2}), "address": "local"}})
    total = time.perf_counter() - start
    if len(eval_ends) != spec["rounds"] + 1:
        raise RuntimeError(f"straightforward run evaluated {len(eval_ends)} times, expected {spec['rounds'] + 1}")
    return {"total_s": total, "rounds_s": np.diff(eval_ends).tolist(), "final_accuracy": accuracy[-1],
            "final_test_accuracy": test_accuracy[-1], "to_round1_s": eval_ends[1] - start}


# -- ours, data export, comparison ----------------------------------------------------------------

def export_pngs(prep, out: Path) -> None:
    """Our plan's client rows and evaluation rows as PNG folders (the stored PNG bytes as files);
    the evaluation folder flags the central test rows (``test``)."""
    sets = {f"client_{k}": rows for k, rows in enumerate(prep.plan.clients)}
    sets["eval"] = np.unique(np.concatenate(list(prep.views.values())))
    test_rows = set(prep.views.get(("central", prep.cfg.data.test_split), np.array([], dtype=np.int64)).tolist())
    for name, rows in sets.items():
        folder = out / name
        folder.mkdir(parents=True)
        rows = np.sort(rows)
        table_ = prep.dataset.take(rows, ["id", "image", "label"]).to_pydict()
        with open(folder / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "label", "test"])
            for i, (row, image, label) in enumerate(zip(rows, table_["image"], table_["label"])):
                (folder / f"{i:05d}.png").write_bytes(image)
                writer.writerow([f"{i:05d}.png", label, int(int(row) in test_rows)])


def ours(cfg) -> dict:
    from cxrfl_ray.fl.engine import run_federated

    start = time.perf_counter()
    run = run_federated(cfg, quiet=True)
    total = time.perf_counter() - start
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    ends: dict[int, float] = {}
    for r in rows:
        ends[r["round"]] = max(ends.get(r["round"], 0.0), r["wall_time"])
    acc = [r["value"] for r in rows
           if (r["scope"], r["id"], r["metric"], r["round"]) == ("central", "val", "accuracy", cfg.fl.rounds)]
    fits = [r["value"] for r in rows if r["scope"] == "client" and r["metric"] == "fit_seconds" and r["round"] > 1]
    return {"total_s": total, "rounds_s": [ends[k] - ends[k - 1] for k in range(1, cfg.fl.rounds + 1)],
            "final_accuracy": acc[0], "client_fit_s": float(np.mean(fits))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 4 clients, 2 per round")
    parser.add_argument("--stock-spec", help=argparse.SUPPRESS)  # internal: run the stock job, print JSON
    args = parser.parse_args()
    if args.stock_spec:
        print("STOCK " + json.dumps(stock_run(json.loads(args.stock_spec))), flush=True)
        return

    rounds, clients = (3, 4) if args.quick else (5, 8)
    results = [run_case(case, rounds, clients) for case in CASES]
    met = all(r["speedup_total"] >= 3 for r in results)
    verdict = "target ours >= 3x faster (total): " + ", ".join(
        f"{r['case']} {'met' if r['speedup_total'] >= 3 else 'missed'} ({r['speedup_total']}x)" for r in results)
    print(verdict, flush=True)
    lines = [f"{rounds} rounds, {clients} clients, {results[0]['per_round']} per round, 3 steps of batch 8, "
             "FedAvg, 2 Ray CPUs, 1 per client; straightforward = per-message model build, PIL decode of a PNG "
             "folder, stock run_simulation (in a fresh process); ours starts its own Ray for each case; "
             "speed-up = straightforward / ours.", "",
             *table({"case": "case", "straightforward_total_s": "straightforward s", "ours_total_s": "ours s",
                     "speedup_total": "speed-up (total)", "straightforward_round_s": "straightforward round s",
                     "ours_round_s": "ours round s", "speedup_round": "speed-up (per round)",
                     "ours_client_fit_s": "ours client fit s"}, results),
             "", verdict + "."]
    report("straightforward" + (" --quick" if args.quick else ""), {"results": results, "target_met": met}, lines)


def run_case(case: tuple, rounds: int, clients: int) -> dict:
    """One case: the stock job in a subprocess, then ours on a freshly started Ray."""
    import ray

    from cxrfl_ray.config import build_config
    from cxrfl_ray.data.synth import write_synthetic_dataset
    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.fl.backend import release_idle_actors

    model, size, steps, batch = case
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, n=400, sites=4, size=128, seed=0, progress=False)
        cfg = build_config({
            "name": "bench", "out_dir": tmp, "task": "classification", "seed": 0,
            "data": {"path": str(data), "size": size, "augment": False}, "model": {"name": model},
            "partition": {"clients": clients}, "train": {"steps": steps, "batch_size": batch, "lr": LR},
            "fl": {"rounds": rounds, "fraction": 0.5, "client_num_cpus": 1.0, "ray_init": {"num_cpus": 2}},
            "tracking": {"wandb": "disabled"},
        })
        prep = prepare(cfg)
        export_pngs(prep, Path(tmp) / "png")
        spec = {"model": model, "size": size, "steps": steps, "batch": batch, "rounds": rounds,
                "clients": clients, "per_round": cfg.clients_per_round, "seed": cfg.seed,
                "data_dir": str(Path(tmp) / "png")}
        child = subprocess.run([sys.executable, __file__, "--stock-spec", json.dumps(spec)],
                               capture_output=True, text=True, timeout=900)
        lines_out = [ln for ln in child.stdout.splitlines() if ln.startswith("STOCK ")]
        if child.returncode != 0 or not lines_out:
            sys.stderr.write(child.stdout[-4000:] + child.stderr[-4000:])
            raise SystemExit(f"straightforward run failed (exit {child.returncode})")
        stock = json.loads(lines_out[-1][len("STOCK "):])
        release_idle_actors()
        ray.shutdown()  # ours pays its own Ray start, as the stock run does
        mine = ours(cfg)

    s_round, o_round = float(np.mean(stock["rounds_s"][1:])), float(np.mean(mine["rounds_s"][1:]))
    return {
        "case": f"{model} {size}px", "rounds": rounds, "clients": clients, "per_round": cfg.clients_per_round,
        "straightforward_total_s": round(stock["total_s"], 2), "ours_total_s": round(mine["total_s"], 2),
        "speedup_total": round(stock["total_s"] / mine["total_s"], 2),
        "straightforward_round_s": round(s_round, 3), "ours_round_s": round(o_round, 3),
        "speedup_round": round(s_round / o_round, 2),
        "straightforward_rounds_s": [round(t, 2) for t in stock["rounds_s"]],
        "ours_rounds_s": [round(t, 2) for t in mine["rounds_s"]],
        "ours_client_fit_s": round(mine["client_fit_s"], 3),  # load weights + local steps, rounds 2..R
        # sanity only: the straightforward one is over all evaluation rows, ours over central val
        "final_accuracy_straightforward": round(stock["final_accuracy"], 4),
        "final_accuracy_ours": round(mine["final_accuracy"], 4),
    }


if __name__ == "__main__":
    main()
