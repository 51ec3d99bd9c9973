"""What differential privacy costs in time (issue 16).

1. Client-level DP (``privacy.mode: client``): the server's clipping, noise and adaptive clip of a
   round's K = 10 resnet18 replies (``ClientLevelDP.aggregate``) against Flower's plain FedAvg
   aggregation of the same replies, and both against a whole round: K client rounds of local
   training (resnet18, 5 SGD steps of batch 8 at 128 px, measured here) shared by 2 client actors,
   plus the aggregation. Target: a DP round <= 1.05x a plain round.
2. Sample-level DP (``privacy.mode: sample``): Opacus DP-SGD local training (per-sample gradients,
   clipping, noise) against plain local training of the same model (resnet18 with GroupNorm, which
   DP-SGD needs), same steps. Opacus' per-sample gradients are known to cost several times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.config import TrainConfig, build_config  # noqa: E402
from cxrfl_ray.fl.algorithms import make_algorithm  # noqa: E402
from cxrfl_ray.fl.algorithms.base import trainable_state  # noqa: E402
from cxrfl_ray.fl.privacy import make_privacy  # noqa: E402
from cxrfl_ray.fl.strategies import make_strategy  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402
from cxrfl_ray.tasks.training import make_optimizer, train_local  # noqa: E402
from tests.fl.messages import train_reply  # noqa: E402

COHORT, ACTORS, TARGET = 10, 2, 1.05


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def aggregation_seconds(privacy_mode: str, repeats: int) -> float:
    """Median seconds of one round's aggregation of K resnet18 replies (plain or client-level DP)."""
    model = create_model("resnet18", "classification", 1, 3, norm="group")  # client-level DP refuses BatchNorm
    glob = {k: v.numpy().copy() for k, v in trainable_state(model).items()}
    rng = np.random.default_rng(0)
    privacy = {"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "adaptive_clip": {}} \
        if privacy_mode == "client" else {"mode": "none"}
    cfg = build_config({"model": {"name": "resnet18", "norm": "group"}, "partition": {"clients": 100},
                        "fl": {"clients_per_round": COHORT}, "privacy": privacy})
    dp = make_privacy(cfg, 100, COHORT)
    strategy = make_strategy("fedavg", {}, num_clients=100, per_round=COHORT, seed=0, client_eval=False)
    algorithm = make_algorithm(cfg)
    arrays = _record(glob)
    times = []
    for r in range(1, repeats + 1):
        replies = [train_reply(c, {"arrays": _record({k: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype))
                                                      if v.dtype.kind == "f" else v for k, v in glob.items()})},
                               **{"num-examples": 32, "train_loss": 0.5, "steps": 5}) for c in range(COHORT)]
        start = time.perf_counter()
        dp.aggregate(r, arrays, replies, lambda rs: algorithm.aggregate(strategy, r, arrays, rs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_round_seconds(repeats: int, private: bool, norm: str = "group") -> float:
    """Fastest of ``repeats`` client rounds (resnet18, 5 SGD steps of batch 8 at 128 px), plain or DP-SGD."""
    from cxrfl_ray.fl.algorithms.base import ClientRound, LocalWork
    from cxrfl_ray.fl.privacy import privacy_class

    torch.manual_seed(0)
    model = create_model("resnet18", "classification", 1, 3, norm=norm)
    data = TensorDataset(torch.rand(40, 1, 128, 128), torch.randint(0, 3, (40,)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()
    cfg = build_config({"model": {"name": "resnet18", "norm": norm}, "train": {"batch_size": 8, "steps": 5},
                        "privacy": {"mode": "sample", "noise_multiplier": 1.0, "clip_norm": 1.0} if private else {}})

    def one(server_round: int) -> float:
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="sgd", lr=0.01))
        start = time.perf_counter()
        ctx = ClientRound(0, server_round, model, cfg, None, None)
        work = privacy_class(cfg.privacy.mode).local_work(cfg, LocalWork(make_algorithm(cfg), ctx), ctx)
        work.begin()
        fit = train_local(model, loader, loss_fn, optimizer, torch.device("cpu"), hooks=work)
        work.finish(fit)
        assert fit["steps"] == 5
        return time.perf_counter() - start

    one(1)  # warm-up
    return min(one(r + 2) for r in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    plain_agg, dp_agg = aggregation_seconds("none", repeats), aggregation_seconds("client", repeats)
    client_s = local_round_seconds(repeats, private=False, norm="batch")
    round_plain = COHORT * client_s / ACTORS + plain_agg
    round_dp = COHORT * client_s / ACTORS + dp_agg
    ratio = round_dp / round_plain
    plain_local, dp_local = local_round_seconds(repeats, private=False), local_round_seconds(repeats, private=True)
    rows = [
        {"case": f"client-level DP round (K={COHORT} resnet18 replies, {ACTORS} actors)",
         "plain_s": f"{round_plain:.3f}", "dp_s": f"{round_dp:.3f}", "ratio": f"{ratio:.3f}",
         "detail": f"aggregation {1000 * plain_agg:.0f} ms plain, {1000 * dp_agg:.0f} ms with clip + noise + "
                   f"adaptive clip; client round {client_s:.3f} s",
         "target": f"<= {TARGET} {'met' if ratio <= TARGET else 'missed'}"},
        {"case": "sample-level DP-SGD local round (Opacus, resnet18 GroupNorm, 5 steps of 8 at 128 px)",
         "plain_s": f"{plain_local:.3f}", "dp_s": f"{dp_local:.3f}", "ratio": f"{dp_local / plain_local:.2f}",
         "detail": "per-sample gradients, clipping and noise", "target": "report"},
    ]
    columns = {"case": "case", "plain_s": "plain (s)", "dp_s": "DP (s)", "ratio": "DP / plain", "detail": "detail",
               "target": "target"}
    report("privacy", {"rows": rows}, table(columns, rows))


if __name__ == "__main__":
    main()
