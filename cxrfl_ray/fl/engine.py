"""The only module that drives Flower's simulation runtime (and starts Ray).

``run_federated(cfg)`` validates everything first (dataset vs task, plan, strategy options),
then runs the ServerApp in a thread and the ClientApp on Ray actors through Flower's simulation
runtime (``run_api``: its message queues, node contexts and worker threads), with our
``PooledRayBackend`` in place of Flower's ``RayBackend``. Flower's ``run_simulation`` (deprecated
in flwr 1.42) hard-codes ``RayBackend``, which shuts Ray down at the end and sizes its pool from
the whole cluster; composing the runtime here keeps Ray up for the caller (a test session, a Ray
Tune trial, the next preset) and is the one place to change when Flower's API moves.

Flower's runtime also waits on fixed polls: its extractor looks for pushed messages every 0.1 s
and its in-memory grid sleeps 0.1 s between looks for replies, so every message waited about
0.1-0.2 s for nothing. ``simulate`` keeps Flower's link state, workers and reply injector but wakes
on a ``Doorbell`` instead: the grid rings when it pushes, the injector rings when it stores a reply.

Ray: an already running Ray (``ray.init`` by the caller, or a Tune trial's worker) is used as it
is; otherwise Ray starts here with ``fl.ray_init`` and stays up until the process exits.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from queue import Queue
from typing import Callable

from cxrfl_ray.baseline import new_run_dir
from cxrfl_ray.config import ConfigError, ExperimentConfig, load_config
from cxrfl_ray.experiment import prepare
from cxrfl_ray.fl.state import STATE_FILE, check_resume, saved_round
from cxrfl_ray.fl.rounds import ServerHooks
from cxrfl_ray.fl.system.policy import cohort_nodes
from cxrfl_ray.fl.strategies import make_strategy

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class _DropKnownNoise(logging.Filter):
    """Flower's messages that say nothing new to our users: a warning that client evaluation is
    off (on purpose), and a client's exception with its traceback, twice, from Flower's worker
    (the round loop logs each failed client with its exception in one line; ``--verbose`` keeps
    Flower's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.pathname.endswith("vce_api.py"):
            return False
        return "fraction_evaluate is set to 0.0" not in record.getMessage()


def start_ray(**init_args) -> None:
    """Connect to the Ray cluster in ``RAY_ADDRESS`` (set inside a Ray job), else start a new
    local Ray for simulations: all CPUs, ``default_object_store()``, no dashboard, quiet
    (``init_args`` override, e.g. ``fl.ray_init``). Actors get the driver's import path and env.

    A new local Ray is asked for explicitly (``address="local"``): plain ``ray.init()`` would
    join whatever ``ray start`` left running on the machine.
    """
    import ray

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **QUIET_ENV}}
    address = init_args.pop("address", None) or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # A cluster's nodes have the package installed; they keep their own import path. Inside a
        # Ray job the job's runtime env applies (Ray refuses a second one that sets the same keys).
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, logging_level=logging.WARNING,
                 **({} if in_job else {"runtime_env": {"env_vars": dict(QUIET_ENV)}}))
        return
    init = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
            "object_store_memory": default_object_store(), "logging_level": logging.WARNING, "log_to_driver": True}
    init.update(init_args)
    ray.init(address="local", runtime_env=runtime_env, **init)


SMALL_OBJECT_STORE = 256 * 1024**2


def _memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_object_store() -> int:
    """The object store of a Ray started here without a size: an eighth of the machine's memory,
    between 256 MiB and 2 GiB. Replies stay mapped in it until their round is aggregated, so a
    sweep's trials need room for their rounds; its pages are only touched when used."""
    return int(min(max(SMALL_OBJECT_STORE, _memory() // 8), 2 * 1024**3))


def round_object_store(cfg: ExperimentConfig, messages: int) -> int:
    """Bytes of Ray's object store a round of this run needs: the last and the new global weights
    and each of the ``messages`` replies (twice over, for an algorithm's record of the same size
    beside them, e.g. SCAFFOLD's), which stay mapped until the round is aggregated; at least the
    default store, at most a third of the machine's memory. A store smaller than that spills
    pinned replies to disk (seconds of stall a round)."""
    from cxrfl_ray.fl.algorithms.base import model_skeleton, trainable_state

    model_bytes = sum(t.numel() * t.element_size() for t in trainable_state(model_skeleton(cfg)).values())
    return int(min(max(default_object_store(), 2 * (messages + 2) * model_bytes), _memory() // 3))


def ensure_ray(cfg: ExperimentConfig, messages: int = 1) -> None:
    """Start Ray unless the caller already has (then its settings stand and ``fl.ray_init`` is
    unused), its object store sized for a round of ``messages`` replies unless ``fl.ray_init``
    sets ``object_store_memory``."""
    import ray

    if not ray.is_initialized():
        start_ray(**{"object_store_memory": round_object_store(cfg, messages), **cfg.fl.ray_init})


class Doorbell:
    """A counter behind a condition, so a thread sleeps until another one has news for it
    instead of polling (Flower's runtime polls every 0.1 s, twice per message)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.rings = 0

    def ring(self) -> None:
        with self._changed:
            self.rings += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Return once rung after ``seen`` (``rings`` read before looking), or after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: self.rings != seen, timeout)


@functools.cache
def _event_grid_class():
    """Flower's ``InMemoryGrid`` that rings on push and waits for replies on a doorbell (Flower's
    sleeps ``pull_interval``, 0.1 s, between pulls). Built on first use: flwr loads lazily here."""
    from flwr.superlink.grid import InMemoryGrid

    class EventGrid(InMemoryGrid):
        client_cpus = 0.0  # CPU cores the client actors hold on this machine (the server's evaluation shares the rest)

        def __init__(self, state_factory, pushed: Doorbell, replied: Doorbell) -> None:
            super().__init__(state_factory)
            self.pushed, self.replied = pushed, replied

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            self.pushed.ring()
            return ids

        def send_and_receive(self, messages, *, timeout: float | None = None):
            """Flower's loop (push, pull until all replies are in or ``timeout``), waiting on the doorbell."""
            return self.receive(self.push_messages(messages), None if timeout is None else time.time() + timeout)

        def receive(self, message_ids, deadline: float | None = None) -> list:
            """The replies to pushed messages, once all are in or at ``deadline`` (``time.time()``;
            None: no limit), so a caller can push a round and do other work before it waits.
            ``pull_interval`` stays the longest wait, so replies the link state makes itself
            (expired messages) are still found."""
            pending, replies = set(message_ids), []
            while deadline is None or time.time() < deadline:
                seen = self.replied.rings
                found = list(self.pull_messages(pending))
                replies.extend(found)
                pending.difference_update(m.metadata.reply_to_message_id for m in found)
                if not pending:
                    break
                left = self.pull_interval if deadline is None else max(0.0, deadline - time.time())
                self.replied.wait(seen, min(self.pull_interval, left))
            return replies

    return EventGrid


class _RingingState:
    """The link state as Flower's reply injector sees it: storing a reply rings the grid."""

    def __init__(self, state, replied: Doorbell) -> None:
        self._state, self._replied = state, replied

    def store_message_res(self, message):
        try:
            return self._state.store_message_res(message)
        finally:
            self._replied.ring()


def _deliver(state, nodes, inbox: Queue, pushed: Doorbell, stop: threading.Event) -> None:
    """Hand pushed messages to the workers as soon as the grid rings (Flower's
    ``add_messages_to_queue`` looks every 0.1 s); the 1 s wait only bounds noticing ``stop``."""
    while not stop.is_set():
        seen = pushed.rings
        for node_id in nodes:
            for message in state.get_message_ins(node_id=node_id, limit=None):
                inbox.put(message)
        pushed.wait(seen, 1.0)


def _run_clients(client_app, backend, nodes, state, contexts, pushed: Doorbell, replied: Doorbell,
                 stop: threading.Event) -> None:
    """Flower's ``run_api`` with ``_deliver`` for its polling extractor: Flower's ``worker``s run
    messages on the backend, Flower's injector stores the replies (and rings the grid)."""
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import put_message_into_state, worker

    inbox, outbox, metrics = Queue(), Queue(), VceMetrics()
    try:
        threads = [threading.Thread(target=_deliver, args=(state, nodes, inbox, pushed, stop)),
                   threading.Thread(target=put_message_into_state, args=(_RingingState(state, replied), outbox, stop))]
        threads += [threading.Thread(target=worker, args=(inbox, outbox, contexts, backend, stop, metrics))
                    for _ in range(backend.num_workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        backend.terminate()


def simulate(server_app, client_app, *, num_nodes: int, client_resources: dict[str, float],
             runtime: str = "cxrfl", warm: Callable[[], None] | None = None) -> None:
    """Run a ServerApp against ``num_nodes`` virtual SuperNodes whose ClientApp runs on Ray actors.

    This is what Flower's ``run_simulation`` does (``_main_loop`` and ``start_vce``), with our
    backend, and (``runtime="cxrfl"``) without its polls; ``runtime="flower"`` runs Flower's own
    ``run_api`` and grid, for comparison. The ServerApp's exceptions are left to it (ours records
    them in its ``Outcome``). ``warm``: the ClientApp's set-up, run on each actor as it starts;
    with ``runtime="cxrfl"`` the actors start before the ServerApp, so their imports, data and
    model are built while the ServerApp evaluates round 0 (Flower's runtime starts them after).
    """
    import secrets

    from flwr.app import Context, RecordDict
    from flwr.app.user_config import UserConfig
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores, _register_nodes, run_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.simulation.run_simulation import run_serverapp_th
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from cxrfl_ray.fl.backend import PooledRayBackend

    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id, run.federation_id = secrets.randbits(63), NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = state_factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    if runtime not in ("cxrfl", "flower"):
        raise ValueError(f"unknown runtime {runtime!r}: 'cxrfl' or 'flower'")
    pushed, replied = Doorbell(), Doorbell()
    grid = _event_grid_class()(state_factory, pushed, replied) if runtime == "cxrfl" else InMemoryGrid(state_factory)
    grid.set_run(run)

    backend = PooledRayBackend(client_resources, max_actors=num_nodes, warm=warm)  # fails here if no client fits
    grid.client_cpus = min(backend.size, num_nodes) * client_resources.get("num_cpus", 0.0)  # the busy ones
    if runtime == "cxrfl":
        backend.build(lambda: client_app)  # the actors start now (Flower's run_api builds its backend itself)
    stop = threading.Event()  # set by the ServerApp thread when it returns or raises
    server_context = Context(run_id=run.run_id, node_id=0, node_config=UserConfig(), state=RecordDict(),
                             run_config=UserConfig())
    # The nodes exist before the ServerApp starts: a resumed run asks for them at once (no round 0)
    nodes = _register_nodes(num_nodes=num_nodes, state_factory=state_factory)
    contexts = _register_node_info_stores(nodes, run)
    server = run_serverapp_th(None, server_app, server_context, grid, "", stop, Queue(), False, Queue())
    try:
        if runtime == "cxrfl":
            _run_clients(client_app, backend, list(nodes), state, contexts, pushed, replied, stop)
        else:
            run_api(lambda: client_app, lambda: backend, nodes, state_factory, contexts, stop, VceMetrics())
    finally:
        stop.set()
        server.join()


def run_federated(cfg: ExperimentConfig | None = None, quiet: bool = False, verbose: bool = False,
                  resume: str | Path | None = None, run_dir: str | Path | None = None,
                  on_round: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Run one federated simulation; returns its run folder.

    ``resume``: a run folder of an interrupted simulation; it continues after the last completed
    round with that folder's own config (``cfg`` is then ignored). ``run_dir``: where a new run
    goes (default: a new dated folder under ``out_dir``). ``on_round(round, metrics)``: called
    after each round's server evaluation, from the ServerApp's thread.
    """
    if resume is not None:
        run_dir = Path(resume)
        done = saved_round(run_dir)
        if done is None:
            raise ConfigError(f"--resume {run_dir}: no saved round state ({STATE_FILE}) in that folder")
        cfg = load_config(run_dir / "config.yaml")
        check_resume(run_dir, cfg)  # an edited config.yaml is refused here, before any data or Ray
        if done >= cfg.fl.rounds:
            raise ConfigError(f"--resume {run_dir}: all {cfg.fl.rounds} rounds are already done")
    assert cfg is not None
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(_DropKnownNoise())
    prep = prepare(cfg)
    cfg = prep.cfg  # with counts taken from the dataset (partition.clients: sites)
    try:  # strategy options are checked before Ray starts
        make_strategy(cfg.fl.strategy.name, dict(cfg.fl.strategy.options), num_clients=len(prep.plan.clients),
                      per_round=cfg.clients_per_round, seed=cfg.seed, client_eval=cfg.fl.client_eval,
                      min_replies=cfg.fl.min_replies)
        ServerHooks.check(cfg, len(prep.plan.clients))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.fl.min_replies > cfg.clients_per_round:
        raise ConfigError(f"fl.min_replies {cfg.fl.min_replies} is more than the {cfg.clients_per_round} clients "
                          f"trained per round: every round would fail")

    from cxrfl_ray.fl.client import app as client_app, warm as warm_client
    from cxrfl_ray.fl.server import Outcome, make_server_app

    if resume is None:
        if run_dir is None:
            run_dir = new_run_dir(cfg, "fl")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    outcome = Outcome()
    nodes = cohort_nodes(cfg, len(prep.plan.clients))
    ensure_ray(cfg, messages=nodes)
    server_app = make_server_app(prep, run_dir, outcome, quiet, resume=resume is not None, on_round=on_round)
    # Any virtual node can play any plan client, so only a round's cohort of nodes is needed
    # (over-selection included).
    simulate(server_app, client_app, num_nodes=nodes,
             client_resources={"num_cpus": cfg.fl.client_num_cpus, "num_gpus": cfg.fl.client_num_gpus},
             warm=functools.partial(warm_client, cfg.to_yaml()))
    if isinstance(outcome.error, ValueError):  # ours (diverged, failed federation, bad input): the one error
        raise outcome.error
    if outcome.error is not None:
        raise RuntimeError(f"federated run failed: {outcome.error}") from outcome.error
    if not outcome.summary:
        raise RuntimeError(f"federated run ended without a summary (see logs); run folder {run_dir}")
    return run_dir
