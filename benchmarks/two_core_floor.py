"""The floor's work on two processes: what two cores give this job with no framework at all.

``engine_overhead.floor_run`` trains one client after another on one thread, so two client actors
on two cores could at best halve its round (0.50x), if two trainings at once each ran as fast as
one alone. Whether they do is a property of the machine (memory bandwidth, shared caches, a VM's
page faults), not of any FL engine, so it is measured here in the same run rather than assumed.

Two spawned worker processes of one thread each build the floor's runtime once. Each round the
driver writes the global weights into a shared-memory slot, each worker loads them, trains its
half of the cohort (``fit_client``, the floor's exact call, clients alternating between workers
in selection order) and writes each client's weights into that client's slot (``fl.arrays.layout``'s layout); the driver
averages the slots in selection order with the floor's ``fedavg`` and evaluates every view on all
cores while the workers wait (the strict order: no round sent ahead). The shared buffers are
allocated once and reused, so no message is encoded, pickled or copied beyond the one copy into
and out of the model, and the final weights are the floor's bit for bit (``hash``).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from benchmarks._common import keeps_torch_threads
from cxrfl_ray.fl.arrays import Index, layout, nbytes

WORKERS = 2


def _slots(buffer: memoryview, index: Index, size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Writable tensors over each of the buffer's ``count`` slots of ``size`` bytes, laid out as
    ``index`` says (no copy); slot 0 holds the global weights, slot k the k-th client's reply."""
    flat = np.frombuffer(buffer, dtype=np.uint8)
    slots = []
    for slot in range(count):
        part = flat[slot * size:(slot + 1) * size]
        slots.append({key: torch.from_numpy(part[start:start + nbytes(dtype, shape)].view(dtype).reshape(shape))
                      for key, dtype, shape, start in index})
    return slots


def _worker(cfg_yaml: str, shm_name: str, index: Index, size: int, count: int, conn) -> None:
    from cxrfl_ray.fl.client import fit_client, runtime, trainable_state
    from cxrfl_ray.fl.memory import keep_freed_memory

    keep_freed_memory()  # as the engine's client actors do
    rt = runtime(cfg_yaml)  # one thread: fl.client_num_cpus
    shm = SharedMemory(name=shm_name)
    slots = _slots(shm.buf, index, size, count)
    try:
        conn.send("ready")
        while (task := conn.recv()) is not None:
            rnd, jobs = task
            sizes = []
            for slot, cid in jobs:
                rt.model.load_state_dict(slots[0], strict=False)
                fit_client(rt, cid, rnd)
                for key, value in trainable_state(rt.model).items():
                    slots[slot][key].copy_(value)
                sizes.append(len(rt.client_images(cid)))
            conn.send(sizes)
    finally:
        del slots  # the tensors over the buffer, so that it can be closed
        shm.close()


@keeps_torch_threads
def two_core_floor_run(cfg) -> dict:
    """The floor's rounds with the cohort's fits on ``WORKERS`` one-thread processes: set-up,
    total and per-round seconds, the last round's results of every view, the final weights' hash
    (the keys of ``floor_run``'s answer)."""
    from benchmarks.engine_overhead import fedavg, weights_hash
    from cxrfl_ray.experiment import evaluate_views
    from cxrfl_ray.fl.client import runtime, trainable_state
    from cxrfl_ray.fl.strategies import select_clients
    from cxrfl_ray.tasks.models import create_model
    from cxrfl_ray.tasks.training import seed_everything

    start = time.perf_counter()
    cohort = cfg.clients_per_round
    rt = runtime(cfg.to_yaml())
    prep = rt.prep
    seed_everything(cfg.seed)
    server = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes, norm=cfg.model.norm)
    arrays = trainable_state(server)
    index, size = layout((key, str(value.detach().numpy().dtype), tuple(value.shape)) for key, value in arrays.items())
    shm = SharedMemory(create=True, size=size * (cohort + 1))
    slots = _slots(shm.buf, index, size, cohort + 1)
    context = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    try:
        for _ in range(WORKERS):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_worker, args=(cfg.to_yaml(), shm.name, index, size, cohort + 1, theirs),
                                   daemon=True)
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        torch.set_num_threads(os.cpu_count() or WORKERS)  # the driver evaluates while the workers wait
        evaluate_views(prep, server, rt.device, rt.loss_fn, list(prep.views))
        for pipe, proc in zip(pipes, procs):
            try:
                pipe.recv()
            except EOFError:
                raise RuntimeError(f"a two-core floor worker exited before it was ready (exit code "
                                   f"{proc.exitcode}); see its traceback above") from None
        setup = time.perf_counter() - start
        rounds = []
        for rnd in range(1, cfg.fl.rounds + 1):
            t = time.perf_counter()
            for key, value in arrays.items():
                slots[0][key].copy_(value)
            chosen = list(select_clients(len(prep.plan.clients), cohort, cfg.seed, rnd))
            for w, pipe in enumerate(pipes):
                pipe.send((rnd, [(i + 1, cid) for i, cid in enumerate(chosen) if i % WORKERS == w]))
            replies = [pipe.recv() for pipe in pipes]
            weights = [replies[i % WORKERS][i // WORKERS] for i in range(len(chosen))]
            arrays = fedavg(slots[1:len(chosen) + 1], weights)
            server.load_state_dict(arrays, strict=False)
            results = evaluate_views(prep, server, rt.device, rt.loss_fn, list(prep.views))
            rounds.append(time.perf_counter() - t)
        return {"setup_s": setup, "total_s": time.perf_counter() - start, "rounds_s": rounds, "results": results,
                "main": prep.task.main_metric, "hash": weights_hash(arrays)}
    finally:
        for pipe in pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        del slots  # the tensors over the buffer, so that it can be closed
        shm.close()
        shm.unlink()
