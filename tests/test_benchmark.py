"""`cxrfl benchmark`: pooled, local-only and federated models as real Ray Tune trials on phantoms
(2 training sites + 1 held out, 32 px, a one-conv model, 2 rounds of 2 steps); the CSV is what the
run folders hold, every model has the same budget, a rerun trains only what is missing, and a bad
spec is one error line before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.config import load_config

TINY = Path(__file__).resolve().parents[1] / "tune_configs" / "benchmark_tiny.yaml"
TESTS = {"pooled", "site:site0", "site:site1", "holdout:site2"}
ROUNDS, CLIENTS, STEPS, BATCH = 2, 2, 2, 4  # benchmark_tiny's budget: 32 rows for every model


def run(out: Path, data: Path, *extra: str) -> int:
    return cxrfl(["benchmark", str(TINY), "--out", str(out), "--quiet", "--set", f"base.data.path={data}", *extra])


@pytest.fixture(scope="module")
def data(phantoms) -> Path:
    return phantoms(n=90, size=32, sites=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, data, ray_session) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    assert run(out, data) == 0
    return out


def frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "benchmark.csv"), pd.read_csv(out / "trials.csv")


def best_round(run_dir: Path) -> int:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["best_round"] if "best_round" in summary else summary["best_epoch"]


def test_csv_cells_equal_the_run_folders_metrics(bench):
    csv, trials = frames(bench)
    assert list(csv.columns) == ["task", "method", "seed", "train_site", "test", "metric", "value"]
    models = set(zip(trials["method"], trials["train_site"]))
    assert models == {("pooled", "all"), ("local", "site0"), ("local", "site1"), ("fedavg", "all"), ("fedprox", "all")}
    for t in trials.itertuples():
        run_dir = bench / t.run
        mine = csv[(csv["method"] == t.method) & (csv["train_site"] == t.train_site) & (csv["seed"] == t.seed)]
        assert set(mine["test"]) == TESTS, t.run  # pooled test, each site's test rows, the held-out site
        assert {"jaccard", "dice", "loss"} <= set(mine["metric"]) and "examples" not in set(mine["metric"])
        cells = {(r.test, r.metric): r.value for r in mine.itertuples()}
        metrics = pq.read_table(run_dir / "metrics.parquet").to_pandas()
        # The model is the best checkpoint by central val: the round/epoch with the highest val Jaccard.
        val = metrics[(metrics["scope"] == "central") & (metrics["id"] == "val") & (metrics["metric"] == "jaccard")]
        assert best_round(run_dir) == int(val.loc[val["value"].idxmax(), "round"]) == t.best_at
        at_best = metrics[metrics["round"] == t.best_at]
        for (test, metric), value in cells.items():
            scope, vid = ("central", "test") if test == "pooled" else test.split(":")
            row = at_best[(at_best["scope"] == scope) & (at_best["id"] == vid) & (at_best["metric"] == metric)]
            assert value == pytest.approx(float(row["value"].iloc[0]), rel=1e-12), (t.run, test, metric)
        if t.kind != "federated":  # the baseline's own final evaluation of best.safetensors agrees
            test = json.loads((run_dir / "summary.json").read_text())["test"]
            assert cells[("pooled", "jaccard")] == pytest.approx(test["central:test"]["jaccard"])
            assert cells[("holdout:site2", "dice")] == pytest.approx(test["holdout:site2"]["dice"])


def test_a_federated_cell_is_its_best_checkpoint_evaluated_again(bench):
    """Loading fedavg's best.safetensors and evaluating it afresh gives the CSV's numbers."""
    from cxrfl_ray.experiment import evaluate_views, prepare
    from cxrfl_ray.tasks.checkpoint import load_checkpoint

    csv, trials = frames(bench)
    run_dir = bench / trials.set_index("method").loc["fedavg", "run"]
    prep = prepare(load_config(run_dir / "config.yaml"))
    model, _, _ = load_checkpoint(run_dir / "best.safetensors", task="segmentation")
    loss_fn = prep.task.make_loss(prep.cfg.loss_name, None)
    fresh = evaluate_views(prep, model.eval(), "cpu", loss_fn, [("central", "test"), ("holdout", "site2")])
    mine = csv[csv["method"] == "fedavg"].set_index(["test", "metric"])["value"]
    assert mine[("pooled", "jaccard")] == pytest.approx(fresh[("central", "test")]["jaccard"], rel=1e-6)
    assert mine[("holdout:site2", "jaccard")] == pytest.approx(fresh[("holdout", "site2")]["jaccard"], rel=1e-6)


def test_every_method_saw_the_same_budget(bench):
    _, trials = frames(bench)
    assert set(trials["rows_seen"]) == {ROUNDS * CLIENTS * STEPS * BATCH}
    federated = trials[trials["kind"] == "federated"]
    assert set(federated["rounds"]) == {ROUNDS} and set(federated["epochs"]) == {1}
    assert set(trials[trials["kind"] != "federated"]["epochs"]) == {ROUNDS * CLIENTS}  # epochs of 2 steps
    for t in federated.itertuples():  # counted from the clients' own replies, not from the config
        clients = pq.read_table(bench / t.run / "metrics.parquet").to_pandas().query("scope == 'client'")
        steps = clients[clients["metric"] == "steps"]
        assert len(steps) == ROUNDS * CLIENTS and set(steps["value"]) == {STEPS}
    local = trials[trials["kind"] == "local"].set_index("train_site")
    pooled = trials[trials["kind"] == "pooled"]["train_rows"].iloc[0]
    assert local.loc["site0", "train_rows"] + local.loc["site1", "train_rows"] == pooled  # the held-out site never trains
    md = (bench / "benchmark.md").read_text()
    assert "every model saw 32 training rows" in md and "| 2 rounds x 1 epoch(s) x 2 clients; epoch = 2 steps of 4 | 32 |" in md


def test_the_report_states_mean_and_n_and_says_where_fl_beats_local_only(bench):
    csv, _ = frames(bench)
    md = (bench / "benchmark.md").read_text()
    fedavg = csv[(csv["method"] == "fedavg") & (csv["metric"] == "jaccard")].set_index("test")["value"]
    assert f"| {fedavg['pooled']:.4f} (n=1) |" in md and "site2 (held out)" in md
    assert "![segmentation per site](segmentation_sites.png)" in md
    assert (bench / "segmentation_sites.png").stat().st_size > 5000
    local = csv[(csv["method"] == "local") & (csv["metric"] == "jaccard") & (csv["test"] == "holdout:site2")]
    best = local.sort_values("value").iloc[-1]
    assert f"(trained on {best.train_site}: {best.value:.3f})" in md
    fl = csv[(csv["method"].isin(["fedavg", "fedprox"])) & (csv["metric"] == "jaccard") & (csv["test"] == "holdout:site2")]
    for r in fl.itertuples():
        assert f"{r.method} {r.value:.3f}" in md.split("**Held-out sites.**")[1]


def test_held_out_finding_is_computed_from_the_numbers():
    from cxrfl_ray.benchmark_report import held_out_finding

    values = {("local", "site0"): (0.60, 0.62), ("local", "site1"): (0.70, 0.72), ("fedavg", "all"): (0.80, 0.82),
              ("fedbn", "all"): (0.68, 0.72), ("scaffold", "all"): (0.50, 0.52)}
    frame = pd.DataFrame([{"method": m, "seed": seed, "train_site": site, "test": "holdout:h", "metric": "jaccard",
                           "value": v} for (m, site), pair in values.items() for seed, v in enumerate(pair)])
    records = pd.DataFrame({"method": ["local", "fedavg", "fedbn", "scaffold"],
                            "kind": ["local", "federated", "federated", "federated"]})
    # The best local-only model is site1's (0.71); fedbn's 0.70 is below it by less than its sd (0.028).
    assert held_out_finding(frame, records, "segmentation") == (
        "segmentation: On held-out h (jaccard, mean over seeds), against the best local-only model (trained on "
        "site1: 0.710), FL beats it with fedavg 0.810 and does not with fedbn 0.700 (within the seeds' spread), "
        "scaffold 0.510.")
    assert held_out_finding(frame[frame["method"] != "fedavg"], records[records["method"] != "fedavg"],
                            "segmentation").endswith("FL does not beat it with any method (fedbn 0.700 (within the "
                                                     "seeds' spread), scaffold 0.510).")
    assert "no site is held out" in held_out_finding(frame.assign(test="site:h"), records, "segmentation")


def test_a_rerun_trains_only_what_is_missing(bench, data, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(bench, out)
    written = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.parquet")}
    assert len(written) == 5
    # Another config in the same folder is refused before anything starts, naming the field.
    assert run(out, data, "--set", "base.train.lr=0.02") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cxrfl benchmark: error: ")
    assert "holds a run of another config (train.lr: 0.03 -> 0.02)" in err
    # A second seed: seed 0's five trials are read back, seed 1's five run.
    assert run(out, data, "--seeds", "2") == 0
    assert "10 trials, 5 finished before, 5 to run" in capsys.readouterr().out
    for name, mtime in written.items():
        assert (out / "trials" / name / "metrics.parquet").stat().st_mtime_ns == mtime, name
    csv, trials = frames(out)
    assert len(trials) == 10 and set(trials["seed"]) == {0, 1}
    first = frames(bench)[0]
    pd.testing.assert_frame_equal(csv[csv["seed"] == 0].reset_index(drop=True), first.reset_index(drop=True))
    fedavg = csv[(csv["method"] == "fedavg") & (csv["metric"] == "jaccard") & (csv["test"] == "pooled")]
    assert fedavg["value"].nunique() == 2  # the seed changes the model (init, data order)
    values = fedavg["value"]
    assert f"| {values.mean():.4f} ± {values.std(ddof=1):.4f} (n=2) |" in (out / "benchmark.md").read_text()
    # Nothing left to run: the report is rebuilt, no trial (and no Ray Tune) starts.
    assert run(out, data, "--seeds", "2") == 0
    assert "10 trials, 10 finished before, 0 to run" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--set", "methods=[pooled, fedavgg]"], "methods.1.name: unknown method 'fedavgg' (did you mean fedavg?)"),
    (["--set", "seeds=0"], "seeds: Input should be greater than or equal to 1"),
    (["--set", "methods=[fedprox]"], "methods.0: method fedprox: give options.proximal_mu > 0"),
    (["--set", "methods=[fedavg, fedavg]"], "methods: fedavg listed twice"),
    (["--set", "tasks={segmentaton: {}}"], "tasks.segmentaton.[key]: Input should be 'segmentation' or 'classification'"),
    (["--set", "base.train.lr=-1"], "segmentation segmentation: train.lr: Input should be greater than 0"),
    (["--methods", "pooled,lokal"], "--methods lokal: unknown method 'lokal' (did you mean local?)"),
    (["--seeds", "0"], "--seeds 0: at least 1"),
    (["--set", "base.partition.scheme=iid"], "partition.clients 'sites' needs partition.scheme 'site'"),
    (["--methods", "fedbn"], "methods fedbn: fl.strategy.name fedbn keeps BatchNorm local, but model.name "
                             "'tiny-conv-seg' has no BatchNorm layer"),
])
def test_a_bad_spec_is_one_error_line_naming_it(tmp_path, data, capsys, args, message):
    assert run(tmp_path / "out", data, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cxrfl benchmark: error: ") and message in err, err
    assert str(TINY) in err or message.startswith("--")
    assert not (tmp_path / "out").exists()


def test_a_config_file_is_a_benchmark_of_its_own_experiment(tmp_path, data):
    """``cxrfl benchmark CONFIG --methods ... --seeds N``: the config's strategy options are fedprox's."""
    from cxrfl_ray.benchmark_spec import load_benchmark, plan_trials

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "exp", "task": "segmentation", "seed": 5, "data": {"path": str(data), "size": 32},
        "model": {"name": "tiny-conv-seg"}, "partition": {"scheme": "iid", "clients": 3},
        "train": {"batch_size": 4, "steps": 3}, "fl": {"rounds": 2, "clients_per_round": 2,
                                                        "strategy": {"name": "fedprox", "options": {"proximal_mu": 0.5}}}}))
    spec = load_benchmark(config, methods=["pooled", "local", "fedprox"], seeds=2)
    trials = plan_trials(spec, tmp_path / "out")
    assert sorted(t.label for t in trials) == sorted(
        [f"segmentation/{m}/seed{s}" for m in ("pooled", "fedprox") for s in (5, 6)]
        + [f"segmentation/local/client{i}/seed{s}" for i in range(3) for s in (5, 6)])  # iid clients mix sites
    fedprox = [t for t in trials if t.method == "fedprox"][0]
    assert fedprox.cfg.fl.strategy.options == {"proximal_mu": 0.5}
    assert [m.title for m in load_benchmark(config).methods] == ["pooled", "local", "fedprox"]  # its own strategy
    # 2 rounds x 2 of 3 clients x 3 steps: 12 steps, so a baseline gets 4 epochs of 3 steps.
    assert {t.cfg.train.epochs for t in trials if t.kind != "federated"} == {4}


def test_the_shipped_spec_plans_every_method_on_the_same_budget(phantoms, tmp_path):
    """benchmark_sites.yaml: 2 tasks x 3 seeds x (pooled, 3 local-only, 5 federated), all valid
    (FedBN finds BatchNorm layers, SCAFFOLD plain SGD) before anything runs."""
    from cxrfl_ray.benchmark_spec import load_benchmark, plan_trials

    spec = load_benchmark(TINY.parent / "benchmark_sites.yaml", [f"base.data.path={phantoms(n=160, size=32)}"])
    trials = plan_trials(spec, tmp_path)
    assert len(trials) == 2 * 3 * 9
    assert {t.method for t in trials if t.kind == "federated"} == {"fedavg", "fedprox", "fedbn", "scaffold", "fednova"}
    assert {t.train_site for t in trials if t.kind == "local"} == {"site0", "site1", "site2"}  # site3 held out
    # 10 rounds x 3 clients x 10 steps = 300 steps: 30 epochs of 10 steps for pooled and local-only.
    assert {t.cfg.train.epochs for t in trials if t.kind != "federated"} == {30}
    assert {(t.cfg.fl.rounds, t.cfg.clients_per_round) for t in trials if t.kind == "federated"} == {(10, 3)}


@pytest.mark.timeout(600)
def test_fedbn_scaffold_and_fednova_run_and_fedbn_reports_each_sites_own_model(data, tmp_path, ray_session):
    """A BatchNorm model (FedBN keeps it local) and plain SGD (SCAFFOLD's option II)."""
    out = tmp_path / "bn"
    assert run(out, data, "--methods", "local,fedbn,scaffold,fednova", "--set", "tasks.segmentation.model.name=small-unet-seg",
               "--set", "base.train.optimizer=sgd", "--set", "base.train.momentum=0", "--set", "base.train.lr=0.1") == 0
    csv, trials = frames(out)
    assert set(trials["rows_seen"]) == {ROUNDS * CLIENTS * STEPS * BATCH}
    assert set(trials["method"]) == {"local", "fedbn", "scaffold", "fednova"}
    fedbn = trials.set_index("method").loc["fedbn"]
    metrics = pq.read_table(out / fedbn["run"] / "metrics.parquet").to_pandas()
    personal = metrics[(metrics["scope"] == "personal") & (metrics["round"] == ROUNDS) & (metrics["metric"] == "jaccard")]
    mine = csv[(csv["method"] == "fedbn") & (csv["metric"] == "jaccard")].set_index("test")["value"]
    assert set(personal["id"]) == {"site0", "site1"}  # each site's own model, the last round's
    for r in personal.itertuples():
        assert mine[f"personal:{r.id}"] == pytest.approx(r.value, rel=1e-12)
    assert not csv[(csv["method"] != "fedbn")]["test"].str.startswith("personal:").any()
    md = (out / "benchmark.md").read_text()
    assert "site0 (its own model)" in md and "scaffold" in md.split("**Held-out sites.**")[1]
