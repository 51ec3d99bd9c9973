"""Weights as raw arrays through Ray (the default) give the very run Flower's npy form gives:
every metric and the final weights, bit for bit, with SCAFFOLD (whose control variate and
control deltas travel beside the weights, so every kind of record a round moves is covered)."""

from __future__ import annotations

import pytest

from cxrfl_ray.fl.arrays import RawArray, packed
from cxrfl_ray.fl.backend import PooledRayBackend
from cxrfl_ray.fl.engine import run_federated
from cxrfl_ray.fl.rounds import ServerHooks
from tests.fl.messages import run_results
from tests.fl.test_simulate import config


def run_with(raw: bool, cfg, monkeypatch) -> tuple[list[tuple], dict, set]:
    """One run on the raw or the npy path: its metrics (timings left out), final weights, the
    types of the reply arrays the server aggregated and whether each average came out packed
    (``packed_average``, not Flower's)."""
    seen: set = set()
    aggregate = ServerHooks.aggregate

    def recording(self, strategy, server_round, arrays, replies):
        seen.update(type(a) for r in replies for a in r.content["arrays"].values())
        new, metrics = aggregate(self, strategy, server_round, arrays, replies)
        seen.add("packed average" if packed(new) is not None else "flower's average")
        return new, metrics

    with monkeypatch.context() as patch:  # undone after the run: the next run wraps the original
        patch.setattr(ServerHooks, "aggregate", recording)
        patch.setattr(PooledRayBackend, "raw_arrays", raw)
        run = run_federated(cfg, quiet=True)
    return *run_results(run), seen


@pytest.mark.timeout(300)
def test_raw_arrays_give_the_npy_paths_metrics_and_weights_bit_for_bit(phantoms, tmp_path, ray_session, monkeypatch):
    """SCAFFOLD: its replies carry the weights and a control delta, its messages a control variate."""
    data = phantoms(n=120, size=48)
    over = {"fl": {"rounds": 2, "fraction": 0.5, "strategy": {"name": "scaffold"}},
            "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05, "steps": 2, "batch_size": 8}}
    raw_rows, raw_weights, raw_types = run_with(True, config(data, tmp_path / "raw", **over), monkeypatch)
    npy_rows, npy_weights, npy_types = run_with(False, config(data, tmp_path / "npy", **over), monkeypatch)
    from flwr.app import Array

    assert raw_types == {RawArray, "packed average"} and npy_types == {Array, "flower's average"}  # each path ran
    assert raw_rows == npy_rows
    assert len([r for r in raw_rows if r[0] == "client" and r[3] == "train_loss"]) == 4  # 2 rounds x 2 clients trained
    assert raw_weights.keys() == npy_weights.keys() and raw_weights == npy_weights


def test_rays_object_store_is_sized_for_a_rounds_replies(phantoms, tmp_path):
    """Replies stay mapped in the object store until the round is aggregated: a store too small
    for them spills to disk, so the engine sizes the one it starts from the model and cohort."""
    import os

    from cxrfl_ray.fl.engine import SMALL_OBJECT_STORE, default_object_store, round_object_store

    data = phantoms(n=40, size=48)
    tiny = config(data, tmp_path)
    assert SMALL_OBJECT_STORE <= default_object_store() <= 2 * 1024**3
    assert round_object_store(tiny, messages=10) == default_object_store()  # kilobytes of weights: the default
    big = config(data, tmp_path, model={"name": "resnet18"})
    resnet18 = 11_170_000 * 4  # float32 weights, about 44.7 MB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    expected = min(max(2 * 42 * resnet18, default_object_store()), memory // 3)  # 3.75 GB: above the default
    assert abs(round_object_store(big, messages=40) - expected) < 0.01 * expected
    assert round_object_store(big, messages=10_000) == memory // 3  # never more than a third of the machine
