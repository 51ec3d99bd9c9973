"""SCAFFOLD (option II) on the algorithm seam: the control-variate math by hand on a 2-client
linear problem (no Ray), then on the real engine: client state files, c_i coming back to its
client, and an exact --resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxrfl_ray.config import ConfigError, build_config
from cxrfl_ray.fl.algorithms import ClientRound, make_algorithm
from cxrfl_ray.fl.algorithms.scaffold import C_KEY, DELTA_KEY
from cxrfl_ray.fl.arrays import npy_record
from cxrfl_ray.fl.client import weights_record
from cxrfl_ray.fl.client_state import ClientStateStore
from cxrfl_ray.fl.strategies import make_strategy, select_clients
from cxrfl_ray.tasks.training import train_local
from tests.fl.messages import stopped_after_round_1, train_reply


def scaffold_config(**options):
    return build_config({"partition": {"clients": 3}, "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.1},
                         "fl": {"strategy": {"name": "scaffold", "options": options}}})


def reply(cid: int, examples: int, content: dict) -> Message:
    return train_reply(cid, content, **{"num-examples": examples, "train_loss": 0.5})


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_control_variates_follow_the_papers_option_ii_update_by_hand(tmp_path, server_lr):
    """Round 2 of a 3-client plan; clients 0 and 1 train (|S|/N = 2/3). Loss (w.x + b - y)^2,
    global x = 0, two SGD steps at lr 0.1 then 0.05 (a schedule: the sum of the rates used, 0.15,
    divides x - y_i, not K * lr). c = ([0.5, -0.5], 0.2); client 0 has c_0 = ([0.1, 0.1], 0) from
    round 1, client 1 none yet (zeros)."""
    cfg = scaffold_config(server_lr=server_lr)
    server = make_algorithm(cfg)
    assert server.message_records(1, ArrayRecord({})) == {}  # c = 0 at the start: nothing to send
    server.restore({"c/weight": t([0.5, -0.5]).numpy(), "c/bias": t(0.2).reshape(1).numpy()})
    ClientStateStore(tmp_path, 0).save(1, {"weight": t([0.1, 0.1]), "bias": t(0.0).reshape(1)}, keep_from=0)
    records = server.message_records(2, ArrayRecord({}))
    data = {0: (t([1.0, 0.0]), t([1.0])), 1: (t([0.0, 2.0]), t([-1.0]))}
    examples = {0: 1, 1: 3}

    grads, replies, models = {}, [], {}
    for cid in (0, 1):
        model = nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        model.register_buffer("running", torch.full((1,), 1.0 + 2 * cid))  # a buffer: averaged, no control variate
        global_arrays = weights_record(model)
        content = RecordDict({"arrays": global_arrays, "config": ConfigRecord({}), **records})
        work = server.local(ClientRound(cid, 2, model, cfg, content, ClientStateStore(tmp_path, cid),
                                        state_round=1 if cid == 0 else 0))
        work.begin()
        seen, step = [], work.before_step

        def recording(model, optimizer, step=step, seen=seen):
            step(model, optimizer)
            seen.append((model.weight.grad.flatten().tolist(), model.bias.grad.item(), optimizer.param_groups[0]["lr"]))

        work.before_step = recording
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data[cid]
        loader = DataLoader(TensorDataset(x.repeat(2, 1), y.repeat(2, 1)), batch_size=1)  # the same batch twice
        train_local(model, loader, nn.MSELoss(), optimizer, torch.device("cpu"), hooks=work,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: [1.0, 0.5, 0.5][s]))
        grads[cid], models[cid] = seen, model
        extra = work.finish({})
        assert list(extra) == [DELTA_KEY]
        replies.append(reply(cid, examples[cid], {"arrays": weights_record(model), **extra}))

    # Client 0: step 1 at w = 0: residual -1, raw grad (2 * -1 * [1, 0], -2); corrected by c - c_0 = ([0.4, -0.6], 0.2).
    # w = 0.1 * [1.6, 0.6] = [0.16, 0.06], b = 0.18; step 2: residual 0.16 + 0.18 - 1 = -0.66, raw (-1.32, 0), -1.32.
    g0 = [([-2 + 0.4, 0 - 0.6], -2 + 0.2, 0.1), ([-1.32 + 0.4, 0 - 0.6], -1.32 + 0.2, 0.05)]
    # Client 1 (c_1 = 0, correction = c): step 1 residual +1, raw ([0, 4], 2); w = -0.1 * [0.5, 3.5] = [-0.05, -0.35],
    # b = -0.22; step 2: residual -0.35 * 2 - 0.22 + 1 = 0.08, raw ([0, 0.32], 0.16).
    g1 = [([0.5, 4 - 0.5], 2 + 0.2, 0.1), ([0.5, 0.32 - 0.5], 0.16 + 0.2, 0.05)]
    for cid, expected in ((0, g0), (1, g1)):
        for (gw, gb, lr), (ew, eb, elr) in zip(grads[cid], expected, strict=True):
            assert gw == pytest.approx(ew, abs=1e-6) and gb == pytest.approx(eb, abs=1e-6) and lr == pytest.approx(elr)
    y0 = ([0.16 + 0.05 * 0.92, 0.06 + 0.05 * 0.6], 0.18 + 0.05 * 1.12)  # [0.206, 0.09], 0.236
    y1 = ([-0.05 - 0.05 * 0.5, -0.35 + 0.05 * 0.18], -0.22 - 0.05 * 0.36)  # [-0.075, -0.341], -0.238
    for cid, (w, b) in ((0, y0), (1, y1)):
        assert torch.allclose(models[cid].weight, t(w), atol=1e-6) and torch.allclose(models[cid].bias, t(b), atol=1e-6)

    # Option II: c_i+ = c_i - c + (x - y_i) / 0.15.
    c0 = ([0.1 - 0.5 + (0 - y0[0][0]) / 0.15, 0.1 + 0.5 + (0 - y0[0][1]) / 0.15], 0.0 - 0.2 + (0 - y0[1]) / 0.15)
    c1 = ([0.0 - 0.5 + (0 - y1[0][0]) / 0.15, 0.0 + 0.5 + (0 - y1[0][1]) / 0.15], 0.0 - 0.2 + (0 - y1[1]) / 0.15)
    # ... which for plain SGD is the rate-weighted mean of the raw gradients each client saw.
    assert c0[0][0] == pytest.approx((0.1 * -2 + 0.05 * -1.32) / 0.15) and c0[0][1] == pytest.approx(0.0, abs=1e-12)
    assert c1[0][1] == pytest.approx((0.1 * 4 + 0.05 * 0.32) / 0.15) and c1[1] == pytest.approx((0.1 * 2 + 0.05 * 0.16) / 0.15)
    delta = {0: ([c0[0][0] - 0.1, c0[0][1] - 0.1], c0[1] - 0.0), 1: (c1[0], c1[1])}
    for cid, (cw, cb) in ((0, c0), (1, c1)):
        saved = load_file(str(ClientStateStore(tmp_path, cid).path(2)))  # the state the client keeps
        assert torch.allclose(saved["weight"], t(cw), atol=1e-5) and torch.allclose(saved["bias"], t(cb), atol=1e-5)
        sent = replies[cid].content[DELTA_KEY].to_torch_state_dict()
        assert torch.allclose(sent["weight"], t(delta[cid][0]), atol=1e-5)
        assert torch.allclose(sent["bias"], t(delta[cid][1]), atol=1e-5)
    assert ClientStateStore(tmp_path, 0).path(1).is_file()  # the accepted round-1 state stays until round 2 is accepted

    strategy = make_strategy("scaffold", {"server_lr": server_lr}, num_clients=3, per_round=2, seed=0, client_eval=False)
    start = npy_record({"weight": t([0.0, 0.0]), "bias": t(0.0).reshape(1), "running": t(10.0)})
    new, metrics = server.aggregate(strategy, 2, start, replies)
    assert all(DELTA_KEY not in r.content for r in replies)  # popped before Flower's FedAvg
    # x <- x + eta_g * (FedAvg by examples (1 and 3) - x); the buffer is plainly averaged.
    avg_w = [(1 * y0[0][j] + 3 * y1[0][j]) / 4 for j in range(2)]
    avg_b = (1 * y0[1] + 3 * y1[1]) / 4
    got = new.to_torch_state_dict()
    assert torch.allclose(got["weight"], server_lr * t(avg_w), atol=1e-6)
    assert torch.allclose(got["bias"], server_lr * t(avg_b), atol=1e-6)
    assert torch.allclose(got["running"], t((1 * 1.0 + 3 * 3.0) / 4))
    # c <- c + (|S| / N) * mean(delta c_i) = c + (delta_0 + delta_1) / 3.
    c_new = ([0.5 + (delta[0][0][0] + delta[1][0][0]) / 3, -0.5 + (delta[0][0][1] + delta[1][0][1]) / 3],
             0.2 + (delta[0][1] + delta[1][1]) / 3)
    sent = server.message_records(3, new)[C_KEY].to_torch_state_dict()  # what round 3's clients get
    assert torch.allclose(sent["weight"], t(c_new[0]), atol=1e-5) and torch.allclose(sent["bias"], t(c_new[1]), atol=1e-5)
    assert set(sent) == {"weight", "bias"}  # trainable parameters only
    again = make_algorithm(cfg)
    again.restore(server.state())  # --resume: the same c, bit for bit
    assert all(again.message_records(3, new)[C_KEY][k].data == server.message_records(3, new)[C_KEY][k].data
               for k in sent)


def test_a_round_of_scaffold_records_is_put_in_rays_object_store_once(ray_session):
    """Every message of a round carries the global weights and c: each is put once a round, not
    once per message (holding only the latest record would re-put both every message)."""
    from cxrfl_ray.fl.backend import SharedArrays

    shared = SharedArrays()
    weights, c = ArrayRecord({"w": torch.ones(4)}), ArrayRecord({"w": torch.zeros(4)})
    first = shared.refs([weights, c])
    assert all(a is b for a, b in zip(shared.refs([weights, c]), first))  # the round's second message
    next_c = ArrayRecord({"w": torch.full((4,), 2.0)})
    again = shared.refs([weights, next_c])
    assert again[0] is first[0] and again[1] is not first[1]
    assert ray_session.get(again[1]).to_torch_state_dict()["w"].tolist() == [2.0] * 4


def run_config(dataset, tmp_path, **train):
    return build_config({
        "name": "scaffold", "out_dir": str(tmp_path), "seed": 0, "task": "classification",
        "data": {"path": str(dataset), "size": 32}, "model": {"name": "tiny-conv"}, "partition": {"clients": 3},
        "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05, "steps": 2, "batch_size": 8, **train},
        "fl": {"rounds": 3, "clients_per_round": 2, "round_timeout": 120, "strategy": {"name": "scaffold"}},
        "tracking": {"wandb": "disabled"}})


def state_files(run) -> dict[int, list[int]]:
    return {int(d.name): sorted(int(f.stem) for f in d.glob("*.safetensors")) for d in sorted((run / "clients").iterdir())}


@pytest.mark.timeout(400)
def test_scaffold_on_the_engine_keeps_state_per_client_and_resumes_exactly(phantoms, tmp_path, ray_session):
    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.fl.state import load_algorithm_state, saved_round

    cfg = run_config(phantoms(n=60, size=32), tmp_path)
    assert [select_clients(3, 2, 0, r) for r in (1, 2, 3)] == [[0, 1], [1, 2], [0, 2]]  # 0 skips round 2
    reference = run_federated(cfg, quiet=True)

    # Files only for the clients that trained; at rest each keeps only its accepted state (the
    # server deletes a replaced file once the round state that replaced it is saved).
    assert state_files(reference) == {0: [3], 1: [2], 2: [3]}
    saved = load_algorithm_state(reference)
    assert saved["accepted_rounds"].tolist() == [3, 2, 3]
    # c is the mean over all 3 clients of their accepted c_i. That holds only if every client
    # added to c the change from the c_i it had before (client 0 in round 3: its round-1 state).
    mine = [load_file(str(reference / "clients" / f"{cid:06d}" / f"{rnd:06d}.safetensors"))
            for cid, rnd in enumerate(saved["accepted_rounds"])]
    c = {k[2:]: v for k, v in saved.items() if k.startswith("c/")}
    assert c and all(float(np.abs(v).max()) > 0 for v in c.values())
    for name, value in c.items():
        np.testing.assert_allclose(value, sum(m[name].numpy() for m in mine) / 3, rtol=1e-4, atol=1e-7)

    stopped = stopped_after_round_1(cfg, tmp_path / "stopped")
    assert saved_round(stopped) == 1 and load_algorithm_state(stopped)["accepted_rounds"].tolist() == [1, 1, 0]
    # Round 2 went out before round 1 was evaluated (fl/overlap.py), so its clients (1 and 2) may
    # have written round-2 files when the run stopped; the saved state refers to none of them and
    # the resumed run writes them again.
    files = state_files(stopped)
    assert {c: [1] for c, rs in files.items() if 1 in rs} == {0: [1], 1: [1]}
    assert all(r in (1, 2) for rs in files.values() for r in rs) and all(rs == [2] for c, rs in files.items() if c == 2)
    run_federated(resume=stopped, quiet=True)

    strip = lambda run: [(r["round"], r["scope"], r["id"], r["metric"], r["value"])  # noqa: E731
                         for r in pq.read_table(run / "metrics.parquet").to_pylist() if not r["metric"].endswith("_seconds")]
    assert strip(stopped) == strip(reference)
    last, ref_last = load_file(str(stopped / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert last.keys() == ref_last.keys() and all(torch.equal(last[k], ref_last[k]) for k in ref_last)
    resumed_c = load_algorithm_state(stopped)
    assert all(np.array_equal(resumed_c[k], saved[k]) for k in saved)
    assert state_files(stopped) == state_files(reference)
    for key in ("best_value", "best_round", "final"):
        assert json.loads((stopped / "summary.json").read_text())[key] == json.loads((reference / "summary.json").read_text())[key]


def test_scaffold_refuses_a_non_sgd_optimizer_or_momentum_before_ray_starts(phantoms, tmp_path, monkeypatch):
    from cxrfl_ray.fl.engine import run_federated

    def no_ray(cfg, **_):
        raise AssertionError("Ray was started for a refused run")

    monkeypatch.setattr("cxrfl_ray.fl.engine.ensure_ray", no_ray)
    data = phantoms(n=60, size=32)
    with pytest.raises(ConfigError, match=r"^train.optimizer 'adam': scaffold \(option II\) needs plain SGD steps; "
                                          r"set train.optimizer=sgd and train.momentum=0$"):
        run_federated(run_config(data, tmp_path, optimizer="adam"))
    with pytest.raises(ConfigError, match=r"^train.momentum 0.9: scaffold"):
        run_federated(run_config(data, tmp_path, momentum=0.9))
    cfg = run_config(data, tmp_path)
    bad = build_config({**cfg.model_dump(mode="json"),
                        "fl": {**cfg.model_dump(mode="json")["fl"], "strategy": {"name": "scaffold", "options": {"server_lr": 0}}}})
    with pytest.raises(ConfigError, match=r"^fl.strategy.options.server_lr 0: "):
        run_federated(bad)
    assert not list(tmp_path.glob("scaffold-fl-*"))
