"""What simulating the system costs (issue 17): client profiles and the virtual clock.

1. Planning 1,000,000 client profiles (``draw_profiles``: two-speed compute, lognormal bandwidths,
   an availability cycle). Target < 5 s.
2. The virtual clock's cost per round at 10,000 clients with a cohort of 32:
   ``SimulatedClock.select`` (who is online, the seeded cohort) + ``count`` (finish times, the
   deadline, the K earliest) on 32 hand-built replies, median over rounds, against a tiny round:
   one real tiny local round (tiny-conv, 2 SGD steps of batch 8 at 32 px, measured here) x 32
   clients / 2 actors. Target: the clock <= 5% of a tiny round. Measured with the availability
   cycle, and with an availability trace of 10,000 clients x 5 intervals (read from a CSV);
   the trace case also with the former per-client Python loop of ``Availability.online`` (kept
   below as the reference), which the vectorised lookup replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import report, table  # noqa: E402  (this folder: opacus installs a top-level `benchmarks` package)
from cxrfl_ray.config import TrainConfig, build_config  # noqa: E402
from cxrfl_ray.fl.system.policy import SimulatedClock, message_bytes  # noqa: E402
from cxrfl_ray.fl.system.profiles import Availability, draw_profiles  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402
from cxrfl_ray.tasks.training import make_optimizer, train_local  # noqa: E402
from tests.fl.messages import train_reply  # noqa: E402

PLAN_CLIENTS, CLIENTS, COHORT, ACTORS, INTERVALS = 1_000_000, 10_000, 32, 2, 5
PLAN_TARGET_S, CLOCK_TARGET = 5.0, 0.05
SYSTEM = {"speed": {"distribution": "two_speed", "slow_share": 0.25, "slow_factor": 5.0}, "bandwidth_sigma": 0.5,
          "availability": {"online_share": 0.5, "period_s": 3600.0}}


class LoopAvailability(Availability):
    """The former ``Availability.online``: one ``searchsorted`` per traced client in Python."""

    def online(self, t: float, clients: np.ndarray | None = None) -> np.ndarray:
        ids = np.arange(self.phase.size) if clients is None else np.asarray(clients)
        up = ((t / self.period + self.phase[ids]) % 1.0) < self.share if self.share < 1 else np.ones(ids.size, bool)
        if self.traced is None:
            return up
        up = up.copy()
        for k in np.flatnonzero(self.traced[ids]):
            c = ids[k]
            lo, hi = self.indptr[c], self.indptr[c + 1]
            i = np.searchsorted(self.start[lo:hi], t, side="right") - 1
            up[k] = i >= 0 and t < self.end[lo + i]
        return up


def as_loop(availability: Availability) -> LoopAvailability:
    fields = {f.name: getattr(availability, f.name) for f in dataclasses.fields(availability) if f.init}
    return LoopAvailability(**fields)


def plan_seconds(repeats: int) -> float:
    system = build_config({"system": SYSTEM}).system
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        profiles = draw_profiles(system, PLAN_CLIENTS, seed)
        times.append(time.perf_counter() - start)
        assert profiles.num_clients == PLAN_CLIENTS
    return min(times)


def tiny_client_seconds(repeats: int) -> float:
    """Fastest of ``repeats`` tiny local rounds: tiny-conv, 2 SGD steps of batch 8 at 32 px."""
    torch.manual_seed(0)
    model = create_model("tiny-conv", "classification", 1, 3)
    data = TensorDataset(torch.rand(16, 1, 32, 32), torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()

    def one() -> float:
        start = time.perf_counter()
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="sgd", lr=0.01))
        fit = train_local(model, loader, loss_fn, optimizer, torch.device("cpu"), steps=2)
        assert fit["steps"] == 2
        return time.perf_counter() - start

    one()  # warm-up
    return min(one() for _ in range(repeats))


def write_trace(path: Path, rng: np.random.Generator) -> Path:
    """Every client online in ``INTERVALS`` intervals over about half a simulated day, in shuffled rows."""
    edges = np.cumsum(rng.uniform(600, 8000, (CLIENTS, 2 * INTERVALS)), axis=1)
    edges -= rng.uniform(0, edges[:, 1])[:, None]  # time 0 falls anywhere before the first interval's end
    edges[:, 0] = np.maximum(edges[:, 0], 0.0)
    clients = np.repeat(np.arange(CLIENTS), INTERVALS)
    start, end = edges[:, 0::2].ravel(), edges[:, 1::2].ravel()
    order = rng.permutation(clients.size)
    lines = ["client,start_s,end_s", *(f"{c},{s:.3f},{e:.3f}" for c, s, e in
                                       zip(clients[order], start[order], end[order]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def clock_round_seconds(cfg, rounds: int, loop: bool = False) -> tuple[float, float]:
    """Median seconds of ``select`` + ``count`` per round (replies built outside the timing), and
    the median ``Availability.online`` call alone."""
    profiles = draw_profiles(cfg.system, CLIENTS, cfg.seed)
    if loop:
        profiles.availability = as_loop(profiles.availability)
    clock = SimulatedClock(cfg, CLIENTS, COHORT, profiles=profiles)
    model = create_model("tiny-conv", "classification", 1, 3)
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()
                          if v.dtype.is_floating_point})
    down_bytes = message_bytes([arrays])
    rng = np.random.default_rng(0)
    times, online = [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        selection = clock.select(r, down_bytes)
        selected = time.perf_counter()
        replies = [train_reply(c, {"arrays": arrays}, **{"num-examples": 16, "steps": 2, "train_loss": 0.5,
                                                         "fit_seconds": float(rng.uniform(0.02, 0.05))})
                   for c in selection.clients]
        counting = time.perf_counter()
        counted = clock.count(replies, len(selection.clients))
        times.append(selected - start + time.perf_counter() - counting)
        assert len(selection.clients) == COHORT and len(counted.kept) + len(counted.stragglers) == COHORT
        t0 = time.perf_counter()
        profiles.availability.online(clock.now_s)
        online.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(online)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 plan repeat, 20 rounds (instead of 3 and 200)")
    args = parser.parse_args()
    plan_repeats, rounds, tiny_repeats = (1, 20, 5) if args.quick else (3, 200, 20)

    plan_s = plan_seconds(plan_repeats)
    client_s = tiny_client_seconds(tiny_repeats)
    tiny_round_s = COHORT * client_s / ACTORS
    base = {"seed": 0, "partition": {"clients": CLIENTS}, "fl": {"clients_per_round": COHORT, "deadline_s": 4.0},
            "train": {"steps": 2}, "system": SYSTEM}
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_trace(Path(tmp) / "availability.csv", np.random.default_rng(0))
        traced = build_config({**base, "system": {**SYSTEM, "availability": {"trace": str(trace)}}})
        draw_profiles(traced.system, CLIENTS, 0)  # warm-up: pandas' import is not the trace's cost
        start = time.perf_counter()
        profiles = draw_profiles(traced.system, CLIENTS, 0)
        read_s = time.perf_counter() - start
        a, ref = profiles.availability, as_loop(profiles.availability)
        for t in (0.0, 5000.0, 20_000.0, 45_000.0, 1e6):  # the vectorised lookup agrees with the loop
            assert np.array_equal(a.online(t), ref.online(t)), t
        cases = [("cycle (online 50% of each hour)", build_config(base), False),
                 (f"trace, {CLIENTS} clients x {INTERVALS} intervals (vectorised)", traced, False),
                 (f"trace, {CLIENTS} clients x {INTERVALS} intervals (former Python loop)", traced, True)]
        measured = [(name, *clock_round_seconds(cfg, rounds, loop), loop) for name, cfg, loop in cases]

    rows = [{"case": f"plan {PLAN_CLIENTS:,} client profiles (two_speed, bandwidth_sigma 0.5, cycle)",
             "value": f"{plan_s:.3f} s", "against": "", "ratio": "",
             "target": f"< {PLAN_TARGET_S:g} s {'met' if plan_s < PLAN_TARGET_S else 'missed'}"}]
    for name, clock_s, online_s, loop in measured:
        ratio = clock_s / tiny_round_s
        rows.append({"case": f"clock per round at {CLIENTS:,} clients, cohort {COHORT}: {name}",
                     "value": f"{1000 * clock_s:.3f} ms (online() {1000 * online_s:.3f} ms)",
                     "against": f"tiny round {1000 * tiny_round_s:.1f} ms", "ratio": f"{100 * ratio:.2f}%",
                     "target": ("report (before)" if loop else
                                f"<= {100 * CLOCK_TARGET:g}% {'met' if ratio <= CLOCK_TARGET else 'missed'}")})
    columns = {"case": "case", "value": "measured", "against": "against", "ratio": "ratio", "target": "target"}
    lines = [f"Medians over {rounds} rounds; tiny round = {COHORT} clients x {1000 * client_s:.1f} ms (tiny-conv, "
             f"2 SGD steps of batch 8 at 32 px, fastest of {tiny_repeats}) / {ACTORS} actors; reading the "
             f"{CLIENTS * INTERVALS:,}-row availability trace once: {read_s:.3f} s.", "",
             *table(columns, rows)]
    report("system_clock" + (" --quick" if args.quick else ""),
           {"plan_s": plan_s, "tiny_client_s": client_s, "tiny_round_s": tiny_round_s, "trace_read_s": read_s,
            "rows": rows}, lines)


if __name__ == "__main__":
    main()
