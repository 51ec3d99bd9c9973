"""The round policy: the one object the server loop asks whom to select, when each reply
arrives, and which replies count (docs/SYSTEM.md).

``SimulatedClock`` (simulation): every plan client has a profile (``profiles.py``); a selected
client's round lasts its download, its compute and its upload:
- compute: ``system.compute: model`` = local steps x ``seconds_per_step`` x its speed factor (the
  default: results do not depend on this machine's noise); ``measured`` = its measured fit time x
  its speed factor;
- transfer: the message's bytes over its down- and uplink.
The round's simulated time is what the server waited; it accumulates across rounds and is part
of the round state. Round policies: clients offline at the round's simulated start are not
selected; ``fl.overselect`` selects ceil(overselect x K) and aggregates the K that finish first;
``fl.deadline_s`` drops later replies as stragglers, or (``fl.straggler: partial``) gives a slow
client only the local steps that fit the deadline. Selection stays a pure function of (seed,
round), so the same config gives the same stragglers.

``WallClock`` (a real federation, ``fl/deploy.py``): the sites are what they are; arrival is the
real reply time, and the deadline, if any, applies to it.

The same seam can serve an asynchronous strategy later (FedBuff: aggregate whenever enough
replies have arrived), which only changes ``count``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.arrays import wire_size
from cxrfl_ray.fl.system.profiles import Profiles, draw_profiles, transfer_seconds

BUDGET_KEY = "steps-budget"  # a partial-work client's local steps this round (message config)
SLACK_S = 1e-6  # a reply this close to the deadline is in time (a partial budget fills it exactly)
UPLOAD_SHARE = {"none": 1.0, "fp16": 0.5, "int8": 0.25}  # a reply's size against the global's, for budgets
HEADER_ROOM = 65536  # bytes: npy headers and int8 scales a reply adds (~260 per tensor; a ResNet50 has ~320)
SELECT_TAG = 7  # the selection stream (as fl/strategies.select_clients)


class FederationEnded(ValueError):
    """The availability trace leaves no client online for the rounds still to run."""


@dataclass
class Selection:
    """A round's cohort, how many clients were offline at its start, and per-client config."""

    clients: list[int]
    offline: int
    budgets: dict[int, int] = field(default_factory=dict)  # partial work: steps each client may do


@dataclass
class Counted:
    """Which replies the round aggregates, which came too late, what the server waited."""

    kept: list[Message]
    stragglers: list[int]  # client ids dropped as late
    round_s: float
    finish_s: dict[int, float]  # simulated finish time of each reply, from the round's start
    info: dict[str, float]


def seeded_choice(candidates: np.ndarray, size: int, seed: int, server_round: int) -> list[int]:
    """``size`` of ``candidates`` from (seed, round): with every client a candidate, exactly
    ``select_clients``' draw (numpy's choice over an array indexes it with the same draw)."""
    rng = np.random.default_rng([seed, SELECT_TAG, server_round])
    return sorted(int(c) for c in rng.choice(candidates, size=size, replace=False))


def cohort_nodes(cfg: ExperimentConfig, num_clients: int) -> int:
    """Clients sent a training message per round (and virtual nodes the engine needs): the cohort,
    times ``fl.overselect`` rounded up, at most every client."""
    return min(num_clients, math.ceil(cfg.fl.overselect * cfg.clients_per_round - 1e-9))


def message_bytes(records) -> int:
    """Bytes of the arrays a message carries in Flower's npy form (what the network moves; message
    headers aside)."""
    return int(sum(wire_size(a) for record in records for a in record.values()))


class SimulatedClock:
    """The simulation's round policy and virtual clock."""

    simulated = True  # whether clients have simulated profiles (a real federation's sites do not)

    def __init__(self, cfg: ExperimentConfig, num_clients: int, per_round: int,
                 profiles: Profiles | None = None) -> None:
        self.cfg, self.num_clients, self.per_round = cfg, num_clients, per_round
        self.profiles = profiles if profiles is not None or not self.simulated else \
            draw_profiles(cfg.system, num_clients, cfg.seed)
        self.now_s = 0.0  # simulated time at the start of the next round
        self.bytes_down = self.bytes_up = 0  # totals so far
        self._down_bytes, self._late = 0, []

    @classmethod
    def check(cls, cfg: ExperimentConfig, num_clients: int, sites: bool = False) -> None:
        """Refuse a policy that cannot run, and read the traces (their errors name file, row and
        column), before Ray starts. ``sites``: a real federation (``WallClock``)."""
        fl = cfg.fl
        if sites and fl.straggler == "partial":
            raise ValueError("fl.straggler partial plans each client's steps from simulated speeds; a real "
                             "federation has real sites: use fl.straggler drop with fl.deadline_s")
        if fl.straggler == "partial" and fl.deadline_s is None:
            raise ValueError("fl.straggler partial gives slow clients the local steps that fit the deadline: "
                             "set fl.deadline_s")
        if fl.straggler == "partial" and cfg.system.compute == "measured":
            raise ValueError("fl.straggler partial plans each client's steps from system.seconds_per_step, which "
                             "system.compute measured does not use: set system.compute: model")
        if fl.straggler == "partial" and cfg.train.steps is None:
            raise ValueError("fl.straggler partial needs train.steps (a fixed number of local steps per epoch) "
                             "to know how many steps fit the deadline")
        if not sites:  # a real federation's sites have no simulated profiles: its traces are unused
            draw_profiles(cfg.system, num_clients, cfg.seed)

    @property
    def nodes(self) -> int:
        return cohort_nodes(self.cfg, self.num_clients)

    def select(self, server_round: int, down_bytes: int) -> Selection:
        """The round's cohort among the clients online at its simulated start; with partial work,
        each one's step budget (a client with no step that fits is not sent: a straggler)."""
        availability = self.profiles.availability
        online = availability.online(self.now_s)
        if not online.any():  # everyone offline: the round starts when the first client is back
            back = availability.next_online(self.now_s)
            if not math.isfinite(back):
                raise FederationEnded(f"round {server_round}: no client is online at simulated time {self.now_s:.0f} s "
                                      f"or later (system.availability.trace ends before fl.rounds are done)")
            self.now_s = back
            online = availability.online(self.now_s)
        candidates = np.flatnonzero(online)
        size = min(self.nodes, candidates.size)
        clients = seeded_choice(candidates, size, self.cfg.seed, server_round) if size else []
        self._down_bytes, self._late = down_bytes, []
        budgets = {}
        fl = self.cfg.fl
        if fl.straggler == "partial" and fl.deadline_s is not None:
            planned = self.planned_steps()
            # the reply: the weights as compressed, with room for the arrays' headers and int8's scales
            up_bytes = down_bytes * UPLOAD_SHARE[fl.compression] * 1.01 + HEADER_ROOM
            for c in clients:
                left = fl.deadline_s - self.transfer_s(c, down_bytes, up_bytes)
                per_step = self.cfg.system.seconds_per_step * self.profiles.speed[c]
                budgets[c] = int(max(0, min(planned, math.floor(left / per_step + 1e-9))))
            self._late = [c for c in clients if budgets[c] == 0]
            clients = [c for c in clients if budgets[c] > 0]
            budgets = {c: b for c, b in budgets.items() if b > 0}
        return Selection(clients, int(self.num_clients - candidates.size), budgets)

    def planned_steps(self) -> int:
        return self.cfg.train.steps * self.cfg.train.epochs

    def transfer_s(self, cid: int, down_bytes: int, up_bytes: int) -> float:
        p = self.profiles
        return float(transfer_seconds(down_bytes, p.down_mbps[cid]) + transfer_seconds(up_bytes, p.up_mbps[cid]))

    def finish_s(self, reply: Message) -> float:
        """Seconds from the round's start to this reply's arrival at the server."""
        from cxrfl_ray.fl.strategies import reply_client

        cid = reply_client(reply)
        metrics = reply.content["metrics"]
        speed = self.profiles.speed[cid]
        compute = (float(metrics["steps"]) * self.cfg.system.seconds_per_step if self.cfg.system.compute == "model"
                   else float(metrics["fit_seconds"])) * speed
        return compute + self.transfer_s(cid, self._down_bytes, message_bytes(reply.content.array_records.values()))

    def count(self, good: list[Message], sent: int) -> Counted:
        """The replies that arrive in time, the K earliest under over-selection (ties by client id),
        in client-id order; the clock moves on by what the server waited. ``sent``: messages sent
        (a client that failed never arrives)."""
        from cxrfl_ray.fl.strategies import reply_client

        fl = self.cfg.fl
        finish = {reply_client(r): self.finish_s(r) for r in good}
        order = sorted(good, key=lambda r: (finish[reply_client(r)], reply_client(r)))
        on_time = [r for r in order if fl.deadline_s is None or finish[reply_client(r)] <= fl.deadline_s + SLACK_S]
        kept = on_time[: self.per_round]
        in_time = {reply_client(r) for r in on_time}
        late = sorted([c for c in finish if c not in in_time] + self._late)  # past the deadline: stragglers
        spare = sorted(reply_client(r) for r in on_time[self.per_round:])  # in time, after the K-th (over-selection)
        last = max(finish.values(), default=0.0)
        if len(kept) == self.per_round:  # the server stops waiting at the K-th arrival
            waited = finish[reply_client(kept[-1])]
        elif fl.deadline_s is not None and (len(on_time) < len(good) or len(good) < sent):  # until the deadline
            waited = float(fl.deadline_s)
        else:  # every reply is in (too few clients online, or failures noticed at once)
            waited = min(last, fl.deadline_s) if fl.deadline_s is not None else last
        up = sum(message_bytes(r.content.array_records.values()) for r in good)
        down = self._down_bytes * sent
        self.bytes_down += down
        self.bytes_up += up
        self.now_s += waited
        info = {"sim_round_s": waited, "sim_time_s": self.now_s, "stragglers": float(len(late)),
                "not_needed": float(len(spare)), "bytes_down": float(down), "bytes_up": float(up)}
        return Counted(sorted(kept, key=reply_client), late, waited, finish, info)

    def state(self) -> dict[str, float]:
        return {"sim_time_s": self.now_s, "bytes_down_total": self.bytes_down, "bytes_up_total": self.bytes_up}

    def restore(self, extra: dict) -> None:
        self.now_s = float(extra.get("sim_time_s", 0.0))
        self.bytes_down, self.bytes_up = int(extra.get("bytes_down_total", 0)), int(extra.get("bytes_up_total", 0))


class WallClock(SimulatedClock):
    """A real federation's round policy: every site online, arrival = the real time a reply was
    created after the round's messages went out, the deadline and over-selection applied to it.
    Its "simulated" time is then real time waited, so the outputs read the same."""

    simulated = False

    def select(self, server_round: int, down_bytes: int) -> Selection:
        self.sent_at, self._down_bytes, self._late = time.time(), down_bytes, []
        clients = seeded_choice(np.arange(self.num_clients), self.nodes, self.cfg.seed, server_round)
        return Selection(clients, 0, {})

    def finish_s(self, reply: Message) -> float:
        return max(0.0, float(reply.metadata.created_at) - self.sent_at)
