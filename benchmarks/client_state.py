"""Per-round cost of per-client state I/O (``fl/client_state.ClientStateStore``) at 1,000 clients
with a cohort of 10 per round: a SCAFFOLD-like state (a control variate the size of resnet18's
trainable parameters) and a FedBN-like one (resnet18's BatchNorm tensors), against one resnet18
client round of local training (5 SGD steps of batch 8 at 128 px, ``train_local``).
Target (issue 15): state I/O <= 10% of a resnet18 round.

Each selected client reads its last accepted state and writes the new one, as the ClientApp
does. Reads (load + one pass over the tensors) are timed cold (the file's pages dropped from the page
cache first: 1,000 model-sized states do not fit in memory) and warm. Every client runs its own I/O beside its own training, so
a round's overhead is one client's read + write against one client's training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.config import TrainConfig  # noqa: E402
from cxrfl_ray.fl.algorithms.fedbn import batchnorm_keys  # noqa: E402
from cxrfl_ray.fl.client_state import ClientStateStore, state_bytes  # noqa: E402
from cxrfl_ray.fl.strategies import select_clients  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402
from cxrfl_ray.tasks.training import make_optimizer, train_local  # noqa: E402

CLIENTS, COHORT, TARGET = 1000, 10, 0.10


def drop_cached(path: Path) -> None:
    """Flush the file and drop its pages from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read(store: ClientStateStore, server_round: int) -> float:
    """Load a state and pass over it once: safetensors maps the file, and its pages are read only
    when the client first uses the tensors."""
    return sum(float(v.sum()) for v in store.load(server_round).values())


def state_io(root: Path, tensors: dict[str, torch.Tensor], rounds: int, every_client: bool) -> dict:
    """Rounds 2.. of a federation where each client holds the state of round 1; ``every_client``:
    all 1,000 clients have one on disk (else only the cohorts', for model-sized states)."""
    cohorts = {r: select_clients(CLIENTS, COHORT, seed=0, server_round=r) for r in range(2, rounds + 2)}
    accepted = np.zeros(CLIENTS, dtype=np.int64)
    for c in range(CLIENTS) if every_client else sorted({c for cohort in cohorts.values() for c in cohort}):
        ClientStateStore(root, c).save(1, tensors, keep_from=0)
        accepted[c] = 1
    cold, warm, write = [], [], []
    for r, cohort in cohorts.items():
        for c in cohort:
            store = ClientStateStore(root, c)
            drop_cached(store.path(int(accepted[c])))
            t0 = time.perf_counter()
            read(store, int(accepted[c]))
            t1 = time.perf_counter()
            read(store, int(accepted[c]))
            t2 = time.perf_counter()
            store.save(r, tensors, keep_from=int(accepted[c]))
            t3 = time.perf_counter()
            cold.append(t1 - t0), warm.append(t2 - t1), write.append(t3 - t2)
            accepted[c] = r
    trained = next(iter(cohorts.values()))[0]  # a client that trained again: its files at rest
    at_rest = sum(p.stat().st_size for p in ClientStateStore(root, trained).dir.glob("*.safetensors"))
    files = len(list(ClientStateStore(root, trained).dir.glob("*.safetensors")))
    return {"file_bytes": ClientStateStore(root, trained).path(int(accepted[trained])).stat().st_size,
            "rest_bytes": at_rest, "rest_files": files, "on_disk_bytes": state_bytes(root),
            "clients_on_disk": int((accepted > 0).sum()), "read_cold_ms": 1000 * statistics.median(cold),
            "read_warm_ms": 1000 * statistics.median(warm), "write_ms": 1000 * statistics.median(write),
            "samples": len(cold)}


def train_round_seconds(device: torch.device, repeats: int) -> float:
    """Seconds of one client's local round (resnet18, 5 SGD steps of batch 8 at 128 px): the
    fastest of ``repeats``, so other work on the machine shrinks the ratio's denominator less."""
    torch.manual_seed(0)
    model = create_model("resnet18", "classification", 1, 3).to(device)
    data = TensorDataset(torch.rand(40, 1, 128, 128), torch.randint(0, 3, (40,)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()

    def one() -> float:
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="sgd", lr=0.01))
        start = time.perf_counter()
        fit = train_local(model, loader, loss_fn, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert fit["steps"] == 5
        return time.perf_counter() - start

    one()  # warm-up
    return min(one() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 rounds of state I/O, 3 timed training rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="where the client states go (default: a temporary folder)")
    args = parser.parse_args()
    rounds, repeats = (2, 3) if args.quick else (5, 5)
    device = torch.device(args.device)
    model = create_model("resnet18", "classification", 1, 3)
    generator = torch.Generator().manual_seed(0)
    cases = [
        ("scaffold-like: resnet18 trainable parameters", False,
         {k: torch.randn(p.shape, generator=generator) for k, p in model.named_parameters() if p.requires_grad}),
        ("fedbn-like: resnet18 BatchNorm tensors", True,
         {k: v.clone() for k, v in model.state_dict().items() if k in set(batchnorm_keys(model))}),
    ]
    load_before = os.getloadavg()[0]
    train_s = train_round_seconds(device, repeats)
    print(f"resnet18 client round (5 steps, batch 8, 128 px, {device}): {train_s:.3f} s", flush=True)
    results = []
    for name, every_client, tensors in cases:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="client-state-") as root:
            io = state_io(Path(root), tensors, rounds, every_client)
        per_round_s = (io["read_cold_ms"] + io["write_ms"]) / 1000
        ratio = per_round_s / train_s
        results.append({
            "case": name, "tensors": len(tensors), "MB": round(io["file_bytes"] / 1e6, 3),
            "read_cold_ms": round(io["read_cold_ms"], 2), "read_warm_ms": round(io["read_warm_ms"], 2),
            "write_ms": round(io["write_ms"], 2), "io_ms": round(1000 * per_round_s, 2),
            "train_s": round(train_s, 3), "ratio": f"{100 * ratio:.2f}%",
            "target": "met" if ratio <= TARGET else "missed",
            "rest_files": io["rest_files"], "rest_MB": round(io["rest_bytes"] / 1e6, 3),
            "thousand_GB": round(CLIENTS * io["rest_bytes"] / 1e9, 3),
            "measured_GB": f"{io['on_disk_bytes'] / 1e9:.3f} ({io['clients_on_disk']} clients)",
            "samples": io["samples"]})
        print(results[-1], flush=True)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = [f"{CLIENTS} clients, {COHORT} per round, {rounds} rounds of state I/O with `ClientStateStore` (median "
             f"of {results[0]['samples']} client reads and writes; a read = load + one pass over the tensors, cold: "
             f"the file's pages dropped with posix_fadvise first; writes as the store does them, no fsync). One "
             f"resnet18 client round = 5 SGD steps of batch 8 at 128 px with `train_local` on {device}, fastest of "
             f"{repeats}. I/O per round = one client's cold read + write (each client does its own beside its own "
             f"training); {load}.", ""]
    lines += table({"case": "state", "tensors": "tensors", "MB": "MB per state", "read_cold_ms": "read cold ms",
                    "read_warm_ms": "read warm ms", "write_ms": "write ms", "io_ms": "I/O per round ms",
                    "train_s": "resnet18 round s", "ratio": "I/O / round", "target": "target <= 10%",
                    "rest_files": "files per client at rest", "rest_MB": "MB per client at rest",
                    "thousand_GB": "GB for 1,000 clients at rest", "measured_GB": "GB written here"}, results)
    report(f"client_state{' --quick' if args.quick else ''}", {"results": results}, lines)


if __name__ == "__main__":
    main()
