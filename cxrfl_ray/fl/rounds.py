"""What a round's replies are worth, and when a federation has failed or diverged.

A reply counts only when it carries an update the global model can take: no error, a finite
train loss and finite weights. Anything else is a client failure: counted, its reason logged,
never averaged (one NaN client would make the global model NaN). A round with fewer good updates
than ``fl.min_replies`` is a failed round and leaves the global weights (and the strategy's state)
as they were; after ``fl.max_failed_rounds`` failed rounds in a row the run stops, quoting the
first client error of the streak. The streak is part of the round state, so a resumed run counts
on from where it stopped. A non-finite global model, loss or metric stops the run at once.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from cxrfl_ray.fl.algorithms import Algorithm, algorithm_class, make_algorithm
from cxrfl_ray.fl.arrays import views
from cxrfl_ray.fl.client_state import AcceptedStates
from cxrfl_ray.fl.compression import decode_replies
from cxrfl_ray.fl.privacy import NoPrivacy, make_privacy, privacy_class
from cxrfl_ray.fl.system.policy import BUDGET_KEY, Counted, SimulatedClock, WallClock, message_bytes
from cxrfl_ray.fl.strategies import CLIENT_KEY, reply_client
from cxrfl_ray.tasks.training import DivergedError, check_finite, located, nonfinite_tensor, nonfinite_value

log = logging.getLogger("cxrfl.fl")


class FederationFailed(ValueError):
    """Too many rounds in a row without enough successful client updates (``fl.min_replies``)."""


@dataclass(frozen=True)
class Failure:
    """One selected client that gave no usable update; ``diverged``: its update was not finite."""

    client: int | None
    reason: str
    diverged: bool = False

    def __str__(self) -> str:
        who = f"client {'?' if self.client is None else self.client}"
        return f"{who}: update not finite ({self.reason})" if self.diverged else f"{who}: {self.reason}"


def nonfinite_update(content: RecordDict) -> str | None:
    """``"train loss nan"`` or ``"inf in fc.weight"`` for a training reply's content whose update
    (its weights, and any record an algorithm adds, e.g. SCAFFOLD's control delta) is not finite
    (None: it can be averaged)."""
    return (nonfinite_value({"train loss": float(content["metrics"]["train_loss"])})
            or next((bad for record in content.array_records.values()
                     if (bad := nonfinite_tensor(views(record)))), None))


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Failure|Exit)): (.+)$")
_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?([\w()]+)'>:<'(.*)$")  # str(type(ex)) + ":<'" + str(ex) + "'>"
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_reason(reason: str, limit: int = 300) -> str:
    """The client's own exception as one line (``InjectedClientFailure: injected failure of client
    0 in round 1``) out of Flower's error reason, which wraps it in Flower's and Ray's exception
    types and a remote traceback; else the wrapping exception's first line (a dead actor: Ray's
    ``ActorDiedError`` and how its process ended)."""
    lines = [line.rstrip() for line in _ANSI.sub("", reason).splitlines() if line.strip()]
    for line in lines:
        m = _EXCEPTION_LINE.match(line)
        if m and m.group(1) not in _WRAPPERS:
            return f"{m.group(1)}: {m.group(2).removesuffix(chr(39) + '>')}"[:limit]
    m = _FLOWER_REASON.match(lines[0]) if lines else None
    if m is None:
        return (lines[-1].strip() if lines else reason)[:limit]
    exit_type = re.search(r"Worker exit type: (\w+)", reason)
    how = f" (worker exit type {exit_type.group(1)}; a common cause is the OOM killer)" if exit_type else ""
    return f"{m.group(1)}: {m.group(2).removesuffix(chr(39) + '>')}{how}"[:limit]


def screen(messages: list[Message], replies: list[Message], timeout: float) -> tuple[list[Message], list[Failure]]:
    """The replies fit to aggregate (client-id order) and the failures of the others (client-id
    order; a message without a reply is one)."""
    sent = {m.metadata.message_id: int(m.content["config"][CLIENT_KEY]) for m in messages}
    good, failures, answered = [], [], set()
    for reply in replies:
        answered.add(reply.metadata.reply_to_message_id)
        cid = sent.get(reply.metadata.reply_to_message_id)
        if reply.has_error():
            failures.append(Failure(cid, error_reason(reply.error.reason)))
        elif what := nonfinite_update(reply.content):
            failures.append(Failure(reply_client(reply), what, diverged=True))
        else:
            good.append(reply)
    failures += [Failure(cid, f"no reply within fl.round_timeout {timeout:g} s")
                 for mid, cid in sent.items() if mid not in answered]
    failures.sort(key=lambda f: (f.client is None, f.client or 0))
    return sorted(good, key=reply_client), failures


@dataclass
class FailedRounds:
    """The failed-round policy, and its state (saved with the round state)."""

    min_replies: int
    max_failed_rounds: int
    streak: int = 0  # failed rounds in a row, up to the last completed round
    first: dict | None = None  # the streak's first failure (Failure as a dict) and its round

    def state(self) -> dict:
        return {"failed_streak": self.streak, "first_failure": self.first}

    def restore(self, extra: dict) -> None:
        """From a saved round's state (runs saved before this policy start with no streak)."""
        self.streak, self.first = int(extra.get("failed_streak", 0)), extra.get("first_failure")

    def judge(self, server_round: int, selected: int, good: int, failures: list[Failure], late: int = 0) -> bool:
        """True when the round may update the global model; raises once ``max_failed_rounds``
        rounds in a row had fewer than ``min_replies`` good updates (``late``: replies that came
        after ``fl.deadline_s``, named in the messages)."""
        stragglers = f" ({late} more came after fl.deadline_s)" if late else ""
        for failure in failures:
            log.warning("round %d: %s", server_round, failure)
        if good >= self.min_replies:
            self.streak, self.first = 0, None
            return True
        self.streak += 1
        if self.first is None and failures:
            self.first = {"round": server_round, **asdict(failures[0])}
        if self.streak < self.max_failed_rounds:
            log.warning("round %d failed: %d of %d clients gave a usable update in time%s (fl.min_replies %d); the "
                        "global model is unchanged", server_round, good, selected, stragglers, self.min_replies)
            return False
        first = Failure(self.first["client"], self.first["reason"], self.first["diverged"]) if self.first else None
        if first is not None and first.diverged and all(f.diverged for f in failures):
            raise DivergedError(f"{first.reason} from client {first.client}; {good} of {selected} clients gave a "
                                f"finite update", f"round {server_round}")
        streak = "" if self.streak == 1 else (
            f"; {self.streak} rounds in a row ({server_round - self.streak + 1}-{server_round}) had fewer, "
            f"fl.max_failed_rounds {self.max_failed_rounds}")
        quoted = f"first client error (round {self.first['round']}): {first}" if first else "no client error reported"
        raise FederationFailed(f"federation failed at round {server_round}: {good} of {selected} clients trained "
                               f"successfully{stragglers}, fewer than fl.min_replies {self.min_replies}{streak}; {quoted}")


@dataclass
class Trained:
    """One round's training: the global weights after it, the usable replies, the failures."""

    arrays: ArrayRecord
    selected: int
    good: list[Message]
    failures: list[Failure]
    info: dict[str, float]  # train_loss of the aggregated round (absent for a failed round), epsilon (DP)
    privacy: dict[str, dict[str, float]]  # the accountant's rows after the round: {id: metrics}
    counted: Counted  # what the round policy counted: stragglers, simulated finish times


PRIVACY_PREFIX = "privacy/"  # the privacy mechanism's tensors among the round state's algorithm/ ones


@dataclass
class ServerHooks:
    """The server's side of the seam for one run: the algorithm, the failed-round policy, the
    privacy mechanism and (for algorithms with client state) which state file of each client counts."""

    algorithm: Algorithm
    policy: FailedRounds
    privacy: NoPrivacy
    system: SimulatedClock  # whom to select, when each reply arrives, which replies count
    accepted: AcceptedStates | None = None
    codec: str = "none"  # fl.compression: how the updates travel (decoded before aggregation)

    @staticmethod
    def check(cfg, num_clients: int, sites: bool = False) -> None:
        """Refuse a config the algorithm, the privacy mode or the round policy cannot run
        (``ValueError`` naming the field), before Ray starts."""
        algorithm_class(cfg.fl.strategy.name).check(cfg)
        privacy_class(cfg.privacy.mode).check(cfg, num_clients, cfg.clients_per_round)
        SimulatedClock.check(cfg, num_clients, sites)

    @classmethod
    def for_run(cls, cfg, num_clients: int, state_root, sites: bool = False) -> "ServerHooks":
        """``sites``: a real federation (real arrival times; client state on the sites)."""
        algorithm = make_algorithm(cfg)
        accepted = AcceptedStates(num_clients, state_root) if algorithm.keeps_client_state else None
        clock = (WallClock if sites else SimulatedClock)(cfg, num_clients, cfg.clients_per_round)
        return cls(algorithm, FailedRounds(cfg.fl.min_replies, cfg.fl.max_failed_rounds),
                   make_privacy(cfg, num_clients, cfg.clients_per_round), clock, accepted, cfg.fl.compression)

    def aggregate(self, strategy, server_round: int, arrays: ArrayRecord, replies: list[Message]):
        """The algorithm's aggregation of the usable replies, decoded (``fl.compression``), through
        the privacy mechanism."""
        replies = decode_replies(replies, arrays, self.codec)
        return self.privacy.aggregate(server_round, arrays, replies,
                                      lambda rs: self.algorithm.aggregate(strategy, server_round, arrays, rs))

    def extra(self) -> dict:
        """What the round state's metadata keeps for the hooks: the failed-round streak, the clock."""
        return {**self.policy.state(), **self.system.state()}

    def state(self) -> dict[str, np.ndarray]:
        """Tensors saved with the round state (``extra()`` goes in its metadata)."""
        return {**self.algorithm.state(), **({"accepted_rounds": self.accepted.rounds} if self.accepted else {}),
                **{f"{PRIVACY_PREFIX}{k}": v for k, v in self.privacy.state().items()}}

    def saved(self) -> None:
        """After the round state is saved: client files it no longer refers to may go."""
        if self.accepted is not None:
            self.accepted.prune()

    def restore(self, tensors: dict[str, np.ndarray], extra: dict) -> None:
        self.policy.restore(extra)
        self.system.restore(extra)
        self.privacy.restore({k.removeprefix(PRIVACY_PREFIX): tensors.pop(k) for k in list(tensors)
                              if k.startswith(PRIVACY_PREFIX)})
        if self.accepted is not None:
            self.accepted.rounds = tensors.pop("accepted_rounds").astype(np.int32)
        self.algorithm.restore(tensors)


@dataclass
class InFlight:
    """A round whose messages are built and (``pushed``) out; ``finish_round`` collects its replies.
    ``error``: what building it raised, kept to be raised when the round is finished, so the round
    before it is still evaluated and saved first."""

    server_round: int
    arrays: ArrayRecord
    messages: list[Message]
    selection: object = None
    pushed: list[str] | None = None  # message ids, when the grid can receive later (``receive``)
    deadline: float = 0.0  # time.time() after which missing replies are failures
    error: BaseException | None = None


def send_round(strategy, grid, server_round: int, arrays: ArrayRecord, config, timeout: float,
               hooks: ServerHooks, push: bool = False) -> InFlight:
    """The round's cohort (the round policy's choice), each with the global weights, the
    algorithm's records and its own config. ``push``: send them now (the grid must offer
    ``receive``), so they train while the caller does other work; else ``finish_round`` sends them."""
    try:
        accepted = hooks.accepted
        records = hooks.algorithm.message_records(server_round, arrays)
        selection = hooks.system.select(server_round, message_bytes([arrays, *records.values()]))

        def client_config(cid: int) -> dict:
            budget = {BUDGET_KEY: selection.budgets[cid]} if cid in selection.budgets else {}
            return {**(accepted.message_config(cid) if accepted else {}), **budget}

        strategy.round_cohort = selection.clients
        strategy.round_extras = (records, client_config)
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        flight = InFlight(server_round, arrays, messages, selection)
        if push:
            flight.pushed, flight.deadline = list(grid.push_messages(messages)), time.time() + timeout
        return flight
    except Exception as exc:  # noqa: BLE001 - raised by finish_round, after the round before is saved
        if not push:
            raise
        return InFlight(server_round, arrays, [], error=exc)


def finish_round(flight: InFlight, strategy, grid, timeout: float, hooks: ServerHooks) -> Trained:
    """Of the round's usable updates, aggregate in client-id order those the policy counts (in
    time, the K earliest), if the round did not fail, else keep the global weights as they were."""
    if flight.error is not None:
        raise flight.error
    server_round, arrays, messages, accepted = flight.server_round, flight.arrays, flight.messages, hooks.accepted
    replies = grid.receive(flight.pushed, flight.deadline) if flight.pushed is not None else \
        grid.send_and_receive(messages, timeout=timeout)
    good, failures = screen(messages, list(replies), timeout)
    counted = hooks.system.count(good, len(messages))
    info: dict[str, float] = {"replied": float(len(good)), "offline": float(flight.selection.offline),
                              "aggregated": 0.0, **counted.info}
    if hooks.policy.judge(server_round, len(messages), len(counted.kept), failures, len(counted.stragglers)):
        info["aggregated"] = float(len(counted.kept))
        new_arrays, aggregated = hooks.aggregate(strategy, server_round, arrays, counted.kept)
        arrays = arrays if new_arrays is None else new_arrays
        if aggregated is not None:
            info["train_loss"] = float(aggregated["train_loss"])
        if accepted is not None:
            accepted.accept(server_round, [reply_client(r) for r in counted.kept])
    privacy = hooks.privacy.account(server_round, good)  # every update that reached the server, late ones too
    if privacy:
        info["epsilon"] = max(m["epsilon"] for m in privacy.values())
    return Trained(arrays, len(messages), counted.kept, failures, info, privacy, counted)


def evaluate_global(server_round: int, arrays: ArrayRecord, evaluate: Callable[[], dict], metric: str,
                    strategy: object) -> dict:
    """``evaluate()`` of the global model, refused (``DivergedError``) when the model, or its loss or
    ``metric`` on any view, is not finite: before it can be saved, or picked as best."""
    where = f"round {server_round}"
    # The server's own step (FedAdam's eta, FedAvgM's server rate) can diverge where clients did not.
    fix = next((f"train.lr or fl.strategy.options.{a}" for a in ("eta", "server_learning_rate")
                if hasattr(strategy, a)), "train.lr")
    check_finite(where, tensors=views(arrays), fix=fix)
    with located(where, fix):
        results = evaluate()
    for metrics in results.values():
        check_finite(where, {k: v for k, v in metrics.items() if k in ("loss", metric)}, fix=fix)
    return results
