"""`cxrfl simulate`: the real Flower simulation runtime on a real local Ray.

All simulations in this process share the session's Ray (``ray_session``), as a Ray Tune trial or
a script running several presets does; the engine leaves it up and reuses its client actors.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cxrfl_ray.config import ConfigError, build_config
from cxrfl_ray.fl.engine import run_federated
from cxrfl_ray.fl.client import _failure_draw
from cxrfl_ray.fl.strategies import select_clients
from tests.conftest import kill_process_tree
from tests.fl.messages import stopped_after_round_1

def config(dataset, tmp_path, **over):
    base = {"name": "sim", "out_dir": str(tmp_path), "seed": 3, "task": "classification",
            "data": {"path": str(dataset), "size": 48, "augment": True},
            "model": {"name": "tiny-conv"}, "partition": {"clients": 4},
            "train": {"steps": 2, "batch_size": 8, "lr": 0.01},
            "fl": {"rounds": 3, "fraction": 0.5, "round_timeout": 120},
            "tracking": {"wandb": "disabled"}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(base)


def table(run):
    return pq.read_table(run / "metrics.parquet").to_pylist()


@pytest.mark.timeout(300)
def test_simulation_evaluates_every_round_on_every_view(phantoms, tmp_path, ray_session):
    data = phantoms(n=200, size=48)
    cfg = config(data, tmp_path, data={"holdout_sites": ["site3"]},
                 fl={"client_eval": True, "thresholds": {"accuracy": 0.0}}, tracking={"wandb": "offline"})
    run = run_federated(cfg, quiet=True)
    rows = table(run)
    views = {(r["scope"], r["id"]) for r in rows if r["metric"] == "accuracy" and r["scope"] in ("central", "site", "holdout")}
    assert views == {("central", "val"), ("central", "test"), ("site", "site0"), ("site", "site1"),
                     ("site", "site2"), ("holdout", "site3")}
    for view in views:
        rounds = sorted(r["round"] for r in rows if (r["scope"], r["id"]) == view and r["metric"] == "accuracy")
        assert rounds == [0, 1, 2, 3], view
    # Each round trains the seeded cohort, and every trained client's metrics are kept.
    for rnd in (1, 2, 3):
        trained = sorted(int(r["id"]) for r in rows if r["scope"] == "client" and r["round"] == rnd and r["metric"] == "train_loss")
        assert trained == select_clients(4, 2, 3, rnd)
        evaluated = sorted(int(r["id"]) for r in rows if r["scope"] == "client_eval" and r["round"] == rnd and r["metric"] == "accuracy")
        assert evaluated == trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_to_threshold"] == {"accuracy>=0.0": 0}
    assert summary["clients_per_round"] == 2 and summary["client_failures"] == 0
    val = {r["round"]: r["value"] for r in rows if (r["scope"], r["id"], r["metric"]) == ("central", "val", "accuracy")}
    assert summary["best_value"] == max(val.values())
    for name in ("config.yaml", "best.safetensors", "last.safetensors", "accuracy.png", "state.safetensors",
                 "confusion.png", "roc.png"):
        assert (run / name).is_file()
    # One offline W&B run with the config and per-round metrics, written inside the run folder.
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    (history,) = wandb_run.glob("run-*.wandb")
    assert history.stat().st_size > 1000
    assert b"central/test/accuracy" in history.read_bytes()


@pytest.mark.timeout(400)
def test_failures_are_counted_and_identical_configs_give_identical_metrics(phantoms, tmp_path, ray_session):
    data = phantoms(n=200, size=48)
    cfg = config(data, tmp_path, faults={"client_failure_rate": 0.2}, partition={"clients": 5},
                 fl={"rounds": 4, "fraction": 1.0}, seed=11)
    runs = [run_federated(cfg, quiet=True) for _ in range(2)]
    # The same failures as dead client processes (as when a client is OOM-killed): the backend
    # replaces the actors and the run goes on exactly as when the clients raise.
    runs.append(run_federated(cfg.model_copy(update={"faults": cfg.faults.model_copy(update={"failure": "exit"})}),
                              quiet=True))
    expected = {rnd: sum(_failure_draw(11, rnd, c) < 0.2 for c in range(5)) for rnd in range(1, 5)}
    assert sum(expected.values()) > 0  # the seed really injects failures
    first = table(runs[0])
    failures = {r["round"]: r["value"] for r in first if r["scope"] == "round" and r["metric"] == "failures"}
    assert failures == expected
    trained = {rnd: sum(1 for r in first if r["scope"] == "client" and r["round"] == rnd and r["metric"] == "train_loss")
               for rnd in range(1, 5)}
    assert trained == {rnd: 5 - expected[rnd] for rnd in range(1, 5)}
    assert json.loads((runs[0] / "summary.json").read_text())["client_failures"] == sum(expected.values())
    strip = lambda rows: [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in rows  # noqa: E731
                          if not r["metric"].endswith("_seconds")]  # timings are the only non-reproducible values
    assert strip(first) == strip(table(runs[1])) == strip(table(runs[2]))


@pytest.mark.parametrize("over, message", [
    ({"fl": {"fraction": 0.0}}, "fl.fraction: Input should be greater than 0"),
    ({"fl": {"fraction": 1.5}}, "fl.fraction: Input should be less than or equal to 1"),
    ({"fl": {"min_clients": 9}}, "fl.min_clients 9 is more than partition.clients 4"),
    ({"fl": {"strategy": {"name": "fedfoo"}}}, "fl.strategy.name"),
])
def test_invalid_federations_are_refused_by_the_config(phantoms, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        config(phantoms(n=200, size=48), tmp_path, **over)


def test_invalid_runs_stop_before_ray_starts(phantoms, tmp_path, monkeypatch):
    def no_ray(cfg, **_):
        raise AssertionError("Ray was started for an invalid run")

    monkeypatch.setattr("cxrfl_ray.fl.engine.ensure_ray", no_ray)
    data = phantoms(n=200, size=48)
    with pytest.raises(ConfigError, match="fl.strategy.options for fedadam: .*unexpected keyword argument 'etta'"):
        run_federated(config(data, tmp_path, fl={"strategy": {"name": "fedadam", "options": {"etta": 0.1}}}))
    with pytest.raises(ConfigError, match=r"more clients \(500\) than patients"):
        run_federated(config(data, tmp_path, partition={"clients": 500}))
    with pytest.raises(ConfigError, match="^fl.min_replies 3 is more than the 2 clients trained per round: every "
                                          "round would fail$"):
        run_federated(config(data, tmp_path, fl={"min_replies": 3}))
    from cxrfl_ray.data.writer import DatasetWriter
    from tests.conftest import make_rows

    with DatasetWriter(tmp_path / "nomask", name="n", label_names=["a", "b", "c"]) as w:
        for r in make_rows(30, masks=False):
            w.add(r)
    with pytest.raises(ConfigError, match="needs lung masks"):
        run_federated(config(tmp_path / "nomask", tmp_path, task="segmentation", model={"name": "tiny-conv-seg"}))
    assert not list(tmp_path.glob("sim-fl-*"))


def test_presets_are_valid_and_the_cli_names_unknown_ones(tmp_path, capsys, monkeypatch):
    from cxrfl_ray.cli import main as cxrfl
    from cxrfl_ray.presets import PRESETS

    for name, preset in PRESETS.items():
        cfg = build_config(preset, source=name)
        assert cfg.name == name
    paper = build_config(PRESETS["paper-segmentation"])
    assert (paper.model.name, paper.data.size, paper.train.batch_size, paper.train.optimizer, paper.fl.rounds,
            paper.partition.clients) == ("unetplusplus-efficientnet-b4", 1024, 2, "adagrad", 15, 3)
    assert cxrfl(["simulate", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the default data is generated on first use, relative to here
    assert cxrfl(["simulate", "--preset", "default-classification", "--print-config", "--quiet",
                  "--set", "fl.rounds=2"]) == 0
    assert "rounds: 2" in capsys.readouterr().out
    assert (tmp_path / "runs/default/phantoms-128/dataset.json").is_file()


@pytest.mark.timeout(500)
def test_a_killed_run_resumes_to_the_same_metrics(phantoms, tmp_path, ray_session):
    import subprocess
    import sys
    import time

    from cxrfl_ray.fl.state import saved_round

    data = phantoms(n=200, size=48)
    cfg = config(data, tmp_path, fl={"rounds": 10, "strategy": {"name": "fedadam", "options": {"eta": 0.05}}})
    reference = run_federated(cfg, quiet=True)
    cfg_path = cfg.save(tmp_path / "cfg.yaml")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cxrfl_ray.cli", "simulate", str(cfg_path), "--quiet",
                             "--set", f"out_dir={out}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        run = None
        while time.time() < deadline:
            runs = list(out.glob("sim-fl-*")) if out.exists() else []
            if runs and (saved_round(runs[0]) or 0) >= 1:  # killed early: a round takes ~0.1 s here
                run = runs[0]
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert run is not None, "round 1 never completed"
    finally:
        kill_process_tree(proc)
    assert saved_round(run) < 10
    resumed = run_federated(resume=run, quiet=True)
    assert resumed == run
    strip = lambda rows: [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in rows  # noqa: E731
                          if not r["metric"].endswith("_seconds")]  # timings are the only non-reproducible values
    assert strip(table(resumed)) == strip(table(reference))
    for key in ("best_value", "best_round", "final", "client_failures"):
        assert json.loads((resumed / "summary.json").read_text())[key] == json.loads((reference / "summary.json").read_text())[key]
    with pytest.raises(ConfigError, match="all 10 rounds are already done"):
        run_federated(resume=run)


def test_cosine_lr_spans_the_rounds_and_a_round_redone_in_a_fresh_runtime_is_identical(phantoms, tmp_path, monkeypatch):
    """``train.lr_schedule: cosine`` in a federation: each client's round continues one schedule
    over all rounds (not a restart per round), derived from the round number alone, so a resumed
    run (a fresh actor given the saved global weights) trains exactly as the uninterrupted one."""
    import math

    import torch

    from cxrfl_ray.fl import client

    threads = torch.get_num_threads()  # runtime() sets the actor's thread count
    data = phantoms(n=60, size=32)
    lr, steps, rounds = 0.01, 2, 3
    cfg = config(data, tmp_path, data={"size": 32}, train={"lr_schedule": "cosine", "steps": steps, "lr": lr},
                 fl={"rounds": rounds})
    seen: list[list[float]] = []
    real = client.train_local

    def recording(model, loader, loss_fn, optimizer, device, **kwargs):
        seen.append([])  # the rate of every optimiser step of this fit
        optimizer.register_step_pre_hook(lambda opt, args, kw: seen[-1].append(opt.param_groups[0]["lr"]))
        return real(model, loader, loss_fn, optimizer, device, **kwargs)

    monkeypatch.setattr(client, "train_local", recording)
    try:
        client._RUNTIMES.clear()
        rt = client.runtime(cfg.to_yaml())
        weights = []
        for rnd in range(1, rounds + 1):
            client.fit_client(rt, 1, rnd)
            weights.append({k: v.clone() for k, v in client.trainable_state(rt.model).items()})
        total = steps * rounds
        expected = [[lr * 0.5 * (1 + math.cos(math.pi * ((rnd - 1) * steps + k) / total)) for k in range(steps)]
                    for rnd in range(1, rounds + 1)]
        assert seen == [pytest.approx(e, rel=1e-9) for e in expected]
        assert seen[2][-1] < lr * 0.1  # the last round ends near 0, not at the full rate again

        # Resume: a fresh runtime (new actor, new model) given round 2's global weights.
        client._RUNTIMES.clear()
        fresh = client.runtime(cfg.to_yaml())
        assert fresh is not rt
        fresh.model.load_state_dict(weights[1])
        client.fit_client(fresh, 1, 3)
        redone = client.trainable_state(fresh.model)
        assert all(torch.equal(redone[k], weights[2][k]) for k in weights[2])
        assert seen[3] == seen[2]

        # The same round with a constant rate trains differently (the schedule is really applied).
        client._RUNTIMES.clear()
        const = client.runtime(config(data, tmp_path, data={"size": 32}, train={"steps": steps, "lr": lr},
                                      fl={"rounds": rounds}).to_yaml())
        const.model.load_state_dict(weights[1])
        client.fit_client(const, 1, 3)
        assert seen[4] == [lr] * steps
        assert not all(torch.equal(v, weights[2][k]) for k, v in client.trainable_state(const.model).items())
    finally:
        client._RUNTIMES.clear()
        torch.set_num_threads(threads)


@pytest.mark.timeout(300)
def test_a_cosine_run_stopped_after_a_round_resumes_to_the_same_metrics(phantoms, tmp_path, ray_session):
    from cxrfl_ray.fl.state import saved_round

    data = phantoms(n=60, size=32)
    cfg = config(data, tmp_path, data={"size": 32}, train={"lr_schedule": "cosine", "lr": 0.05},
                 fl={"rounds": 2, "fraction": 1.0}, partition={"clients": 2})
    reference = run_federated(cfg, quiet=True)

    stopped = stopped_after_round_1(cfg, tmp_path / "stopped")
    assert saved_round(stopped) == 1
    resumed = run_federated(resume=stopped, quiet=True)
    strip = lambda rows: [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in rows  # noqa: E731
                          if not r["metric"].endswith("_seconds")]
    assert strip(table(resumed)) == strip(table(reference))
    assert {r["round"] for r in table(resumed)} == {0, 1, 2}


def run_cli(args, capsys):
    """``cxrfl ARGS`` in this process (the session's Ray); returns (exit code, stderr lines)."""
    from cxrfl_ray.cli import main as cxrfl

    code = cxrfl(args)
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.timeout(300)
def test_a_federation_where_no_client_trains_fails_quoting_the_first_client_error(phantoms, tmp_path, ray_session, capsys,
                                                                                   caplog):
    import torch
    from safetensors.torch import load_file

    from cxrfl_ray.fl.state import load_state

    cfg = config(phantoms(n=60, size=32), tmp_path, data={"size": 32}, partition={"clients": 2},
                 faults={"client_failure_rate": 0.99}, fl={"rounds": 3, "fraction": 1.0, "max_failed_rounds": 2})
    assert all(_failure_draw(3, rnd, c) < 0.99 for rnd in (1, 2) for c in (0, 1))  # every training fails
    code, err = run_cli(["simulate", str(cfg.save(tmp_path / "cfg.yaml")), "--quiet"], capsys)
    assert code == 2
    assert err[-1] == ("cxrfl simulate: error: federation failed at round 2: 0 of 2 clients trained successfully, "
                       "fewer than fl.min_replies 1; 2 rounds in a row (1-2) had fewer, fl.max_failed_rounds 2; first "
                       "client error (round 1): client 0: InjectedClientFailure: injected failure of client 0 in round 1")
    assert "round 1: client 1: InjectedClientFailure: injected failure of client 1 in round 1" in caplog.messages
    assert not any("Traceback" in line for line in err)
    (run,) = tmp_path.glob("sim-fl-*")
    assert not (run / "summary.json").exists()  # no complete-looking result
    done, arrays, _, extra = load_state(run)
    assert done == 1 and extra["failed_streak"] == 1 and extra["first_failure"]["client"] == 0
    initial = load_file(str(run / "best.safetensors"))  # round 0's model (round 1 could not beat it)
    assert all(torch.equal(v, initial[k]) for k, v in arrays.to_torch_state_dict().items())  # round 1 changed nothing
    round1 = {r["metric"]: r["value"] for r in table(run) if (r["round"], r["scope"]) == (1, "round")}
    assert (round1["failures"], round1["replied"]) == (2, 0) and "train_loss" not in round1


@pytest.mark.timeout(300)
def test_a_diverging_federation_stops_with_one_error_line_and_saves_no_diverged_model(phantoms, tmp_path, ray_session,
                                                                                      capsys, caplog):
    from cxrfl_ray.fl.state import saved_round
    from cxrfl_ray.tasks.checkpoint import read_metadata

    cfg = config(phantoms(n=60, size=32), tmp_path, data={"size": 32}, partition={"clients": 2},
                 train={"lr": 1e30}, fl={"rounds": 2, "fraction": 1.0})
    code, err = run_cli(["simulate", str(cfg.save(tmp_path / "cfg.yaml")), "--quiet"], capsys)
    assert code == 2
    assert err[-1] == ("cxrfl simulate: error: diverged at round 1 (train loss nan from client 0; 0 of 2 clients gave "
                       "a finite update): lower train.lr")
    assert "round 1: client 0: update not finite (train loss nan)" in caplog.messages
    assert not any("Traceback" in line for line in err)
    (run,) = tmp_path.glob("sim-fl-*")
    assert saved_round(run) == 0 and not (run / "summary.json").exists() and not (run / "confusion.png").exists()
    assert json.loads(read_metadata(run / "best.safetensors")["info"])["round"] == 0  # the finite start


def test_resume_of_a_run_whose_config_was_edited_is_refused_before_ray_starts(phantoms, tmp_path, monkeypatch, capsys):
    import yaml

    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.fl.client import weights_record
    from cxrfl_ray.fl.state import save_state
    from cxrfl_ray.tasks.models import create_model

    def no_ray(cfg, **_):
        raise AssertionError("Ray was started for a refused resume")

    monkeypatch.setattr("cxrfl_ray.fl.engine.ensure_ray", no_ray)
    prep = prepare(config(phantoms(n=60, size=32), tmp_path, data={"size": 32}, partition={"clients": 2}))
    run = tmp_path / "killed"  # as a run killed after round 1 leaves it: its config and round state
    run.mkdir()
    prep.cfg.save(run / "config.yaml")
    model = create_model("tiny-conv", "classification", 1, prep.num_classes)
    save_state(run, 1, weights_record(model), object(), {"best": 0.3, "best_round": 0, "failures_total": 0}, prep.cfg)
    original = (run / "config.yaml").read_text()
    for edit, shown in [({"train": {"lr": 0.1}, "data": {"size": 48}}, "data.size: 32 -> 48, train.lr: 0.01 -> 0.1"),
                        ({"model": {"name": "resnet18"}}, "model.name: 'tiny-conv' -> 'resnet18'")]:
        raw = yaml.safe_load(original)
        for section, values in edit.items():
            raw[section].update(values)
        (run / "config.yaml").write_text(yaml.safe_dump(raw))
        code, err = run_cli(["simulate", "--resume", str(run)], capsys)
        assert code == 2
        assert err == [f"cxrfl simulate: error: --resume {run}: {run / 'config.yaml'} was changed after rounds ran "
                       f"with it ({shown}); restore it, or start a new run"]


@pytest.mark.timeout(120)
def test_the_server_app_finds_every_virtual_node_at_its_first_step(ray_session, monkeypatch):
    """A resumed run selects its cohort at once (it has no round 0 to evaluate first); the nodes
    must be registered by then, however slowly the driver's thread gets to it."""
    import time

    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.serverapp import ServerApp

    from cxrfl_ray.fl.engine import simulate

    register = vce_api._register_nodes

    def slow_register(**kwargs):
        time.sleep(0.5)  # a starved driver thread
        return register(**kwargs)

    monkeypatch.setattr(vce_api, "_register_nodes", slow_register)
    seen = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        seen.append(len(grid.get_node_ids()))

    simulate(server, ClientApp(), num_nodes=3, client_resources={"num_cpus": 1, "num_gpus": 0})
    assert seen == [3]
