"""Our Ray backend for Flower's simulation runtime.

Flower's ``RayBackend`` sizes its actor pool from the whole cluster and calls ``ray.shutdown()``
when a simulation ends. Inside a Ray Tune trial both are wrong: the trial owns only its placement
group's bundles (a pool sized from the cluster waits forever for actors that cannot be placed),
and shutting Ray down kills the trial's own worker. ``PooledRayBackend`` keeps Flower's actor
class and message path but

- sizes the pool from the placement group the caller runs in (the trial's bundles), else from the
  cluster, and never beyond the number of clients trained per round;
- places the actors in that placement group;
- replaces an actor whose process died, so one lost client does not stall later rounds;
- leaves Ray running, and keeps its idle actors for the next simulation of this driver with the
  same resources (their torch and Flower imports are the bulk of a simulation's start-up) for
  ``KEEP_IDLE_S`` seconds: a kept actor holds its CPUs/GPUs, so anything else that needs them
  (a Tune trial's placement group) would otherwise wait for them forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.simulation.ray_transport.ray_actor import ClientAppActor
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("cxrfl.fl")

# Idle actors left by finished simulations, by (Ray job, placement group, client resources),
# each with the token of the hand-back that put it there (its keep window).
_IDLE: dict[tuple, list[tuple[object, object]]] = {}
_LOCK = threading.Lock()
KEEP_IDLE_S = 30.0


def slots_in_bundles(bundles: list[dict[str, float]], client: dict[str, float]) -> int:
    """How many clients with ``client`` resources fit in these bundles (each bundle on its own)."""
    total = 0
    for bundle in bundles:
        fits = [bundle.get(key, 0.0) / need for key, need in _ray_names(client).items() if need > 0]
        total += int(min(fits)) if fits else 0
    return total


def _ray_names(client: dict[str, float]) -> dict[str, float]:
    return {"CPU": float(client.get("num_cpus", 1)), "GPU": float(client.get("num_gpus", 0))}


def cluster_slots(client: dict[str, float]) -> int:
    """Clients that fit on the cluster's live nodes, node by node."""
    return slots_in_bundles([n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"]], client)


class PooledRayBackend(Backend):
    """Flower backend: a pool of ``ClientAppActor`` sized to the caller's share of Ray."""

    def __init__(self, client_resources: dict[str, float], max_actors: int) -> None:
        super().__init__({})
        if not ray.is_initialized():
            raise RuntimeError("PooledRayBackend needs a running Ray (the engine starts it)")
        self.client_resources = dict(client_resources)
        self.group = ray.util.get_current_placement_group()
        if self.group is not None:
            # Bundle 0 holds the trial's own driver (Tune's convention); clients get the rest.
            bundles = self.group.bundle_specs
            slots = slots_in_bundles(bundles[1:] if len(bundles) > 1 else bundles, self.client_resources)
        else:
            slots = cluster_slots(self.client_resources)
        if slots < 1:
            where = "this placement group's bundles" if self.group is not None else "the Ray cluster"
            raise ValueError(f"no client fits in {where} with resources {self.client_resources}; "
                             "lower fl.client_num_cpus / fl.client_num_gpus")
        self.size = min(slots, max(1, max_actors))
        self._key = (ray.get_runtime_context().get_job_id(), self.group.id.hex() if self.group else None,
                     tuple(sorted(self.client_resources.items())))
        self.idle: list = []
        self.app_fn: Callable[[], ClientApp] | None = None

    def _new_actor(self):
        options = dict(self.client_resources)
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group)
        return ClientAppActor.options(**options).remote()

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        with _LOCK:
            kept = [actor for actor, _ in _IDLE.pop(self._key, [])]
        self.idle = kept[: self.size] + [self._new_actor() for _ in range(self.size - len(kept[: self.size]))]
        for extra in kept[self.size:]:
            ray.kill(extra)
        self.app_fn = app_fn
        log.debug("actor pool: %d actors (%d reused)", self.size, min(len(kept), self.size))

    @property
    def num_workers(self) -> int:
        return self.size

    def is_worker_idle(self) -> bool:
        return bool(self.idle)

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise RuntimeError("build() the backend before sending it messages")
        actor = self.idle.pop()
        future = actor.run.remote(self.app_fn, message, str(context.node_config.get("partition-id", 0)), context)
        try:
            _, reply, updated = ray.get(future)
        except ray.exceptions.RayActorError:
            log.warning("a client actor died; replacing it")
            actor = self._new_actor()
            raise
        finally:
            self.idle.append(actor)
        return reply, updated

    def terminate(self) -> None:
        """Keep the idle actors for the next simulation, for a while; Ray stays up."""
        actors, self.idle, token = self.idle, [], object()
        with _LOCK:
            _IDLE.setdefault(self._key, []).extend((actor, token) for actor in actors)
        timer = threading.Timer(KEEP_IDLE_S, _release, args=(self._key, token))
        timer.daemon = True
        timer.start()


def _release(key: tuple, token: object) -> None:
    """Kill the actors of one hand-back that are still idle (not taken by a newer simulation)."""
    with _LOCK:
        idle = _IDLE.get(key, [])
        expired = [actor for actor, t in idle if t is token]
        _IDLE[key] = [(actor, t) for actor, t in idle if t is not token]
    for actor in expired:
        try:
            ray.kill(actor)
        except Exception:  # Ray may already be down (the driver is exiting)
            pass


def release_idle_actors() -> None:
    """Kill the actors kept for reuse now (before a sweep needs the resources, or ``ray.shutdown``)."""
    with _LOCK:
        actors = [actor for kept in _IDLE.values() for actor, _ in kept]
        _IDLE.clear()
    for actor in actors:
        ray.kill(actor)
