"""Round r+1 goes out before the server evaluates round r (``fl/overlap.py``): the run is the
one the strict order gives, metric for metric and weight for weight; the events come in the
overlapped order; the overlapped evaluations leave the clients' cores; an error in building the
next round comes only after the round before is saved."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cxrfl_ray.fl.engine import run_federated
from cxrfl_ray.fl.state import saved_round
from tests.fl.messages import run_results
from tests.fl.test_simulate import config


def run_recorded(cfg, monkeypatch) -> tuple[list[tuple], dict, dict, list[tuple]]:
    """The run's metrics (timings left out), final round-state weights, last checkpoint, and
    its events in order: ``("send", round, pushed)`` and ``("evaluate", torch threads)``."""
    import cxrfl_ray.fl.overlap as overlap
    import cxrfl_ray.fl.server as server

    events: list[tuple] = []
    send, evaluate = overlap.send_round, server.evaluate_views

    def sending(strategy, grid, server_round, *args, push=False, **kwargs):
        events.append(("send", server_round, push))
        return send(strategy, grid, server_round, *args, push=push, **kwargs)

    def evaluating(*args, **kwargs):
        events.append(("evaluate", torch.get_num_threads()))
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(overlap, "send_round", sending)
        patch.setattr(server, "evaluate_views", evaluating)
        run = run_federated(cfg, quiet=True)
    last = {k: v.numpy().tobytes() for k, v in load_file(str(run / "last.safetensors")).items()}
    return *run_results(run), last, events


@pytest.fixture
def two_threads():
    """The driver's torch threads at 2 (then as they were), so sharing the cores shows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(300)
def test_sending_ahead_gives_the_strict_orders_run_and_leaves_the_clients_cores(phantoms, tmp_path, ray_session,
                                                                               monkeypatch, two_threads):
    data = phantoms(n=120, size=48)
    ahead = run_recorded(config(data, tmp_path / "ahead"), monkeypatch)
    strict = run_recorded(config(data, tmp_path / "strict", fl={"overlap_evaluation": False}), monkeypatch)

    # Two 1-CPU client actors (2 of 4 clients a round) hold both of Ray's 2 CPUs: an evaluation
    # while a round is out runs on 1 thread, the last one (nothing out) on the driver's 2.
    assert ahead[3] == [("send", 1, True), ("evaluate", 1), ("send", 2, True), ("evaluate", 1),
                        ("send", 3, True), ("evaluate", 1), ("evaluate", 2)]
    assert strict[3] == [("evaluate", 2), ("send", 1, False), ("evaluate", 2), ("send", 2, False),
                         ("evaluate", 2), ("send", 3, False), ("evaluate", 2)]
    assert len([r for r in ahead[0] if r[0] == "client" and r[3] == "train_loss"]) == 6  # 3 rounds x 2 clients
    assert ahead[0] == strict[0]  # every metric, central and client, every round
    assert ahead[1].keys() == strict[1].keys() and ahead[1] == strict[1]
    assert ahead[2] == strict[2]


@pytest.mark.timeout(300)
def test_an_error_building_the_next_round_comes_after_the_round_before_is_saved(phantoms, tmp_path, ray_session,
                                                                               monkeypatch):
    """Round 2 is built (and fails) before round 1 is evaluated; the run still evaluates and
    saves round 1 first, as the strict order does, so ``--resume`` starts after round 1."""
    from cxrfl_ray.fl.algorithms.base import Algorithm

    records = Algorithm.message_records

    def failing(self, server_round, arrays):
        if server_round == 2:
            raise ValueError("injected: round 2 cannot be built")
        return records(self, server_round, arrays)

    monkeypatch.setattr(Algorithm, "message_records", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="^injected: round 2 cannot be built$"):
        run_federated(config(phantoms(n=80, size=48), tmp_path), quiet=True, run_dir=run_dir)
    assert saved_round(run_dir) == 1
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert sorted({r["round"] for r in rows if r["scope"] == "central"}) == [0, 1]
