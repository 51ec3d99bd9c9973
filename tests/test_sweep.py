"""`cxrfl sweep` and `cxrfl report`: real Ray Tune trials, each a real federated simulation on
the session's Ray; specs are validated before anything starts; a killed sweep resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from cxrfl_ray.config import ConfigError
from cxrfl_ray.report import NOT_REACHED, report, rounds_to_reach
from cxrfl_ray.sweep import estimate_cost, load_spec, run_sweep, validate
from tests.conftest import kill_process_tree

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
CONFIGS = sorted((SMOKE.parent).glob("*.yaml"))


def smoke_overrides(tmp: Path) -> list[str]:
    return [f"base.data.path={tmp / 'phantoms'}", "base.tracking.wandb=offline"]


def metrics_only(frame: pd.DataFrame) -> pd.DataFrame:
    """The reproducible part of trials.parquet: parameters and metrics, no timings or paths."""
    keep = [c for c in frame.columns if c.startswith("param:") or c == "round"
            or (c.count("/") == 2 and not c.endswith("_seconds") and not c.startswith("round/"))]
    return frame[keep].sort_values(["param:train.epochs", "param:fl.clients_per_round", "round"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("smoke")
    return run_sweep(SMOKE, out=tmp / "sweep", overrides=smoke_overrides(tmp), quiet=True), tmp


@pytest.mark.parametrize("spec", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_specs_parse(spec, tmp_path):
    if "sources" in yaml.safe_load(spec.read_text()):  # a study spec (cxrfl study), not a sweep
        from cxrfl_ray.study_spec import load_study

        # Its hospitals' folders may be absent here (../shared); everything else must parse.
        loaded = load_study(spec, [f"sources=[{tmp_path}]"])
    elif "methods" in yaml.safe_load(spec.read_text()):  # a benchmark spec (cxrfl benchmark)
        from cxrfl_ray.benchmark_spec import load_benchmark

        loaded = load_benchmark(spec)
    else:
        loaded = load_spec(spec)
    assert loaded.name == spec.stem


@pytest.mark.parametrize("change, message", [
    ({"space": {"train.lr": {"grid": [0.1, -1.0]}}}, r"(?s)trial train.lr=-1.0.*train.lr: Input should be greater than 0"),
    ({"space": {"train.lr": {"between": [1, 2]}}}, r"space.train.lr: give exactly one of grid, choice"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, r"loguniform: bounds must be > 0"),
    ({"space": {"fl.clients_per_round": {"grid": [1, 5]}}}, r"(?s)clients_per_round=5.*more than partition.clients 3"),
    ({"search": "optuna", "space": {"train.lr": {"grid": [0.1]}}}, r"optuna: use choice instead of grid"),
    ({"metric": "jaccard"}, r"metric 'jaccard': write scope/id/name, e.g. central/val/jaccard"),
])
def test_bad_specs_are_refused_before_ray_starts(tmp_path, phantoms, change, message):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(change)
    data["base"]["data"]["path"] = str(phantoms(n=120, size=48))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        validate(load_spec(path))


def test_dry_run_cost_counts_each_grid_point_from_the_spec(tmp_path, phantoms):
    data = yaml.safe_load(SMOKE.read_text())
    data["base"]["data"]["path"] = str(phantoms(n=120, size=48))
    data.update(seeds=3, client_slots=None)
    path = tmp_path / "cost.yaml"
    path.write_text(yaml.safe_dump(data))
    rows = estimate_cost(load_spec(path), throughput=100.0)
    assert sorted((r["train.epochs"], r["fl.clients_per_round"]) for r in rows) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:  # smoke base: 3 rounds, 4 steps of batch 8, 0.5 CPU per client, 0.5 for the driver
        cohort, epochs = r["fl.clients_per_round"], r["train.epochs"]
        assert r["trials"] == 3 and r["gpus_per_trial"] == 0
        assert r["cpus_per_trial"] == 0.5 + 0.5 * cohort
        assert r["train_images"] == 3 * cohort * epochs * 4 * 8
        eval_images = r["eval_images"]
        assert eval_images % 4 == 0 and 0 < eval_images / 4 < 120  # rounds 0..3 over the central/site rows
        seconds = r["train_images"] / cohort / 100.0 + eval_images / 300.0
        assert r["hours_per_trial"] == round(seconds / 3600, 3)


def test_rounds_to_reach_is_the_first_round_at_the_threshold():
    assert rounds_to_reach([0, 1, 2, 3], [0.1, 0.5, 0.4, 0.9], 0.5, "max") == 1
    assert rounds_to_reach([0, 1, 2], [1.0, 0.8, 0.7], 0.75, "min") == 2
    assert rounds_to_reach([0, 1], [0.1, 0.2], 0.92, "max") is None


@pytest.mark.timeout(600)
def test_smoke_sweep_writes_every_trial_round_and_a_report_that_matches(smoke_sweep):
    sweep, _ = smoke_sweep
    trials = pq.read_table(sweep / "trials.parquet").to_pandas()
    spec = load_spec(sweep / "spec.yaml")
    assert sorted(trials["trial"].unique().tolist()) == sorted(p.name for p in (sweep / "trials").iterdir() if p.is_dir())
    assert trials["trial"].nunique() == 4 and set(trials["status"]) == {"TERMINATED"}
    assert set(zip(trials["param:train.epochs"], trials["param:fl.clients_per_round"])) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert sorted(trials.groupby("trial")["round"].apply(list).apply(sorted).tolist()) == [[0, 1, 2, 3]] * 4
    for run in trials["run_dir"].unique():
        run = Path(run)
        # Each trial is a whole run folder, and a W&B run grouped by the sweep's name.
        assert json.loads((run / "summary.json").read_text())["rounds"] == 3
        assert yaml.safe_load((run / "config.yaml").read_text())["tracking"]["group"] == "smoke"
        assert list((run / "wandb").glob("offline-run-*"))
    # Each trial ran with its own parameters: its cohort size, and local epochs x steps per epoch.
    trained = trials[trials["round"] >= 1]
    assert (trained["round/server/selected"] == trained["param:fl.clients_per_round"]).all()
    for run, epochs in trained.groupby("run_dir")["param:train.epochs"].first().items():
        clients = pq.read_table(Path(run) / "metrics.parquet").to_pandas()
        steps = clients[(clients["scope"] == "client") & (clients["metric"] == "steps")]["value"]
        assert set(steps) == {4 * epochs}

    md = report(sweep)
    configs = pd.read_csv(md.parent / "configs.csv")
    # The first sweep a user sees learns: every trial's best round is after round 0, and more local
    # epochs give a better final model at each cohort size.
    outcomes = pd.read_csv(md.parent / "trials.csv")
    assert (outcomes["best_round"] > 0).all()
    final = outcomes.set_index(["train.epochs", "fl.clients_per_round"])["final"]
    assert final[(2, 1)] > final[(1, 1)] and final[(2, 2)] > final[(1, 2)]
    metric, threshold = "central/val/jaccard", spec.threshold
    for row in configs.itertuples():
        mine = trials[(trials["param:train.epochs"] == row[1]) & (trials["param:fl.clients_per_round"] == row[2])]
        series = mine.dropna(subset=["round"]).sort_values("round")
        assert float(row.final) == pytest.approx(series[metric].iloc[-1], abs=1e-4)
        assert float(row.best) == pytest.approx(series[metric].max(), abs=1e-4)
        reached = rounds_to_reach(series["round"].tolist(), series[metric].tolist(), threshold, "max")
        assert row.rounds_to_threshold == (NOT_REACHED if reached is None else f"{reached:.1f}")
    text = md.read_text()
    assert "## Rounds to reach central/val/jaccard ≥ 0.4" in text and "| train.epochs | fl.clients_per_round=1 |" in text
    assert "**Trend.** Median rounds to 0.4" in text and "For the final `central/val/jaccard`, train.epochs" in text
    for png in ("curves.png", "heatmap_final_train.epochs_x_fl.clients_per_round.png"):
        assert (md.parent / png).stat().st_size > 1000 and f"]({png})" in text


@pytest.mark.timeout(900)
def test_a_killed_sweep_resumes_only_unfinished_trials(smoke_sweep, tmp_path, ray_session):
    reference, data_tmp = smoke_sweep
    out = tmp_path / "sweep"
    half = ["space={train.epochs: {grid: [1, 2]}, fl.clients_per_round: {grid: [1]}}"]  # 2 of the 4 trials
    cmd = [sys.executable, "-m", "cxrfl_ray.cli", "sweep", str(SMOKE), "--out", str(out), "--quiet",
           "--set", "max_retries=0", *sum((["--set", o] for o in smoke_overrides(data_tmp) + half), [])]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            done = list(out.glob("trials/*/summary.json"))
            if done:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.5)
        assert done, "no trial finished in time"
    finally:
        kill_process_tree(proc)
    finished = {p.parent.name: p.parent.joinpath("metrics.parquet").stat().st_mtime_ns for p in out.glob("trials/*/summary.json")}
    assert len(finished) == 1  # the first of two trials finished, the second was killed
    with pytest.raises(ConfigError, match="exists; continue it with --resume"):
        run_sweep(SMOKE, out=out, overrides=smoke_overrides(data_tmp) + half + ["max_retries=0"])
    with pytest.raises(ConfigError, match="differs from the spec this sweep started with .* in: max_retries"):
        run_sweep(SMOKE, out=out, resume=True, overrides=smoke_overrides(data_tmp) + half)
    run_sweep(SMOKE, out=out, resume=True, quiet=True, overrides=smoke_overrides(data_tmp) + half + ["max_retries=0"])
    for name, mtime in finished.items():  # finished trials were not run again
        assert (out / "trials" / name / "metrics.parquet").stat().st_mtime_ns == mtime
    resumed = pq.read_table(out / "trials.parquet").to_pandas()
    assert resumed["trial"].nunique() == 2 and bool(resumed["finished"].all())
    full = pq.read_table(reference / "trials.parquet").to_pandas()
    pd.testing.assert_frame_equal(metrics_only(resumed), metrics_only(full[full["param:fl.clients_per_round"] == 1]))


@pytest.mark.timeout(300)
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_trial_is_retried_and_reported(tmp_path, phantoms, ray_session):
    data = yaml.safe_load(SMOKE.read_text())
    data["space"] = {"train.device": {"grid": ["cuda"]}}
    data["base"]["data"]["path"] = str(phantoms(n=120, size=48))
    data["max_retries"] = 1
    spec = tmp_path / "failing.yaml"
    spec.write_text(yaml.safe_dump(data))
    sweep = run_sweep(spec, out=tmp_path / "sweep", quiet=True)
    trials = pq.read_table(sweep / "trials.parquet").to_pandas()
    assert trials["status"].tolist() == ["ERROR"] and trials["attempts"].tolist() == [2]  # tried, retried once
    assert "no CUDA device is available" in trials["error"].iloc[0]
    text = report(sweep).read_text()
    assert "1 trials (1 failed)" in text and "no CUDA device" in text


def tiny_spec(tmp_path: Path, data: Path, **change) -> Path:
    """The smoke spec cut to one round of two clients, one trial at a time, no retries."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["base"]["data"]["path"] = str(data)
    spec["base"]["partition"] = {"clients": 2}
    spec["base"]["fl"].update(rounds=1, clients_per_round=2)
    spec.update({"space": {}, "max_concurrent": 1, "max_retries": 0, **change})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_trial_that_cannot_fit_the_cluster_is_refused_before_tune_starts(tmp_path, phantoms, ray_session):
    # ray_session has 2 CPUs: a 1-CPU driver and 2 client slots of 1 CPU can never be placed.
    spec = tiny_spec(tmp_path, phantoms(n=120, size=48), client_slots=2, driver_cpus=1)
    data = yaml.safe_load(spec.read_text())
    data["base"]["fl"]["client_num_cpus"] = 1
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        run_sweep(spec, out=tmp_path / "sweep", quiet=True)
    assert str(info.value) == (
        f"sweep spec {spec}: a trial's placement group needs 3 CPUs and 0 GPUs (driver_cpus 1, driver_gpus 0, "
        "plus 2 client slot(s) of fl.client_num_cpus 1, fl.client_num_gpus 0), but this Ray cluster (2 CPUs, "
        "0 GPUs on 1 node(s)) fits 1 client slot(s) beside the driver, and Tune would wait for it forever: "
        "lower client_slots, fl.client_num_cpus, driver_cpus")
    assert not (tmp_path / "sweep").exists()  # refused before Tune (or the sweep folder) started


@pytest.mark.timeout(600)
def test_a_trial_whose_run_fails_is_failed_and_a_finished_one_is_not_rerun_or_recounted(tmp_path, phantoms,
                                                                                         ray_session):
    # Rate 0.99: every client of the only round fails, so the run raises (fl.min_replies 1).
    spec = tiny_spec(tmp_path, phantoms(n=120, size=48),
                     space={"faults.client_failure_rate": {"grid": [0.0, 0.99]}})
    sweep = run_sweep(spec, out=tmp_path / "sweep", quiet=True)
    trials = pq.read_table(sweep / "trials.parquet").to_pandas().drop_duplicates("trial")
    by_rate = trials.set_index("param:faults.client_failure_rate")
    assert by_rate.loc[0.0, ["status", "finished", "attempts"]].tolist() == ["TERMINATED", True, 1]
    assert by_rate.loc[0.99, ["status", "finished", "attempts"]].tolist() == ["ERROR", False, 1]
    assert "injected failure of client" in by_rate.loc[0.99, "error"]
    text = report(sweep).read_text()
    assert "2 trials (1 failed)" in text and "## Failed trials" in text
    configs = pd.read_csv(sweep / "report" / "configs.csv").set_index("faults.client_failure_rate")
    assert configs.loc[0.99, ["seeds", "failed"]].tolist() == [0, 1] and configs.loc[0.0, "failed"] == 0

    # Tune starts both trials again (its state is gone): the finished one only reports its result.
    finished = Path(by_rate.loc[0.0, "run_dir"]) / "metrics.parquet"
    written = finished.stat().st_mtime_ns
    import shutil

    shutil.rmtree(sweep / "tune")
    run_sweep(spec, out=sweep, resume=True, quiet=True)
    again = pq.read_table(sweep / "trials.parquet").to_pandas().drop_duplicates("trial")
    again = again.set_index("param:faults.client_failure_rate")
    assert finished.stat().st_mtime_ns == written
    assert again.loc[0.0, ["status", "finished", "attempts"]].tolist() == ["TERMINATED", True, 1]
    assert again.loc[0.99, ["status", "attempts"]].tolist() == ["ERROR", 2]  # it ran (and failed) again


@pytest.mark.timeout(600)
def test_asha_stops_a_weak_trial_early_and_the_report_shows_it_stopped(tmp_path, phantoms, ray_session):
    """Two trials, one at a time: lr 0.01 learns, lr 1e-7 cannot. ASHA (grace 1, factor 2) has the
    first trial's round-1 result at its rung when the second reaches round 1, and stops it there."""
    spec = tiny_spec(tmp_path, phantoms(n=120, size=48), space={"train.lr": {"grid": [0.01, 1e-7]}},
                     scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    data = yaml.safe_load(spec.read_text())
    data["base"]["fl"]["rounds"] = 3
    spec.write_text(yaml.safe_dump(data))
    sweep = run_sweep(spec, out=tmp_path / "sweep", quiet=True)
    trials = pq.read_table(sweep / "trials.parquet").to_pandas()
    last = trials.groupby("param:train.lr")["round"].max()
    assert last.to_dict() == {1e-7: 1, 0.01: 3} and set(trials["status"]) == {"TERMINATED"}
    text = report(sweep).read_text()
    weak = trials.loc[trials["param:train.lr"] == 1e-7, "trial"].iloc[0]
    assert "## Stopped early by ASHA (1 of 2 trials)" in text and f"- `{weak}`: stopped after round 1" in text


@pytest.mark.timeout(600)
def test_optuna_searches_the_space_through_ray_tune_with_its_seed(tmp_path, phantoms, ray_session):
    """Optuna's TPE (installed with the project) proposes each trial's point inside the space;
    the report ranks the parameters with Optuna's fANOVA (not a grid)."""
    space = {"train.lr": {"loguniform": [0.001, 0.05]}, "train.epochs": {"choice": [1, 2]}}
    spec = tiny_spec(tmp_path, phantoms(n=120, size=48), space=space, search="optuna", num_samples=4)
    sweep = run_sweep(spec, out=tmp_path / "sweep", quiet=True)
    trials = pq.read_table(sweep / "trials.parquet").to_pandas().drop_duplicates("trial")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    assert trials["param:train.lr"].between(0.001, 0.05).all() and trials["param:train.lr"].nunique() == 4
    assert set(trials["param:train.epochs"]) <= {1, 2}
    for run, epochs in trials.set_index("run_dir")["param:train.epochs"].items():  # each trial ran its point
        assert yaml.safe_load((Path(run) / "config.yaml").read_text())["train"]["epochs"] == epochs
    text = report(sweep).read_text()
    assert "Optuna's fANOVA importance (not a full grid; main effects only)" in text


def test_seeds_vary_the_model_and_selection_but_not_the_partition_unless_asked(tmp_path, phantoms):
    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.sweep import trial_config

    data = yaml.safe_load(SMOKE.read_text())
    data["base"]["data"]["path"] = str(phantoms(n=120, size=48))
    data["base"]["partition"] = {"clients": 3, "scheme": "dirichlet", "alpha": 0.5}
    plans = {}
    for mode in ("fixed", "vary"):
        spec = load_spec(_write(tmp_path / f"{mode}.yaml", {**data, "seeds": 2, "partition_seed": mode}))
        for seed in (0, 1):
            cfg = trial_config(spec, {"seed": seed})
            assert cfg.seed == seed
            plans[(mode, seed)] = [list(map(int, rows)) for rows in prepare(cfg).plan.clients]
    assert plans[("fixed", 0)] == plans[("fixed", 1)] == plans[("vary", 0)]
    assert plans[("vary", 1)] != plans[("vary", 0)]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
