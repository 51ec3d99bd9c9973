"""Per-message cost of moving model weights through Flower's message path, broken into parts.

Every federated round sends the global weights to each selected client and gets the client's
weights back, as a Flower ``Message`` holding an ``ArrayRecord``. This measures what one such
message costs for models of 0.1K (tiny-conv), 0.1M (``linear-0.1M``: one 316x316 linear layer,
as cost depends only on the bytes and the number of tensors), 11M (resnet18) and 23.5M (resnet50)
parameters (classification, 1 channel, 3 classes), so the fixed cost of a round can be told apart from
training. Components (median of several repeats, ms):

- ``to_record``: ``ArrayRecord(state_dict)`` from a torch state dict (``trainable_state``):
  Flower serialises every tensor with ``np.save`` into ``bytes``;
- ``from_record``: ``record.to_torch_state_dict()`` (``np.load`` of each array);
- ``weights_record`` / ``load_global``: what our ClientApp and ServerApp use instead: the same
  bytes written with one copy per tensor, and the weights copied into the model straight from
  the message's bytes (``load_global`` includes ``load_state_dict``'s copy);
- ``pickle``: ``pickle.dumps`` + ``loads`` of a ``Message`` carrying the record (what Ray does
  to a task argument and to its return value);
- ``ray_roundtrip``: a trivial Ray actor method that receives the Message and returns it
  (serialise, put in the object store, transfer, deserialise; both ways), Ray's default pickling;
- ``ray_roundtrip_oob``: the same with ``backend.use_out_of_band_arrays`` on both sides (each
  ``Array``'s bytes as an out-of-band buffer: one copy into the object store, none out of it);
- ``raw_record``: ``arrays.raw_record`` of the same state dict: raw arrays over the tensors'
  memory (what a client replies with inside a simulation; no copy);
- ``ray_roundtrip_raw``: the Ray round trip of a Message carrying raw arrays (out of band, mapped
  read-only on each side);
- ``average``: FedAvg of a round's 10 replies: Flower's ``aggregate_arrayrecords`` (over raw
  replies, no decode) against ours (``fl/averaging.py``'s ``packed_average`` over packed replies,
  the same bytes: checked);
- ``end_to_end``: through the real runtime, ``cxrfl_ray.fl.engine.simulate`` with our backend:
  a small ServerApp sends one train message per round to one node with a new record of the
  model's weights each round (a round's new global: the backend puts it in Ray's object store;
  raw: packed in a new buffer, as ``fl/averaging.py`` makes a round's average), and an echo
  ClientApp (this module's ``echo_app``) loads the weights into a torch model whose weights live
  in one buffer (``FlatWeights``, as our ClientApp's) and replies with its weights in the form
  they came in (no training); the server reads every
  array of the reply. Per message = the median of rounds 2..N (round 1 pays for the actor's
  start-up, and the first puts into a fresh object store fault its pages in). Measured three ways in one run: Flower's runtime (``run_api`` and ``InMemoryGrid``,
  which poll every 0.1 s for pushed messages and for replies) with npy weights; ours (woken by a
  doorbell on push and on reply) with npy weights (``PooledRayBackend.raw_arrays = False``, the
  path before raw arrays); ours with raw arrays (the default).

Before / after (``--quick``, 2 shared cores, BENCHMARKS.md 2026-11-30 20:28 / 20:36): per message
end to end, tiny-conv 201 -> 11 ms, resnet18 345 -> 164 ms, resnet50 449 -> 349 ms (before:
Flower's polls and in-band pickling of every message). What is left for ResNet50 is copying 94 MB
of weights: the echo client's ``np.load`` and ``np.save`` (Flower's ArrayRecord format, inside the
ClientApp) and Ray's object store both ways; see the reading in BENCHMARKS.md.

Issue 19 (raw arrays): the round's global weights go into Ray's object store once as numpy
buffers, clients map them and copy them once into the model, and replies travel as raw buffers
the server aggregates from without a decode copy.

Target: ResNet50 <= 40 ms per message, end to end (issue 19; was <= 100 ms).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.fl.arrays import pack, raw_record, record_of, unpack, views  # noqa: E402
from cxrfl_ray.fl.backend import PooledRayBackend, use_out_of_band_arrays  # noqa: E402
from cxrfl_ray.fl.client import load_global, trainable_state, weights_record  # noqa: E402
from cxrfl_ray.fl.flat_weights import FlatWeights  # noqa: E402
from cxrfl_ray.tasks.models import create_model  # noqa: E402

MODELS = ["tiny-conv", "linear-0.1M", "resnet18", "resnet50"]
TARGET_MODEL, TARGET_MS = "resnet50", 40.0


def build(name: str) -> torch.nn.Module:
    if name == "linear-0.1M":  # no registered model has ~0.1M parameters
        torch.manual_seed(0)
        return torch.nn.Linear(316, 316)
    return create_model(name, "classification", 1, 3)


# -- the echo ClientApp: importable (``benchmarks.message_cost``), so Ray actors import it ---------

echo_app = ClientApp()
_ECHO_MODELS: dict[str, FlatWeights] = {}  # one resident model per name, per actor, in one buffer


@echo_app.train()
def echo(msg: Message, context: Context) -> Message:
    """Load the weights into torch and reply with them as our ClientApp does (``Runtime.load_global``,
    and the form they came in): the message path without training."""
    name = str(msg.content["config"]["model"])
    if name not in _ECHO_MODELS:
        _ECHO_MODELS[name] = FlatWeights(build(name))
    flat = _ECHO_MODELS[name]
    if not flat.load(msg.content["arrays"]):
        load_global(flat.model, msg.content["arrays"])
    reply = flat.record_like(trainable_state(flat.model), like=msg.content["arrays"])
    return Message(content=RecordDict({"arrays": reply}), reply_to=msg)


# -- components -----------------------------------------------------------------------------------

def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def train_message(record: ArrayRecord, name: str) -> Message:
    """A train message as the ServerApp would build it (outside a run: set the identity that
    ``engine.simulate`` sets for its ServerApp thread)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    content = RecordDict({"arrays": record, "config": ConfigRecord({"model": name})})
    return Message(content=content, dst_node_id=1, message_type="train")


def components(name: str, repeats: int, echo_actor, oob_echo_actor) -> dict:
    import ray
    from flwr.app import Array

    model = build(name)
    state = trainable_state(model)
    record = ArrayRecord(state)
    msg = train_message(record, name)
    ray.util.deregister_serializer(Array)  # Ray's default pickling on this side (the engine sets it)
    row = {
        "params_m": float(f"{sum(v.numel() for v in state.values()) / 1e6:.3g}"),
        "mb": round(record.count_bytes() / 1e6, 3),
        "to_record_ms": median_ms(lambda: ArrayRecord(state), repeats),
        "from_record_ms": median_ms(record.to_torch_state_dict, repeats),
        "weights_record_ms": median_ms(lambda: weights_record(model), repeats),
        "load_global_ms": median_ms(lambda: load_global(model, record), repeats),
        "pickle_ms": median_ms(lambda: pickle.loads(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)), repeats),
        "ray_roundtrip_ms": median_ms(lambda: ray.get(echo_actor.echo.remote(msg)), repeats),
    }
    use_out_of_band_arrays()
    row["ray_roundtrip_oob_ms"] = median_ms(lambda: ray.get(oob_echo_actor.echo.remote(msg)), repeats)
    row["raw_record_ms"] = median_ms(lambda: raw_record(state), repeats)
    raw_msg = train_message(raw_record(state), name)
    row["ray_roundtrip_raw_ms"] = median_ms(lambda: ray.get(oob_echo_actor.echo.remote(raw_msg)), repeats)
    row.update(averages(state, repeats))
    return row


def averages(state: dict, repeats: int, replies: int = 10) -> dict:
    """FedAvg of a round's ``replies`` replies of this model (different weights, client-id
    order): Flower's ``aggregate_arrayrecords`` (over raw replies: no decode) against ours
    (``packed_average`` over packed replies, as the backend's come)."""
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from cxrfl_ray.fl.averaging import packed_average

    contents = []
    for i in range(replies):
        weights = unpack(*pack(raw_record({k: v * (1.0 + i / 100) for k, v in state.items()})))
        contents.append(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 30 + i})}))
    flowers = aggregate_arrayrecords(contents, "num-examples")
    ours = packed_average(contents, "num-examples")
    if any(views(ours)[k].tobytes() != flowers[k].numpy().tobytes() for k in flowers):
        raise RuntimeError("packed_average differs from Flower's aggregate_arrayrecords")
    return {"average_flower_ms": median_ms(lambda: aggregate_arrayrecords(contents, "num-examples"), repeats),
            "average_ms": median_ms(lambda: packed_average(contents, "num-examples"), repeats)}


def end_to_end(name: str, rounds: int, runtime: str, raw: bool) -> float:
    """Per-message ms through ``engine.simulate`` (rounds 2..N, one message per round); ``raw``:
    weights as raw arrays (else Flower's npy form through the same backend)."""
    from flwr.serverapp import Grid, ServerApp

    from benchmarks.message_cost import echo_app as importable_echo_app  # by module name, not __main__
    from cxrfl_ray.fl.engine import simulate

    record = ArrayRecord(trainable_state(build(name)))
    times: list[float] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            rounds_of(grid)
        except BaseException as exc:  # Flower's server thread only logs it
            errors.append(exc)
            raise

    def rounds_of(grid: Grid) -> None:
        while not (nodes := list(grid.get_node_ids())):  # nodes register after the ServerApp starts
            time.sleep(0.01)
        node = nodes[0]
        for rnd in range(1, rounds + 1):
            # A new record each round, put again: on the raw path packed in a new buffer, as the
            # round's average comes (fl/averaging.py); on the npy path Flower's form.
            new_global = unpack(*pack(record)) if raw else record_of(dict(record.items()))
            content = RecordDict({"arrays": new_global, "config": ConfigRecord({"model": name})})
            t = time.perf_counter()
            replies = list(grid.send_and_receive([Message(content, node, "train", group_id=str(rnd))], timeout=600))
            times.append(time.perf_counter() - t)
            if len(replies) != 1 or replies[0].has_error():
                raise RuntimeError(f"echo failed in round {rnd}: {replies and replies[0].error}")
            got = views(replies[0].content["arrays"])  # what a strategy reads of a reply (Flower's: .numpy())
            if sum(v.size for v in got.values()) != params:
                raise RuntimeError(f"echo replied {len(got)} arrays of the wrong size in round {rnd}")

    params = sum(v.numel() for v in trainable_state(build(name)).values())
    previous, PooledRayBackend.raw_arrays = PooledRayBackend.raw_arrays, raw
    try:
        simulate(server_app, importable_echo_app, num_nodes=1, client_resources={"num_cpus": 1}, runtime=runtime)
    finally:
        PooledRayBackend.raw_arrays = previous
    if errors:
        raise RuntimeError(f"end-to-end run of {name} failed") from errors[0]
    if len(times) != rounds:
        raise RuntimeError(f"end-to-end run of {name} stopped after {len(times)} of {rounds} rounds")
    return 1000 * statistics.median(times[1:])  # the median: the first puts into a fresh store fault its pages in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds (~2-3 min on 2 cores)")
    args = parser.parse_args()
    repeats, rounds = (5, 6) if args.quick else (15, 16)

    import ray

    from cxrfl_ray.fl.engine import start_ray

    logging.getLogger("flwr").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # the engine's size for a round of one ResNet50 message (2 x (1 + 2) x 94 MB; engine.round_object_store)
        start_ray(num_cpus=2, object_store_memory=600 * 1024**2)

    class Echo:
        def __init__(self, out_of_band: bool) -> None:
            if out_of_band:
                use_out_of_band_arrays()

        def echo(self, msg):
            return msg

    echo_actors = [ray.remote(num_cpus=0.5)(Echo).remote(oob) for oob in (False, True)]
    ray.get([a.echo.remote(None) for a in echo_actors])  # actors up before timing

    results = []
    for name in MODELS:
        row = {"model": name, **components(name, repeats, *echo_actors)}
        row["end_to_end_flower_ms"] = end_to_end(name, rounds, "flower", raw=False)
        row["end_to_end_npy_ms"] = end_to_end(name, rounds, "cxrfl", raw=False)
        row["end_to_end_ms"] = end_to_end(name, rounds, "cxrfl", raw=True)
        row = {k: round(v, 1) if isinstance(v, float) and k.endswith("_ms") else v for k, v in row.items()}
        results.append(row)
        print(row, flush=True)
    for actor in echo_actors:
        ray.kill(actor)

    target = next(r for r in results if r["model"] == TARGET_MODEL)["end_to_end_ms"]
    met = target <= TARGET_MS
    verdict = f"target {TARGET_MODEL} <= {TARGET_MS:.0f} ms per message: {'met' if met else 'missed'} ({target} ms)"
    lines = [f"Medians of {repeats} repeats; end to end over rounds 2..{rounds}, one message per round to one "
             "node (1 CPU actor) with a new global record each round, echo client loading the weights into "
             "torch and replying in the form they came in; Flower runtime = its run_api and grid (0.1 s "
             "polls), ours = doorbells; all with our backend (out-of-band buffers); npy = Flower's np.save "
             "form, raw = raw arrays (the default).", "",
             *table({"model": "model", "params_m": "params (M)", "mb": "MB", "to_record_ms": "to_record ms",
                     "from_record_ms": "from_record ms", "weights_record_ms": "ours: weights_record ms",
                     "load_global_ms": "ours: load_global ms", "pickle_ms": "pickle ms",
                     "ray_roundtrip_ms": "Ray round trip ms", "ray_roundtrip_oob_ms": "Ray round trip ms (out of band)",
                     "raw_record_ms": "raw_record ms", "ray_roundtrip_raw_ms": "Ray round trip ms (raw)",
                     "end_to_end_flower_ms": "end to end ms (Flower runtime, npy)",
                     "end_to_end_npy_ms": "end to end ms (ours, npy)",
                     "end_to_end_ms": "end to end ms (ours, raw)",
                     "average_flower_ms": "FedAvg of 10 replies ms (Flower's)",
                     "average_ms": "FedAvg of 10 replies ms (ours, packed)"}, results),
             "", verdict + "."]
    print(verdict, flush=True)
    report("message_cost" + (" --quick" if args.quick else ""),
           {"results": results, "target_ms": TARGET_MS, "target_met": met}, lines)


if __name__ == "__main__":
    main()
