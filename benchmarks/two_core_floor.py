"""The floor's work on two processes: what two cores give this job with no framework at all.

``engine_overhead.floor_run`` trains one client after another on one thread, so two client actors
on two cores could at best halve its round (0.50x), if two trainings at once each ran as fast as
one alone. Whether they do is a property of the machine (memory bandwidth, shared caches, a VM's
page faults), not of any FL engine, so it is measured here in the same run rather than assumed.

Two spawned worker processes of one thread each build the floor's runtime once. Each round the
driver writes the global weights into a shared-memory slot, each worker loads them, trains its
half of the cohort (``fit_client``, the floor's exact call, clients alternating between workers
in selection order) and writes each client's weights into that client's slot; the driver
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

WORKERS = 2


def _layout(state: dict[str, torch.Tensor]) -> tuple[list[tuple[str, torch.dtype, tuple, int]], int]:
    """(name, dtype, shape, byte offset) of every array of one model's state, 64-byte aligned."""
    parts, size = [], 0
    for key, value in state.items():
        parts.append((key, value.dtype, tuple(value.shape), size))
        size += -(-value.numel() * value.element_size() // 64) * 64
    return parts, size


def _views(buffer: memoryview, parts: list, size: int, slot: int) -> dict[str, torch.Tensor]:
    """Tensors over slot ``slot`` of the shared buffer (no copy)."""
    flat = torch.frombuffer(buffer, dtype=torch.uint8, offset=slot * size, count=size)
    return {key: flat[start:start + torch.empty((), dtype=dtype).element_size() * int(np.prod(shape))]
            .view(dtype).view(shape) for key, dtype, shape, start in parts}


def _worker(cfg_yaml: str, shm_name: str, parts: list, size: int, conn) -> None:
    from cxrfl_ray.fl.client import fit_client, runtime, trainable_state
    from cxrfl_ray.fl.memory import keep_freed_memory

    keep_freed_memory()  # as the engine's client actors do
    rt = runtime(cfg_yaml)  # one thread: fl.client_num_cpus
    shm = SharedMemory(name=shm_name)
    try:
        slots: dict[int, dict[str, torch.Tensor]] = {}
        conn.send("ready")
        while (task := conn.recv()) is not None:
            rnd, jobs = task
            glob = slots.setdefault(0, _views(shm.buf, parts, size, 0))
            sizes = []
            for slot, cid in jobs:
                rt.model.load_state_dict(glob, strict=False)
                fit_client(rt, cid, rnd)
                out = slots.setdefault(slot, _views(shm.buf, parts, size, slot))
                for key, value in trainable_state(rt.model).items():
                    out[key].copy_(value)
                sizes.append(len(rt.client_images(cid)))
            conn.send(sizes)
        slots.clear()
    finally:
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
    parts, size = _layout(arrays)
    shm = SharedMemory(create=True, size=size * (cohort + 1))
    context = multiprocessing.get_context("spawn")
    pipes, procs, glob, slots = [], [], None, None
    try:
        for _ in range(WORKERS):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_worker, args=(cfg.to_yaml(), shm.name, parts, size, theirs), daemon=True)
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        glob = _views(shm.buf, parts, size, 0)
        slots = [_views(shm.buf, parts, size, s) for s in range(1, cohort + 1)]
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
                glob[key].copy_(value)
            chosen = list(select_clients(len(prep.plan.clients), cohort, cfg.seed, rnd))
            for w, pipe in enumerate(pipes):
                pipe.send((rnd, [(i + 1, cid) for i, cid in enumerate(chosen) if i % WORKERS == w]))
            replies = [pipe.recv() for pipe in pipes]
            weights = [replies[i % WORKERS][i // WORKERS] for i in range(len(chosen))]
            arrays = fedavg([slots[i] for i in range(len(chosen))], weights)
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
        del glob, slots  # the tensors over the buffer, so that it can be closed
        shm.close()
        shm.unlink()
