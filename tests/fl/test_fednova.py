"""FedNova on the algorithm seam: replies normalised by their local steps, then Flower's FedAvg.
The math at the function level (hand-built replies, no Ray), then one tiny engine run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from safetensors.torch import load_file

from cxrfl_ray.config import build_config
from cxrfl_ray.fl.algorithms import make_algorithm
from cxrfl_ray.fl.algorithms.fednova import normaliser, normalise_replies
from cxrfl_ray.fl.strategies import make_strategy
from cxrfl_ray.tasks.models import create_model
from cxrfl_ray.tasks.training import seed_everything
from tests.fl.messages import train_reply


def _cfg(optimizer: str = "sgd", momentum: float = 0.0, model: str = "tiny-conv"):
    return build_config({"task": "classification", "model": {"name": model},
                         "train": {"optimizer": optimizer, "momentum": momentum},
                         "fl": {"strategy": {"name": "fednova"}}})


def _record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in weights.items()})


def _replies(updates: list[tuple[int, int, dict[str, np.ndarray]]]) -> list[Message]:
    """Training replies (client id, examples, local steps, weights) as the ClientApp sends them."""
    return [train_reply(cid, {"arrays": _record(w)}, **{"num-examples": n, "steps": steps, "train_loss": 0.5})
            for cid, (n, steps, w) in enumerate(updates)]


def _aggregate(name: str, cfg, x: dict[str, np.ndarray], updates) -> dict[str, np.ndarray]:
    strategy = make_strategy(name, {}, num_clients=len(updates), per_round=len(updates), seed=0, client_eval=False)
    arrays = _record(x)
    new, metrics = make_algorithm(cfg.model_copy(update={"fl": cfg.fl.model_copy(update={
        "strategy": cfg.fl.strategy.model_copy(update={"name": name})})})).aggregate(strategy, 1, arrays, _replies(updates))
    assert metrics is not None
    return {k: v.numpy() for k, v in new.items()}


def test_with_equal_local_steps_fednova_is_fedavg():
    rng = np.random.default_rng(0)
    x = {"conv.weight": rng.normal(size=(8, 1, 3, 3)), "head.bias": rng.normal(size=3)}
    updates = [(n, 5, {k: v + rng.normal(size=v.shape) for k, v in x.items()}) for n in (30, 10, 17)]
    cfg = _cfg("sgd", momentum=0.9)
    nova, avg = _aggregate("fednova", cfg, x, updates), _aggregate("fedavg", cfg, x, updates)
    for key in x:
        assert np.allclose(nova[key], avg[key], rtol=0, atol=1e-6)
        assert not np.allclose(avg[key], x[key], atol=1e-3)  # the replies really moved the weights


def test_the_client_with_more_steps_gets_less_weight_than_under_fedavg():
    # Client 0: 30 examples, 1 step, moves along e1; client 1: 10 examples, 4 steps of the same
    # size along e2. p = (0.75, 0.25).
    x = {"w": np.zeros(2)}
    updates = [(30, 1, {"w": np.array([-1.0, 0.0])}), (10, 4, {"w": np.array([0.0, -4.0])})]
    cfg = _cfg("sgd", momentum=0.0)
    avg = _aggregate("fedavg", cfg, x, updates)["w"]
    nova = _aggregate("fednova", cfg, x, updates)["w"]
    assert np.allclose(avg, [-0.75, -1.0])  # FedAvg: 0.75 e1 + 0.25 * 4 e2, client 1 dominates
    # FedNova: d = (e1, 4 e2 / 4) = (e1, e2); tau_eff = 0.75 * 1 + 0.25 * 4 = 1.75;
    # x_new = -1.75 * (0.75 e1 + 0.25 e2)
    assert np.allclose(nova, [-1.3125, -0.4375], atol=1e-6)
    share = lambda w: w[1] / w.sum()  # noqa: E731 - client 1's share of the step
    assert share(nova) == pytest.approx(0.25) and share(avg) == pytest.approx(1 / 1.75)


def test_sgd_momentum_normaliser_counts_the_gradients_pytorchs_momentum_adds_up():
    cfg = _cfg("sgd", momentum=0.9)
    for steps in (1, 4, 13):
        w = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            (2.0 * w).sum().backward()  # a constant gradient of 2
            opt.step()
        moved = -float(w) / (0.1 * 2.0)  # how many gradients the update adds up
        assert normaliser(steps, cfg.train) == pytest.approx(moved, rel=1e-5)
    assert normaliser(4, cfg.train) == pytest.approx((4 - 0.9 * (1 - 0.9**4) / 0.1) / 0.1)  # 9.049
    assert normaliser(4, _cfg("sgd", momentum=0.0).train) == 4.0
    assert normaliser(4, _cfg("adam", momentum=0.9).train) == 4.0  # momentum is SGD's only; Adam: a = tau


def test_momentum_normalisers_weigh_the_clients_by_their_gradient_counts():
    x = {"w": np.zeros(2)}
    updates = [(10, 1, {"w": np.array([-1.0, 0.0])}), (10, 4, {"w": np.array([0.0, -9.049])})]
    nova = _aggregate("fednova", _cfg("sgd", momentum=0.9), x, updates)["w"]
    # a = (1, 9.049): d = (e1, e2 (9.049 / 9.049)), tau_eff = (1 + 9.049) / 2
    tau_eff = (1 + 9.049) / 2
    assert np.allclose(nova, [-tau_eff / 2, -tau_eff / 2], atol=1e-5)


def test_batchnorm_statistics_are_averaged_as_in_fedavg():
    rng = np.random.default_rng(1)
    x = {"bn1.running_mean": rng.normal(size=4), "w": rng.normal(size=4)}
    updates = [(30, 1, {k: v + rng.normal(size=4) for k, v in x.items()}),
               (10, 4, {k: v + rng.normal(size=4) for k, v in x.items()})]
    cfg = _cfg("sgd", model="resnet18")  # a model whose buffers include bn1.running_mean
    nova, avg = _aggregate("fednova", cfg, x, updates), _aggregate("fedavg", cfg, x, updates)
    assert np.allclose(nova["bn1.running_mean"], avg["bn1.running_mean"], rtol=0, atol=1e-7)
    assert np.allclose(nova["bn1.running_mean"], 0.75 * updates[0][2]["bn1.running_mean"]
                       + 0.25 * updates[1][2]["bn1.running_mean"], atol=1e-6)
    assert not np.allclose(nova["w"], avg["w"], atol=1e-3)  # the parameters are normalised


def test_a_client_without_steps_adds_no_update():
    arrays = _record({"w": np.ones(2)})
    replies = _replies([(10, 0, {"w": np.ones(2)}), (10, 2, {"w": np.array([0.0, 1.0])})])
    assert normalise_replies(arrays, replies, [0.0, 2.0], "num-examples") == 1.0  # tau_eff = (0 + 2) / 2
    assert np.array_equal(replies[0].content["arrays"]["w"].numpy(), [1.0, 1.0])
    assert np.allclose(replies[1].content["arrays"]["w"].numpy(), [0.5, 1.0])  # 1 - (1 / 2)(1 - 0)


@pytest.mark.timeout(300)
def test_an_engine_run_with_unequal_clients_trains_and_differs_from_fedavg(phantoms, tmp_path, ray_session):
    from cxrfl_ray.fl.engine import run_federated

    data = phantoms(n=120, size=32)

    def run(strategy: str):
        cfg = build_config({"name": strategy, "out_dir": str(tmp_path / strategy), "seed": 5, "task": "classification",
                            "data": {"path": str(data), "size": 32}, "model": {"name": "tiny-conv"},
                            "partition": {"clients": 2, "scheme": "quantity", "power": 2.0},
                            "train": {"optimizer": "sgd", "momentum": 0.5, "lr": 0.05, "batch_size": 4},
                            "fl": {"rounds": 2, "round_timeout": 120, "strategy": {"name": strategy}},
                            "tracking": {"wandb": "disabled"}})
        folder = run_federated(cfg, quiet=True)
        return folder, load_file(str(folder / "last.safetensors"))

    nova_run, nova = run("fednova")
    _, avg = run("fedavg")
    rows = pq.read_table(nova_run / "metrics.parquet").to_pylist()
    steps = {int(r["id"]): r["value"] for r in rows if r["scope"] == "client" and r["round"] == 1 and r["metric"] == "steps"}
    assert len(steps) == 2 and steps[0] != steps[1]  # full passes over unequal clients: unequal local work
    seed_everything(5)  # the server's round-0 model
    start = create_model("tiny-conv", "classification", 1, nova["head.weight"].shape[0]).state_dict()
    assert all(torch.isfinite(v).all() for v in nova.values())
    assert all(not torch.allclose(nova[k], start[k]) for k in start)  # it trained
    assert any(not torch.allclose(nova[k], avg[k], atol=1e-6) for k in nova)
