"""FedBN: BatchNorm stays on each client, the rest is averaged as FedAvg would, and each site's
own model (global weights + its BN) is evaluated on its own test rows.

The round-level tests call the real ClientApp ``train`` and the real seeded strategy in this
process (no Ray); one simulation on Ray checks resume, a replaced actor and the outputs.
"""

from __future__ import annotations

import shutil

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from safetensors.torch import load_file

from cxrfl_ray.config import ConfigError
from cxrfl_ray.fl.algorithms import make_algorithm
from cxrfl_ray.fl.algorithms.base import ClientRound, trainable_state
from cxrfl_ray.fl.algorithms.fedbn import FedBN, batchnorm_keys
from cxrfl_ray.fl.client_state import AcceptedStates, ClientStateStore
from cxrfl_ray.fl.strategies import CLIENT_KEY, make_strategy
from tests.fl.messages import stopped_after_round_1
from tests.fl.test_simulate import config as simulation_config, table


def config(dataset, tmp_path, **over):
    """Classification with resnet18 (20 BatchNorm layers) at 32 px: one client per phantom site."""
    fedbn = {"name": "fedbn", "seed": 5, "data": {"size": 32, "augment": False}, "model": {"name": "resnet18"},
             "partition": {"scheme": "site", "clients": "sites"}, "train": {"lr": 0.05},
             "fl": {"rounds": 3, "clients_per_round": 2, "strategy": {"name": "fedbn"}}}
    for key, value in over.items():
        fedbn[key] = {**fedbn.get(key, {}), **value} if isinstance(value, dict) else value
    return simulation_config(dataset, tmp_path, **fedbn)


def train_message(cfg, cid: int, server_round: int, arrays, accepted: AcceptedStates) -> Message:
    """A training message as the seeded strategy builds it (the global weights, the client, the
    round and which state of the client counts)."""
    from cxrfl_ray.fl.client import EXPERIMENT_KEY

    config = ConfigRecord({EXPERIMENT_KEY: cfg.to_yaml(), "server-round": server_round, CLIENT_KEY: cid,
                           **accepted.message_config(cid)})
    meta = Metadata(run_id=1, message_id=f"r{server_round}c{cid}", src_node_id=0, dst_node_id=1 + cid,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": arrays, "config": config}), metadata=meta)


@pytest.fixture(scope="module")
def by_hand(phantoms, tmp_path_factory):
    """Round 1 of a 3-site FedBN federation by hand: clients 0 and 1 train (real ClientApp
    ``train``), the server aggregates (real seeded strategy + FedBN) and accepts their states."""
    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.fl import client
    from cxrfl_ray.tasks.models import create_model
    from cxrfl_ray.tasks.training import seed_everything

    threads = torch.get_num_threads()  # runtime() sets the client's thread count
    tmp = tmp_path_factory.mktemp("fedbn")
    prep = prepare(config(phantoms(n=90, size=32, sites=3), tmp))
    cfg = prep.cfg
    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes)
    arrays0 = client.weights_record(model)
    accepted = AcceptedStates(len(prep.plan.clients), tmp / "clients")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client._RUNTIMES.clear()
    try:
        replies = [client.train(train_message(cfg, cid, 1, arrays0, accepted), context) for cid in (0, 1)]
        strategy = make_strategy("fedbn", {}, num_clients=3, per_round=2, seed=cfg.seed, client_eval=False)
        algorithm = make_algorithm(cfg)
        # aggregate_train consumes nothing, but keep the replies' content for the checks
        arrays1, _ = algorithm.aggregate(strategy, 1, arrays0, list(replies))
        accepted.accept(1, [0, 1])
        yield dict(cfg=cfg, prep=prep, model=model, arrays0=arrays0, arrays1=arrays1, replies=replies,
                   accepted=accepted, algorithm=algorithm, context=context, rt=next(iter(client._RUNTIMES.values())))
    finally:
        client._RUNTIMES.clear()
        torch.set_num_threads(threads)


def test_fedbn_replies_carry_no_batchnorm_tensor_and_clients_keep_theirs(by_hand):
    bn = set(batchnorm_keys(by_hand["model"]))
    trainable = set(trainable_state(by_hand["model"]))
    assert len(bn) == 100  # resnet18: 20 BatchNorm layers x (weight, bias, running mean/var, step count)
    for cid, reply in zip((0, 1), by_hand["replies"]):
        content = reply.content
        assert set(content.keys()) == {"arrays", "metrics"}  # no extra record carries them either
        assert set(content["arrays"].keys()) == trainable - bn  # every trainable tensor but BN's
        state = ClientStateStore(by_hand["accepted"].root, cid).load(1)
        assert set(state) == bn  # ... which the client keeps, step counters included
        assert int(state["bn1.num_batches_tracked"]) == 2  # its 2 steps, not another client's
        global_mean = by_hand["arrays0"]["bn1.running_mean"].numpy()
        assert not np.allclose(state["bn1.running_mean"].numpy(), global_mean)  # trained on its site
    own = [ClientStateStore(by_hand["accepted"].root, c).load(1)["layer1.0.bn1.running_var"] for c in (0, 1)]
    assert not torch.equal(*own)  # two sites, two different statistics
    # Only the clients that trained have state files.
    assert sorted(p.name for p in Path(by_hand["accepted"].root).iterdir()) == ["000000", "000001"]


def test_fedbn_averages_the_rest_exactly_as_fedavg_and_keeps_the_global_batchnorm(by_hand):
    arrays0, arrays1, replies = by_hand["arrays0"], by_hand["arrays1"], by_hand["replies"]
    bn = set(batchnorm_keys(by_hand["model"]))
    assert list(arrays1.keys()) == list(arrays0.keys())  # a full global record, same order
    n = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
    assert n[0] != n[1]  # a weighted average, not a plain mean
    for key in arrays0.keys():
        new = arrays1[key].numpy()
        if key in bn:
            assert np.array_equal(new, arrays0[key].numpy()), key  # never sent: the previous global's
        else:
            hand = sum(w * r.content["arrays"][key].numpy().astype(np.float64) for w, r in zip(n / n.sum(), replies))
            np.testing.assert_allclose(new, hand, rtol=1e-5, atol=1e-7, err_msg=key)
    assert not np.array_equal(arrays1["conv1.weight"].numpy(), arrays0["conv1.weight"].numpy())  # it did train


def test_each_client_starts_its_next_round_from_its_own_accepted_batchnorm(by_hand):
    from cxrfl_ray.fl import client

    rt, cfg, accepted = by_hand["rt"], by_hand["cfg"], by_hand["accepted"]
    bn = batchnorm_keys(rt.model)

    def begin(cid: int, server_round: int, state_round: int) -> dict[str, torch.Tensor]:
        client.load_global(rt.model, by_hand["arrays1"])
        work = by_hand["algorithm"].local(ClientRound(cid, server_round, rt.model, cfg, RecordDict(),
                                                      ClientStateStore(accepted.root, cid), state_round))
        work.begin()
        return {k: v.clone() for k, v in rt.model.state_dict().items()}

    for cid in (0, 1):
        own = ClientStateStore(accepted.root, cid).load(1)
        model = begin(cid, 2, int(accepted.rounds[cid]))
        assert all(torch.equal(model[k], own[k]) for k in bn), cid  # its BN over the global weights
        assert all(torch.equal(model[k], torch.from_numpy(by_hand["arrays1"][k].numpy()))
                   for k in by_hand["arrays1"].keys() if k not in set(bn))
    # A client without an accepted state starts from the global BN, its step counters at 0
    # (not those of the client this actor played before).
    fresh = begin(2, 2, 0)
    assert all(torch.equal(fresh[k], torch.from_numpy(by_hand["arrays0"][k].numpy())) for k in bn
               if not k.endswith("num_batches_tracked"))
    assert all(int(fresh[k]) == 0 for k in bn if k.endswith("num_batches_tracked"))
    # A state written in a round the server did not accept is not read: round 2 of client 0
    # trains and saves, but its message of round 3 still names round 1.
    client.train(train_message(cfg, 0, 2, by_hand["arrays1"], accepted), by_hand["context"])
    assert ClientStateStore(accepted.root, 0).path(2).is_file()
    again = begin(0, 3, int(accepted.rounds[0]))
    assert all(torch.equal(again[k], ClientStateStore(accepted.root, 0).load(1)[k]) for k in bn)


def test_personal_evaluation_is_global_weights_plus_each_sites_batchnorm_on_its_test_rows(by_hand):
    import functools

    from cxrfl_ray.experiment import evaluate_views
    from cxrfl_ray.fl import client

    prep, accepted, algorithm = by_hand["prep"], by_hand["accepted"], by_hand["algorithm"]
    model = by_hand["model"]
    loss_fn = prep.task.make_loss(prep.cfg.loss_name, None)
    evaluate = functools.partial(evaluate_views, prep, model, torch.device("cpu"), loss_fn)
    client.load_global(model, by_hand["arrays1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sites = algorithm.site_clients(prep)
    assert sites == {f"site{s}": [s] for s in range(3)}  # partition.scheme site: one client per site
    personal = algorithm.evaluate_personal(1, model, prep, accepted, evaluate)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the global is back
    # Sites whose client has an accepted state; site2's client has not trained.
    assert set(personal) == {("personal", "site0"), ("personal", "site1")}
    glob = evaluate([("site", "site0"), ("site", "site1")])
    for cid, site in ((0, "site0"), (1, "site1")):
        model.load_state_dict(ClientStateStore(accepted.root, cid).load(1), strict=False)
        expected = evaluate([("site", site)])[("site", site)]
        model.load_state_dict(before)
        assert personal[("personal", site)] == {**expected, "clients": 1.0}
        assert personal[("personal", site)]["loss"] != pytest.approx(glob[("site", site)]["loss"], rel=1e-3)
    # In a real federation the states are on the sites: nothing to evaluate on the server.
    assert algorithm.evaluate_personal(1, model, prep, AcceptedStates(3, None), evaluate) == {}
    capped = FedBN(prep.cfg, {"personal_clients": 0})
    assert capped.evaluate_personal(1, model, prep, accepted, evaluate) == {}


@pytest.mark.parametrize("over, message", [
    ({"model": {"norm": "group"}}, "fl.strategy.name fedbn keeps BatchNorm local, but model.norm is 'group' "
                                   "(no BatchNorm layer): FedBN would be FedAvg"),
    ({"model": {"name": "tiny-conv"}}, "fl.strategy.name fedbn keeps BatchNorm local, but model.name 'tiny-conv' "
                                       "has no BatchNorm layer: FedBN would be FedAvg"),
    ({"fl": {"strategy": {"name": "fedbn", "options": {"personal_clients": -1}}}},
     "fl.strategy.options.personal_clients: a count >= 0 of clients evaluated per site, not -1"),
])
def test_fedbn_without_batchnorm_is_refused_before_ray_starts(phantoms, tmp_path, monkeypatch, over, message):
    from cxrfl_ray.fl.engine import run_federated

    def no_ray(cfg, **_):
        raise AssertionError("Ray was started for an invalid run")

    monkeypatch.setattr("cxrfl_ray.fl.engine.ensure_ray", no_ray)
    cfg = config(phantoms(n=90, size=32, sites=3), tmp_path, **over)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        run_federated(cfg, quiet=True)


def state_files(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "clients").glob("*/*.safetensors"))}


@pytest.mark.timeout(600)
def test_fedbn_simulation_resumes_exactly_and_survives_a_replaced_actor(phantoms, tmp_path, ray_session):
    """Seed 5, 3 sites, 2 clients a round, 30% injected failures: round 1 trains clients 0 and 2
    (2 fails), round 2 clients 0 and 1, round 3 clients 1 and 2 (2 fails again)."""
    from cxrfl_ray.fl.client import _failure_draw, fit_client, load_global, runtime, _RUNTIMES
    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.fl.state import load_state, saved_round
    from cxrfl_ray.fl.strategies import select_clients

    data = phantoms(n=90, size=32, sites=3)
    cfg = config(data, tmp_path, faults={"client_failure_rate": 0.3})
    assert [select_clients(3, 2, 5, r) for r in (1, 2, 3)] == [[0, 2], [0, 1], [1, 2]]
    assert [c for r in (1, 2, 3) for c in select_clients(3, 2, 5, r) if _failure_draw(5, r, c) < 0.3] == [2, 2]
    flat: dict[int, dict[str, float]] = {}
    reference = run_federated(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"wandb": "offline"})}),
                              quiet=True, run_dir=tmp_path / "reference",
                              on_round=lambda r, m: flat.__setitem__(r, m))

    stopped = stopped_after_round_1(cfg, tmp_path / "stopped")
    assert saved_round(stopped) == 1
    round1_global = load_state(stopped)[1]
    round1_states = tmp_path / "round1-clients"  # the files round 2 starts from (deleted once replaced)
    shutil.copytree(stopped / "clients", round1_states)
    assert run_federated(resume=stopped, quiet=True) == stopped
    # The same failures as dead client processes: the backend replaces the actors.
    exited = run_federated(cfg.model_copy(update={"faults": cfg.faults.model_copy(update={"failure": "exit"})}),
                           quiet=True, run_dir=tmp_path / "exited")

    strip = lambda rows: [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in rows  # noqa: E731
                          if not r["metric"].endswith("_seconds")]
    rows = table(reference)
    assert strip(table(stopped)) == strip(rows) == strip(table(exited))
    # Per-client state files only for the clients that trained (client 2 failed both its rounds),
    # byte for byte the same after a resume and with replaced actors.
    files = state_files(reference)
    # At rest each client keeps only its accepted state (a replaced file goes once the round
    # state that replaced it is saved).
    assert sorted(files) == ["clients/000000/000002.safetensors", "clients/000001/000003.safetensors"]
    assert state_files(stopped) == files == state_files(exited)
    final = [load_file(str(run / "last.safetensors")) for run in (reference, stopped, exited)]
    assert all(torch.equal(final[0][k], f[k]) for f in final[1:] for k in final[0])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, stopped, exited)]
    assert summaries[0]["final"] == summaries[1]["final"] == summaries[2]["final"]

    # Client 0 really started round 2 from its own round-1 BN: replayed here from the round-1
    # global and its round-1 state, round 2 gives its saved state exactly; from the global BN it does not.
    threads = torch.get_num_threads()
    try:
        _RUNTIMES.clear()
        rt = runtime(cfg.to_yaml())
        replayed = {}
        for state_round in (1, 0):
            load_global(rt.model, round1_global)
            work = rt.algorithm.local(ClientRound(0, 2, rt.model, rt.cfg, RecordDict(),
                                                  ClientStateStore(round1_states, 0), state_round))
            work.begin()
            fit_client(rt, 0, 2, hooks=work)
            replayed[state_round] = {k: v.clone() for k, v in rt.model.state_dict().items()}
        saved = load_file(str(reference / "clients/000000/000002.safetensors"))
        assert all(torch.equal(replayed[1][k], v) for k, v in saved.items())
        assert not all(torch.equal(replayed[0][k], v) for k, v in saved.items())
    finally:
        _RUNTIMES.clear()
        torch.set_num_threads(threads)

    # Personal results per site whose client has an accepted state, beside the global model's,
    # in metrics.parquet, the flat metrics (W&B, Tune) and summary.json's final.
    personal = {(r["round"], r["id"]) for r in rows if r["scope"] == "personal" and r["metric"] == "accuracy"}
    assert personal == {(1, "site0"), (2, "site0"), (2, "site1"), (3, "site0"), (3, "site1")}
    value = {(r["round"], r["scope"], r["id"], r["metric"]): r["value"] for r in rows}
    for rnd, site in personal:
        assert value[(rnd, "personal", site, "loss")] != value[(rnd, "site", site, "loss")]
        assert flat[rnd][f"personal/{site}/loss"] == value[(rnd, "personal", site, "loss")]
        assert value[(rnd, "personal", site, "clients")] == 1.0
    assert "personal/site0/loss" not in flat[0]
    assert summaries[0]["final"]["personal:site1"]["loss"] == value[(3, "personal", "site1", "loss")]
    assert "site:site1" in summaries[0]["final"]
    (wandb_run,) = (reference / "wandb").glob("offline-run-*")
    (history,) = wandb_run.glob("run-*.wandb")
    assert b"personal/site1/accuracy" in history.read_bytes()


def test_a_held_out_site_is_scored_with_batchnorm_statistics_of_its_own_images(phantoms, tmp_path):
    """AdaBN: the global weights, each BatchNorm layer's statistics recomputed from the held-out
    site's images; every other tensor and the model's own BN come back unchanged."""
    import functools

    from cxrfl_ray.experiment import evaluate_views, prepare
    from cxrfl_ray.fl.algorithms.fedbn import adapt_batchnorm
    from cxrfl_ray.tasks.models import create_model

    prep = prepare(config(phantoms(n=90, size=32, sites=3), tmp_path, data={"holdout_sites": ["site2"]}))
    torch.manual_seed(0)
    model = create_model(prep.cfg.model.name, prep.cfg.task, 1, prep.num_classes)
    evaluate = functools.partial(evaluate_views, prep, model, torch.device("cpu"), prep.task.make_loss("cross_entropy"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = evaluate([("holdout", "site2")])[("holdout", "site2")]
    out = FedBN(prep.cfg, {}).evaluate_personal(0, model, prep, AcceptedStates(len(prep.plan.clients), None), evaluate)
    assert set(out) == {("adapted", "site2")}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # By hand: the first BN layer's input statistics per batch of the site's images, averaged over
    # the batches (momentum None: a cumulative average; the unbiased variance, as BatchNorm keeps).
    loader = prep.loader(prep.views[("holdout", "site2")], train=False)
    first, seen = model.bn1, []
    hook = first.register_forward_hook(lambda m, inp, o: seen.append(inp[0].detach()))
    with torch.no_grad():
        model.eval()
        for x, _ in loader:
            model(x)
    hook.remove()
    assert len(seen) >= 1
    adapt_batchnorm(model, loader, torch.device("cpu"))
    torch.testing.assert_close(first.running_mean, torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, torch.stack([x.var((0, 2, 3)) for x in seen]).mean(0),
                               rtol=1e-3, atol=1e-5)
    assert not torch.allclose(first.running_mean, before["bn1.running_mean"])
    assert first.momentum == 0.1 and not first.training  # put back as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k not in set(batchnorm_keys(model)))
    assert evaluate([("holdout", "site2")])[("holdout", "site2")] == out[("adapted", "site2")]
    assert out[("adapted", "site2")]["loss"] != pytest.approx(plain["loss"], rel=1e-3)
    off = FedBN(prep.cfg, {"unseen_bn": "none"})
    model.load_state_dict(before)
    assert off.evaluate_personal(0, model, prep, AcceptedStates(len(prep.plan.clients), None), evaluate) == {}
