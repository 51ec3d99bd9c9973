"""Flower's Bulyan, MultiKrum and q-FedAvg by name, through ``make_strategy`` and our ``Seeded``
mixin: options that cannot fit the round's cohort are refused before Ray, each aggregates
hand-built replies to a value computed by hand here, and Bulyan runs end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from cxrfl_ray.config import ConfigError, build_config
from cxrfl_ray.fl.engine import run_federated
from cxrfl_ray.fl.strategies import make_strategy
from cxrfl_ray.tasks.models import create_model
from cxrfl_ray.tasks.training import seed_everything
from tests.fl.messages import train_reply


def _replies(updates: list[tuple[int, float, list[float]]]) -> list[Message]:
    """Training replies (examples, train loss, weights ``w``) from clients 0, 1, ... in that order."""
    return [train_reply(cid, {"arrays": ArrayRecord({"w": Array(np.asarray(w, np.float32))})},
                        **{"num-examples": n, "train_loss": loss, "steps": 1})
            for cid, (n, loss, w) in enumerate(updates)]


def _strategy(name: str, options: dict, clients: int):
    return make_strategy(name, options, num_clients=clients, per_round=clients, seed=0, client_eval=False)


def test_multikrum_averages_the_m_replies_closest_to_their_neighbours():
    # n = 5, f = 1: each reply's score is its squared distance to its n - f - 2 = 2 nearest others.
    # w = 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 1 = 2; 3: 1 + 4 = 5; 100: 97^2 + 98^2. m = 2 keeps 1 and 2.
    strategy = _strategy("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 2}, 5)
    replies = _replies([(10, 0.5, [0.0]), (10, 0.5, [1.0]), (30, 0.5, [2.0]), (10, 0.5, [3.0]), (50, 0.5, [100.0])])
    arrays, metrics = strategy.aggregate_train(1, list(reversed(replies)))  # arrival order does not matter
    assert arrays["w"].numpy() == pytest.approx([(1.0 * 10 + 2.0 * 30) / 40])  # example-weighted, outlier out
    assert metrics["num-examples"] == 40


def test_bulyan_keeps_n_minus_2f_by_krum_then_averages_the_beta_values_closest_to_their_median():
    # n = 7, f = 1: Krum scores (sum of squared distances to the 4 nearest) keep theta = 5 replies,
    # 0, 1, 2, 3.5, 4 (not 6: 51.25, nor 100); their median is 2; the beta = 3 closest to it are
    # 2, 1, 3.5: mean 6.5 / 3 (unweighted).
    strategy = _strategy("bulyan", {"num_malicious_nodes": 1}, 7)
    values = [0.0, 1.0, 2.0, 3.5, 4.0, 6.0, 100.0]
    arrays, _ = strategy.aggregate_train(1, _replies([(10 + i, 0.5, [v]) for i, v in enumerate(values)]))
    assert arrays["w"].numpy() == pytest.approx([6.5 / 3])


@pytest.fixture()
def server_identity():
    """The ServerApp's task identity, which Flower's messages read (``engine.simulate`` sets it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_qfedavg_weighs_each_update_by_its_loss_to_the_power_q(server_identity):
    # L = 1 / client_learning_rate = 2, q = 1; x = 0. Client 0: y = -1, loss 0.5; client 1: y = -3,
    # loss 2. grad_i = L (x - y_i) = 2, 6; delta_i = loss_i^q grad_i = 1, 12;
    # h_i = q loss_i^(q-1) |grad_i|^2 + L loss_i^q = 4 + 1, 36 + 4; x_new = x - (1 + 12) / (5 + 40).
    strategy = _strategy("qfedavg", {"q": 1.0, "client_learning_rate": 0.5}, 2)

    class Grid:
        def get_node_ids(self):
            return [11, 12]

    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(1, np.float32))}), ConfigRecord({}),
                                             Grid()))
    assert [int(m.content["config"]["cid"]) for m in messages] == [0, 1]
    arrays, _ = strategy.aggregate_train(1, _replies([(10, 0.5, [-1.0]), (10, 2.0, [-3.0])]))
    assert arrays["w"].numpy() == pytest.approx([-13 / 45], rel=1e-6)  # FedAvg: -2; the higher loss counts more


def _config(data, tmp_path, strategy: str, options: dict, clients: int = 3, **fl):
    return build_config({"name": strategy, "out_dir": str(tmp_path), "seed": 2, "task": "classification",
                         "data": {"path": str(data), "size": 32}, "model": {"name": "tiny-conv"},
                         "partition": {"clients": clients}, "train": {"steps": 2, "batch_size": 4, "lr": 0.05},
                         "fl": {"rounds": 1, "round_timeout": 120, "strategy": {"name": strategy, "options": options},
                                **fl},
                         "tracking": {"wandb": "disabled"}})


@pytest.mark.parametrize("strategy, options, fl, message", [
    ("bulyan", {"num_malicious_nodes": 1}, {"min_replies": 4},
     r"^fl.strategy.options.num_malicious_nodes 1: bulyan needs at least 7 replies per round \(4 \* "
     r"num_malicious_nodes \+ 3\), but 4 clients train per round"),
    ("bulyan", {}, {}, r"^fl.min_replies 1: bulyan does not aggregate a round with fewer than 3 replies .* set "
                       r"fl.min_replies to 3 or more$"),
    ("multikrum", {"num_malicious_nodes": 1}, {}, r"^fl.strategy.options.num_malicious_nodes 1: multikrum needs at "
                                                  r"least 5 replies per round \(2 \* num_malicious_nodes \+ 3\)"),
    ("multikrum", {"num_nodes_to_select": 5}, {}, r"^fl.strategy.options.num_nodes_to_select 5: multikrum averages "
                                                  r"1 to 4 replies"),
    ("multikrum", {"num_malicious_nodes": 0.5}, {}, r"num_malicious_nodes for multikrum must be a whole number"),
    ("qfedavg", {"q": 0.2}, {}, r"^fl.strategy.options.client_learning_rate for qfedavg must be a number > 0, the "
                                r"clients' train.lr \(missing\)$"),
    ("qfedavg", {"q": -1.0, "client_learning_rate": 0.1}, {}, r"^fl.strategy.options.q for qfedavg must be a number"),
])
def test_options_that_do_not_fit_the_cohort_stop_before_ray_starts(phantoms, tmp_path, monkeypatch, strategy, options,
                                                                     fl, message):
    def no_ray(cfg, **_):
        raise AssertionError("Ray was started for an invalid run")

    monkeypatch.setattr("cxrfl_ray.fl.engine.ensure_ray", no_ray)
    with pytest.raises(ConfigError, match=message):
        run_federated(_config(phantoms(n=120, size=32), tmp_path, strategy, options, clients=4, **fl))
    assert not list(tmp_path.glob(f"{strategy}-fl-*"))


@pytest.mark.timeout(300)
def test_bulyan_runs_in_the_engine_and_aggregates_every_round(phantoms, tmp_path, ray_session):
    run = run_federated(_config(phantoms(n=120, size=32), tmp_path, "bulyan", {"num_malicious_nodes": 0},
                                min_replies=3), quiet=True)
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    server = {r["metric"]: r["value"] for r in rows if (r["scope"], r["round"]) == ("round", 1)}
    assert server["replied"] == 3 and server["failures"] == 0
    assert "train_loss" in server  # Bulyan aggregated (a skipped round has no aggregated metrics)
    seed_everything(2)  # the server's round-0 model
    final = load_file(str(run / "last.safetensors"))
    start = create_model("tiny-conv", "classification", 1, final["head.weight"].shape[0]).state_dict()
    assert all(torch.isfinite(v).all() and not torch.allclose(v, start[k]) for k, v in final.items())
