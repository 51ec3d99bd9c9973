"""Our Flower backend on a real Ray: pool sizing from the caller's placement group or the
cluster, and Ray left running."""

from __future__ import annotations

import pytest

from cxrfl_ray.fl.backend import PooledRayBackend, slots_in_bundles


def test_slots_count_each_bundle_on_its_own():
    half = {"num_cpus": 0.5, "num_gpus": 0.0}
    assert slots_in_bundles([{"CPU": 1.0}, {"CPU": 0.75}], half) == 3
    quarter_gpu = {"num_cpus": 1, "num_gpus": 0.25}
    assert slots_in_bundles([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}], quarter_gpu) == 4 + 2
    assert slots_in_bundles([{"CPU": 8.0}], quarter_gpu) == 0  # no GPU, no GPU client


@pytest.mark.timeout(120)
def test_pool_is_sized_from_the_placement_group_it_runs_in(ray_session):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cxrfl_ray.fl.backend import release_idle_actors

    release_idle_actors()  # actors kept by an earlier simulation would hold the CPUs the group needs

    # The cluster has 2 CPUs; outside a group the pool is capped by the cluster and the cohort.
    assert PooledRayBackend({"num_cpus": 1}, max_actors=8).size == 2
    assert PooledRayBackend({"num_cpus": 1}, max_actors=1).size == 1
    with pytest.raises(ValueError, match="no client fits in the Ray cluster"):
        PooledRayBackend({"num_cpus": 4}, max_actors=2)

    # A trial's group: bundle 0 for its driver, then two 0.25-CPU client bundles.
    group = placement_group([{"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.25}])
    ray.get(group.ready(), timeout=30)

    @ray.remote(num_cpus=0.25)
    def pool_size(cpus, cohort=8):
        try:
            return PooledRayBackend({"num_cpus": cpus}, max_actors=cohort).size
        except ValueError as exc:
            return str(exc)

    in_group = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    try:
        assert ray.get(pool_size.options(scheduling_strategy=in_group).remote(0.25), timeout=60) == 2
        # A cohort of 1 still gets an actor per reserved bundle: the next trial in this Tune worker
        # may have a cohort of 2 and then finds both warm.
        assert ray.get(pool_size.options(scheduling_strategy=in_group).remote(0.25, 1), timeout=60) == 2
        assert "placement group's bundles" in ray.get(pool_size.options(scheduling_strategy=in_group).remote(0.5), timeout=60)
    finally:
        remove_placement_group(group)
    assert ray.is_initialized()


@pytest.mark.timeout(120)
def test_idle_actors_are_reused_then_released(ray_session, monkeypatch):
    from cxrfl_ray.fl import backend as backend_module

    ray = ray_session
    backend_module.release_idle_actors()
    monkeypatch.setattr(backend_module, "KEEP_IDLE_S", 1.0)
    first = PooledRayBackend({"num_cpus": 1}, max_actors=2)
    first.build(lambda: None)
    actors = list(first.idle)
    # each actor process keeps the memory it frees (fl/memory.py), set as it started
    assert ray.get([a.__ray_call__.remote(lambda _: __import__("cxrfl_ray.fl.memory").fl.memory._applied)
                    for a in actors], timeout=60) == [True, True]
    first.terminate()
    second = PooledRayBackend({"num_cpus": 1}, max_actors=2)
    second.build(lambda: None)  # within the keep window: the same actors, no new processes
    assert {id(a) for a in second.idle} == {id(a) for a in actors}
    second.terminate()
    import time

    deadline = time.monotonic() + 30  # the keep window (1 s) ends: the kept actors go, their CPUs free again
    while any(backend_module._IDLE.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(backend_module._IDLE.values())
    for actor in actors:  # Ray carries out a kill asynchronously: each must be gone by the deadline
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a kept actor outlived its keep window"
            time.sleep(0.2)
    while ray.available_resources().get("CPU", 0) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # Ray's resource view follows the actors' deaths
    assert ray.available_resources().get("CPU", 0) == 2


def test_round_weights_are_put_once_as_raw_arrays_and_come_back_mapped_read_only(ray_session):
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    from cxrfl_ray.fl.arrays import RawArray, view
    from cxrfl_ray.fl.backend import SharedArrays, use_out_of_band_arrays

    ray = ray_session
    use_out_of_band_arrays()
    record = ArrayRecord({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)})
    shared = SharedArrays()
    first = shared.ref(record)
    assert shared.ref(record) is first  # every message of a round: one put
    copy = ray.get(first)
    assert list(copy) == ["w", "b"] and all(isinstance(copy[k], RawArray) for k in copy)
    for key in record:  # the same values, read where Ray's object store holds them
        got = view(copy[key])
        assert np.array_equal(got, view(record[key])) and got.dtype == view(record[key]).dtype
        assert not got.flags.writeable and not got.flags.owndata
    assert torch.equal(torch.from_numpy(copy["w"].numpy().copy()), torch.arange(12.0).reshape(3, 4))
    record["b"] = Array(torch.zeros(5, dtype=torch.int64))  # changed in place: put again
    assert shared.ref(record) is not first

    npy = ray.get(SharedArrays(raw=False).ref(record))  # the former path: Flower's np.save bytes as they were
    assert all(type(npy[k]) is Array and npy[k].data == record[k].data for k in record)


def test_weights_record_has_np_save_bytes_and_loads_back_exactly():
    """The client's fast encoding is byte-identical to Flower's ``ArrayRecord(state_dict)`` and
    ``load_global`` restores every value, for float, integer and non-contiguous tensors."""
    import torch
    from flwr.app import ArrayRecord

    from cxrfl_ray.fl.client import load_global, trainable_state, weights_record
    from cxrfl_ray.tasks.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny-conv-seg", "segmentation", 1, 1, norm="batch")
    model.register_buffer("counts", torch.arange(6, dtype=torch.int64).reshape(2, 3).t())  # not contiguous
    fast, stock = weights_record(model), ArrayRecord(trainable_state(model))
    assert list(fast) == list(stock) and "counts" in fast
    assert all(fast[k].data == stock[k].data and fast[k].shape == stock[k].shape for k in stock if k != "counts")
    assert torch.equal(torch.from_numpy(fast["counts"].numpy()), model.counts)
    other = create_model("tiny-conv-seg", "segmentation", 1, 1, norm="batch")
    other.register_buffer("counts", torch.zeros(3, 2, dtype=torch.int64))
    load_global(other, fast)
    for key, value in trainable_state(model).items():
        assert torch.equal(trainable_state(other)[key], value), key
