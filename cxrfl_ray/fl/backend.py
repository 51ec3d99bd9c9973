"""Our Ray backend for Flower's simulation runtime.

Flower's ``RayBackend`` sizes its actor pool from the whole cluster and calls ``ray.shutdown()``
when a simulation ends. Inside a Ray Tune trial both are wrong: the trial owns only its placement
group's bundles (a pool sized from the cluster waits forever for actors that cannot be placed),
and shutting Ray down kills the trial's own worker. ``PooledRayBackend`` keeps Flower's
message path (and its actor, extended) but

- sizes the pool from the placement group the caller runs in (the trial's bundles), else from the
  cluster, and never beyond the number of clients trained per round;
- places the actors in that placement group;
- replaces an actor whose process died, so one lost client does not stall later rounds;
- leaves Ray running, and keeps its idle actors for the next simulation of this driver with the
  same resources (their torch and Flower imports are the bulk of a simulation's start-up) for
  ``KEEP_IDLE_S`` seconds: a kept actor holds its CPUs/GPUs, so anything else that needs them
  (a Tune trial's placement group) would otherwise wait for them forever.

It also moves model weights at memory speed (the messages and records stay Flower's):

- the global weights of a round (one ``ArrayRecord`` object in every message of the round), and
  any other record an algorithm sends with them, go into Ray's object store once per round, not
  once per message (``SharedArrays``), as raw arrays (``fl/arrays.py``): plain numpy buffers,
  not ``np.save`` bytes;
- a record of raw arrays crosses Ray as one packed out-of-band buffer (``use_out_of_band_arrays``):
  Ray copies it once into its object store, and the receiver maps it there read-only instead of
  copying it out. The sender packs it first (one copy) unless it already lies in one buffer: a
  round's FedAvg average (``fl/averaging.py``) and a client's reply over its model's weights
  (``fl/flat_weights.py``) do. A client copies the global weights once, into its model; the
  driver averages from the mapped replies, with no decode copy.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable

import numpy as np
import ray
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cxrfl_ray.fl.arrays import RawArray, as_raw, pack, record_of, unpack
from cxrfl_ray.fl.memory import keep_freed_memory

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


def _array_parts(array: Array) -> tuple:
    """An ``Array`` for Ray, its bytes as a numpy buffer (pickled out of band, not copied inline)."""
    return array.dtype, array.shape, array.stype, np.frombuffer(array.data, dtype=np.uint8)


def _array_from_parts(parts: tuple) -> Array:
    dtype, shape, stype, data = parts
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data.tobytes())  # Flower's Array holds bytes


def _raw_parts(array: RawArray) -> tuple:
    return array.dtype, array.shape, array.data


def _raw_from_parts(parts: tuple) -> RawArray:
    """The raw array over the buffer Ray hands back: read-only, in its object store, no copy."""
    return RawArray.from_parts(*parts)


def _record_parts(record: ArrayRecord) -> tuple:
    """A record of raw arrays as one packed buffer (``arrays.pack``); any other as its arrays."""
    if len(record) and all(isinstance(v, RawArray) for v in record.values()):
        return ("packed", *pack(record))
    return ("arrays", list(record.items()))


def _record_from_parts(parts: tuple) -> ArrayRecord:
    if parts[0] == "packed":
        return unpack(parts[1], parts[2])
    return record_of(dict(parts[1]))


def use_out_of_band_arrays() -> None:
    """Send arrays' buffers through Ray out of band from this process (Ray applies a custom
    serializer in the process that pickles; the reader needs only this module importable)."""
    ray.util.register_serializer(Array, serializer=_array_parts, deserializer=_array_from_parts)
    ray.util.register_serializer(RawArray, serializer=_raw_parts, deserializer=_raw_from_parts)
    ray.util.register_serializer(ArrayRecord, serializer=_record_parts, deserializer=_record_from_parts)


class ClientActor(VirtualClientEngineActor):
    """Flower's client actor (``run`` a message through the ClientApp), plus ``run_shared`` for
    messages whose ArrayRecords come as object-store references, and out-of-band replies."""

    def __init__(self) -> None:
        use_out_of_band_arrays()
        keep_freed_memory()  # a round's activations reuse the last round's pages

    def warm(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (the ClientApp's set-up for an experiment) before the first message, so its
        imports, data and model are ready when the message comes."""
        fn()

    def run_shared(self, app_fn, message: Message, cid: str, context: Context, order: list[str],
                   names: list[str], *records: ArrayRecord):
        """``run`` the message with the ArrayRecords ``names`` (resolved by Ray) put back in place."""
        shared = dict(zip(names, records))
        content = message.content
        message.content = RecordDict({k: shared[k] if k in shared else content[k] for k in order})
        return self.run(app_fn, message, cid, context)


RemoteClientActor = ray.remote(ClientActor)


class SharedArrays:
    """The ArrayRecords of the latest message put in Ray's object store, each reused while the
    same record object with the same arrays comes again. Every message of a round carries the
    same records (the global weights, and an algorithm's, e.g. SCAFFOLD's control variate), so a
    round puts each once; holding only the latest one would re-put both for every message.

    ``raw``: put each record as raw arrays (``as_raw``: views of its bytes, then one copy into the
    object store), so clients map them and reply raw; ``False`` puts Flower's npy form as it is
    (the path before raw arrays, kept to compare against: its clients reply npy)."""

    def __init__(self, raw: bool = True) -> None:
        self.raw = raw
        self._lock = threading.Lock()
        self._held: list[tuple] = []  # (record, its (name, bytes) pairs, object ref) of the latest message

    def refs(self, records: list[ArrayRecord]) -> list:
        """Object references for one message's records (the records of earlier messages go:
        Ray frees them when unused)."""
        with self._lock:
            wanted = [(record, [(name, array.data) for name, array in record.items()]) for record in records]
            hits = [next((h for h in self._held if h[0] is record and _same(h[1], items)), None)
                    for record, items in wanted]
            self._held = [h for h in hits if h is not None]  # the last round's records go before the new ones are put
            held = [hit or (record, items, ray.put(as_raw(record) if self.raw else record))
                    for hit, (record, items) in zip(hits, wanted)]
            self._held = held
        return [h[2] for h in held]

    def ref(self, record: ArrayRecord):
        return self.refs([record])[0]

    def clear(self) -> None:
        with self._lock:
            self._held = []


def _same(old: list[tuple], new: list[tuple]) -> bool:
    """The same names holding the very same bytes objects (bytes never change in place)."""
    return len(old) == len(new) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(old, new))


def split_arrays(message: Message, shared: SharedArrays) -> tuple[Message, list[str], list[str], list]:
    """The message without its ArrayRecords (a shallow copy), the record order, the ArrayRecords'
    names and their object references, for ``ClientActor.run_shared``."""
    content = message.content
    order = list(content.keys())
    names = [k for k in order if isinstance(content[k], ArrayRecord)]
    light = copy.copy(message)  # the link state's message is left as it is
    light.content = RecordDict({k: content[k] for k in order if k not in names})
    return light, order, names, shared.refs([content[k] for k in names])


class PooledRayBackend(Backend):
    """Flower backend: a pool of ``ClientActor``s sized to the caller's share of Ray.

    ``raw_arrays`` (class-wide): weights travel as raw arrays; ``False`` is Flower's npy form
    through the same backend, for the benchmarks and the test that the two give the same run."""

    raw_arrays = True

    def __init__(self, client_resources: dict[str, float], max_actors: int,
                 warm: Callable[[], None] | None = None) -> None:
        """``warm``: run on every actor as soon as it is built (``ClientActor.warm``), while the
        driver still prepares its side (round 0's evaluation)."""
        super().__init__({})
        self.warm = warm
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
        # A trial's bundles are reserved for it whatever its cohort: an actor in each, so a later
        # trial of this Tune worker with a larger cohort finds them all warm (client_slots).
        self.size = slots if self.group is not None else min(slots, max(1, max_actors))
        self._key = (ray.get_runtime_context().get_job_id(), self.group.id.hex() if self.group else None,
                     tuple(sorted(self.client_resources.items())))
        self.idle: list = []
        self.app_fn: Callable[[], ClientApp] | None = None
        self.shared = SharedArrays(raw=self.raw_arrays)
        use_out_of_band_arrays()

    def _new_actor(self):
        options = dict(self.client_resources)
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group)
        return RemoteClientActor.options(**options).remote()

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        with _LOCK:
            kept = [actor for actor, _ in _IDLE.pop(self._key, [])]
        self.idle = kept[: self.size] + [self._new_actor() for _ in range(self.size - len(kept[: self.size]))]
        for extra in kept[self.size:]:
            ray.kill(extra)
        if self.warm is not None:  # queued before any message: an actor runs its tasks in order
            for actor in self.idle:
                actor.warm.remote(self.warm)
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
        light, order, names, refs = split_arrays(message, self.shared)
        cid = str(context.node_config.get("partition-id", 0))
        actor = self.idle.pop()
        future = actor.run_shared.remote(self.app_fn, light, cid, context, order, names, *refs)
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
        self.shared.clear()
        with _LOCK:
            _IDLE.setdefault(self._key, []).extend((actor, token) for actor in actors)
        timer = threading.Timer(KEEP_IDLE_S, _release, args=(self._key, token))
        timer.daemon = True
        timer.start()


def _release(key: tuple, token: object) -> None:
    """Kill the actors of one hand-back that are still idle (not taken by a newer simulation)."""
    with _LOCK:  # killed before they leave _IDLE: an empty _IDLE means every kept actor is going
        idle = _IDLE.get(key, [])
        for actor in [actor for actor, t in idle if t is token]:
            try:
                ray.kill(actor)
            except Exception:  # Ray may already be down (the driver is exiting)
                pass
        _IDLE[key] = [(actor, t) for actor, t in idle if t is not token]


def release_idle_actors() -> None:
    """Kill the actors kept for reuse now (before a sweep needs the resources, or ``ray.shutdown``)."""
    with _LOCK:
        actors = [actor for kept in _IDLE.values() for actor, _ in kept]
        _IDLE.clear()
    for actor in actors:
        ray.kill(actor)
