"""The round policy and its virtual clock: a hand-computed 3-client round (deadline, over-
selection), offline clients never selected, partial work's step budgets; then the engine: the
same config and trace give the same stragglers, simulated times and metrics, and resume
continues the simulated clock exactly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from flwr.app import Array, ArrayRecord

from cxrfl_ray.config import build_config
from cxrfl_ray.fl.system.policy import SimulatedClock, message_bytes
from tests.fl.messages import stopped_after_round_1, train_reply

MB = 1_000_000


def _cfg(tmp_path, speeds=(1.0, 2.0, 8.0), **fl):
    trace = tmp_path / "profiles.csv"
    trace.write_text("client,speed,up_mbps,down_mbps\n" + "".join(f"{c},{s},8,8\n" for c, s in enumerate(speeds)))
    return build_config({"model": {"name": "tiny-conv"}, "partition": {"clients": len(speeds)},
                         "train": {"steps": 4, "batch_size": 8},
                         "fl": {"clients_per_round": 3, **fl},
                         "system": {"profile_trace": str(trace), "seconds_per_step": 0.5}})


def _reply(cid: int, steps: int = 4):
    # 1 MB of weights (minus the npy header, so the message is exactly 1 MB): 1 s on an 8 Mbit/s link
    record = ArrayRecord({"w": Array(np.zeros(MB // 4, np.float32))})
    header = message_bytes([record]) - MB
    record = ArrayRecord({"w": Array(np.zeros((MB - header) // 4, np.float32))})
    assert message_bytes([record]) == MB - (MB - header) % 4
    return train_reply(cid, {"arrays": record}, **{"num-examples": 10, "steps": steps, "train_loss": 0.5,
                                                   "fit_seconds": 99.0})


def _round(clock: SimulatedClock, server_round: int = 1):
    selection = clock.select(server_round, MB)
    return selection, clock.count([_reply(c, selection.budgets.get(c, 4)) for c in selection.clients],
                                  len(selection.clients))


def test_a_hand_computed_round_of_three_clients(tmp_path):
    # Each client: 1 s down + 4 steps x 0.5 s x its speed + ~1 s up = 4, 6 and 18 s.
    clock = SimulatedClock(_cfg(tmp_path), 3, 3)
    selection, counted = _round(clock)
    assert selection.clients == [0, 1, 2] and selection.offline == 0
    assert [round(counted.finish_s[c], 4) for c in (0, 1, 2)] == [4.0, 6.0, 18.0]
    assert counted.round_s == pytest.approx(18.0, abs=1e-4) and counted.stragglers == []
    assert clock.now_s == pytest.approx(18.0, abs=1e-4)
    assert counted.info["bytes_down"] == 3 * MB

    # A 10 s deadline drops client 2; the server waited until the deadline.
    clock = SimulatedClock(_cfg(tmp_path, deadline_s=10.0), 3, 3)
    _, counted = _round(clock)
    assert [int(r.content["metrics"]["cid"]) for r in counted.kept] == [0, 1]
    assert counted.stragglers == [2] and counted.round_s == 10.0
    _, counted = _round(clock, 2)
    assert clock.now_s == pytest.approx(20.0)  # the clock accumulates

    # Over-selection: 3 selected for a cohort of 2 (1.5 x 2); the 2 that finish first count, and
    # the server stops waiting at the second arrival.
    cfg = _cfg(tmp_path, clients_per_round=2, overselect=1.5)
    clock = SimulatedClock(cfg, 3, 2)
    selection, counted = _round(clock)
    assert clock.nodes == 3 and selection.clients == [0, 1, 2]
    assert [int(r.content["metrics"]["cid"]) for r in counted.kept] == [0, 1]
    assert counted.stragglers == [] and counted.info["not_needed"] == 1  # in time (no deadline), just not needed
    assert counted.round_s == pytest.approx(6.0, abs=1e-4)


def test_over_selection_aggregates_exactly_the_k_earliest_whatever_their_ids(tmp_path):
    speeds = np.random.default_rng(3).uniform(1, 9, 12)
    cfg = _cfg(tmp_path, speeds=tuple(speeds), clients_per_round=4, overselect=2.0)
    clock = SimulatedClock(cfg, 12, 4)
    for r in range(1, 6):
        selection, counted = _round(clock, r)
        assert len(selection.clients) == 8
        earliest = sorted(selection.clients, key=lambda c: speeds[c])[:4]
        assert sorted(int(x.content["metrics"]["cid"]) for x in counted.kept) == sorted(earliest)
        assert counted.round_s == pytest.approx(max(counted.finish_s[c] for c in earliest))


def test_offline_clients_are_never_selected(tmp_path):
    trace = tmp_path / "online.csv"
    # client 1 online only from 100 s; client 3 never listed (always online)
    trace.write_text("client,start_s,end_s\n0,0,1000\n1,100,1000\n2,0,50\n2,60,1000\n")
    cfg = build_config({"model": {"name": "tiny-conv"}, "partition": {"clients": 4},
                        "train": {"steps": 4, "batch_size": 8}, "fl": {"clients_per_round": 3},
                        "system": {"availability": {"trace": str(trace)}, "seconds_per_step": 10.0}})
    clock = SimulatedClock(cfg, 4, 3)
    seen = []
    for r in range(1, 8):
        start = clock.now_s
        selection, _ = _round(clock, r)
        online = {c for c, (a, b) in {0: (0, 1000), 1: (100, 1000), 3: (0, 1e9)}.items() if a <= start < b} | \
            ({2} if start < 50 or 60 <= start < 1000 else set())
        assert set(selection.clients) <= online, (start, selection.clients)
        assert selection.offline == 4 - len(online)
        seen.append((start, selection.clients))
    assert any(1 in c for s, c in seen if s >= 100) and all(1 not in c for s, c in seen if s < 100)


def test_partial_work_gives_each_client_the_steps_that_fit_the_deadline(tmp_path):
    # 12 s deadline, 2 s of transfer: 10 s of compute: 0.5 s x speed per step.
    clock = SimulatedClock(_cfg(tmp_path, speeds=(1.0, 2.0, 8.0, 30.0), deadline_s=12.0, straggler="partial"), 4, 3)
    selection = clock.select(1, MB)
    budgets = {c: selection.budgets.get(c) for c in (0, 1, 2, 3)}
    chosen = set(selection.clients) | set(clock._late)
    expected = {0: 4, 1: 4, 2: 2, 3: 0}  # 20, 10, 2.5 and 0.67 steps fit; at most the 4 planned
    for c in chosen:
        assert (budgets[c] or 0) == expected[c]
    assert all(c not in selection.clients for c in chosen if expected[c] == 0)  # nothing fits: not sent


def test_a_bad_policy_is_refused_before_ray(tmp_path):
    from cxrfl_ray.fl.rounds import ServerHooks

    with pytest.raises(ValueError, match="fl.straggler partial gives slow clients .*: set fl.deadline_s"):
        ServerHooks.check(_cfg(tmp_path, straggler="partial"), 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("client,speed,up_mbps,down_mbps\n0,1,8,8\n1,-2,8,8\n2,1,8,8\n")
    cfg = _cfg(tmp_path)
    cfg.system.profile_trace = str(bad)
    with pytest.raises(ValueError, match=r"system.profile_trace .*bad.csv: row 3, speed '-2' is not a finite number > 0"):
        ServerHooks.check(cfg, 3)


# -- on the engine ------------------------------------------------------------------------------

def run_config(dataset, tmp_path, name, **fl):
    return build_config({
        "name": name, "out_dir": str(tmp_path), "seed": 0, "task": "classification",
        "data": {"path": str(dataset), "size": 32}, "model": {"name": "tiny-conv"}, "partition": {"clients": 6},
        "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05, "steps": 4, "batch_size": 8},
        "fl": {"rounds": 3, "clients_per_round": 2, "round_timeout": 120, "overselect": 1.5, "deadline_s": 2.0, **fl},
        "system": {"speed": {"distribution": "two_speed", "slow_share": 0.5, "slow_factor": 5},
                   "bandwidth_sigma": 0.3},
        "tracking": {"wandb": "disabled"}})


def _rows(run):
    return [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in pq.read_table(run / "metrics.parquet").to_pylist()
            if not r["metric"].endswith("_seconds")]


@pytest.mark.timeout(600)
def test_stragglers_and_simulated_time_are_seeded_and_resume_exactly(phantoms, tmp_path, ray_session):
    from cxrfl_ray.fl.engine import run_federated

    data = phantoms(n=60, size=32)
    cfg = run_config(data, tmp_path, "clock")
    first = run_federated(cfg, quiet=True)  # the stopped-and-resumed run below is the second run of cfg
    rounds = {(r, m): v for r, s, i, m, v in _rows(first) if s == "round"}
    assert [rounds[(r, "selected")] for r in (1, 2, 3)] == [3, 3, 3]
    assert sum(rounds[(r, "stragglers")] for r in (1, 2, 3)) > 0  # slow clients missed the deadline
    assert rounds[(3, "sim_time_s")] == pytest.approx(sum(rounds[(r, "sim_round_s")] for r in (1, 2, 3)))
    assert all(rounds[(r, "sim_round_s")] <= 2.0 for r in (1, 2, 3))
    summary = json.loads((first / "summary.json").read_text())
    assert summary["sim_hours"] == pytest.approx(rounds[(3, "sim_time_s")] / 3600)
    assert summary["bytes"]["down"] == sum(rounds[(r, "bytes_down")] for r in (1, 2, 3)) > 0
    assert (first / "accuracy_sim_hours.png").is_file()

    stopped = stopped_after_round_1(cfg, tmp_path / "stopped")
    run_federated(resume=stopped, quiet=True)
    assert _rows(stopped) == _rows(first)  # the same stragglers, simulated times and metrics
    assert json.loads((stopped / "summary.json").read_text())["sim_hours"] == summary["sim_hours"]


def test_the_report_gives_simulated_hours_to_the_threshold_beside_rounds():
    import pandas as pd

    from cxrfl_ray.report import config_table, trial_outcomes

    trials = pd.DataFrame({
        "trial": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "status": "TERMINATED",
        "param:fl.deadline_s": [1.0] * 3 + [2.0] * 3 + [2.0] * 3, "round": [1, 2, 3] * 3,
        "central/val/jaccard": [0.5, 0.9, 0.95, 0.5, 0.6, 0.95, 0.2, 0.3, 0.4],
        "round/server/sim_time_s": [3600, 7200, 10800, 1800, 3600, 5400, 100, 200, 300]})
    out = trial_outcomes(trials, "central/val/jaccard", "max", 0.9, None).set_index("trial")
    assert out["rounds_to_threshold"].fillna(-1).to_dict() == {"a": 2, "b": 3, "c": -1}  # c never reached it
    assert out["hours_to_threshold"].fillna(-1).to_dict() == {"a": 2.0, "b": 1.5, "c": -1}
    cells = config_table(out.reset_index(), ["param:fl.deadline_s"]).set_index("param:fl.deadline_s")
    assert cells.loc[1.0, "hours_to_threshold"] == "2.000" and cells.loc[2.0, "hours_to_threshold"] == "1.500 (1/2 seeds)"


@pytest.mark.timeout(600)
def test_partial_work_trains_the_steps_that_fit_the_deadline_on_the_engine(phantoms, tmp_path, ray_session):
    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.fl.system.profiles import draw_profiles

    cfg = run_config(phantoms(n=60, size=32), tmp_path, "partial", overselect=1.0, straggler="partial")
    speed = draw_profiles(cfg.system, 6, cfg.seed).speed
    run = run_federated(cfg, quiet=True)
    steps = {(r, int(i)): v for r, s, i, m, v in _rows(run) if s == "client" and m == "steps"}
    assert steps and {speed[c] for _, c in steps} == {1.0, 5.0}  # both kinds trained
    for (_, cid), done in steps.items():
        # 2 s deadline: a fast client's 4 steps take 1 s; a slow one's 1.25 s each: 1 fits
        assert done == (4 if speed[cid] == 1.0 else 1), (cid, speed[cid], done)
    rounds = {(r, m): v for r, s, i, m, v in _rows(run) if s == "round"}
    assert all(rounds[(r, "stragglers")] == 0 and rounds[(r, "sim_round_s")] <= 2.0 for r in (1, 2, 3))


@pytest.mark.timeout(600)
def test_compressed_updates_travel_smaller_and_average_to_nearly_the_same_model(phantoms, tmp_path, ray_session):
    """One round of resnet18 (tensors large enough that the int8 scales' headers do not matter):
    a quarter of the upload bytes, the same download, and a global update within 2% of the
    uncompressed one (int8's error per element is at most half its tensor's step)."""
    import torch
    from safetensors.torch import load_file

    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.tasks.models import create_model
    from cxrfl_ray.tasks.training import seed_everything

    data = phantoms(n=60, size=32)

    def cfg(codec):
        base = run_config(data, tmp_path, codec, compression=codec, deadline_s=None, overselect=1.0, rounds=1)
        return build_config({**base.model_dump(mode="json"), "model": {"name": "resnet18", "norm": "group"}})

    runs = {codec: run_federated(cfg(codec), quiet=True) for codec in ("none", "int8")}
    rows = {codec: {(r, s, i, m): v for r, s, i, m, v in _rows(run)} for codec, run in runs.items()}
    up, down = ({codec: rows[codec][(1, "round", "server", key)] for codec in runs} for key in ("bytes_up", "bytes_down"))
    assert down["int8"] == down["none"] and up["int8"] == pytest.approx(0.25 * up["none"], rel=0.02)
    seed_everything(0)  # the round's starting global, as the server builds it
    start = create_model("resnet18", "classification", 1, 3, norm="group").state_dict()
    new = {codec: load_file(str(run / "last.safetensors")) for codec, run in runs.items()}
    keys = [k for k in start if start[k].is_floating_point()]
    step = torch.cat([(new["none"][k] - start[k]).flatten() for k in keys])
    error = torch.cat([(new["int8"][k] - new["none"][k]).flatten() for k in keys])
    assert 0 < error.norm() / step.norm() < 0.02


def test_resume_refuses_a_trace_edited_after_rounds_ran_with_it(tmp_path):
    from flwr.app import ArrayRecord as Record

    from cxrfl_ray.config import ConfigError
    from cxrfl_ray.fl.state import check_resume, save_state

    cfg = _cfg(tmp_path)
    save_state(tmp_path, 1, Record({"w": Array(np.zeros(3, np.float32))}), object(), {"best": None}, cfg)
    check_resume(tmp_path, cfg)  # as it was: fine
    trace = tmp_path / "profiles.csv"
    trace.write_text(trace.read_text().replace("0,1.0,8,8", "0,3.0,8,8"))
    with pytest.raises(ConfigError, match=r"--resume .*: .*profiles.csv changed \(or went\) after rounds ran with it"):
        check_resume(tmp_path, cfg)
