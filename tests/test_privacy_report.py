"""`cxrfl report` on a sweep whose trials used DP: the privacy-utility table, curve and plot.

No Ray: the sweep folder is built as a sweep leaves it (spec.yaml; per trial its params.json and a
run folder with config.yaml, metrics.parquet as the server logs it and summary.json with its
privacy block; trials.parquet from the sweep's own table writer), with chosen metric values and
epsilons from dp-accounting, so every value the report prints is known here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from PIL import Image

from cxrfl_ray.fl.privacy.accounting import epsilon
from cxrfl_ray.jsonio import write_json
from cxrfl_ray.privacy_report import privacy_records, privacy_section
from cxrfl_ray.report import report, trial_outcomes
from cxrfl_ray.sweep import SPEC_FILE, SweepSpec, load_spec, trial_config, trial_name, validate, write_trials_table
from cxrfl_ray.tracking import MetricsSink

SPEC = Path(__file__).resolve().parents[1] / "tune_configs" / "privacy.yaml"
METRIC = "central/val/jaccard"
Q, DELTA = 4 / 16, 1e-5  # the shipped spec: 4 of 16 clients per round; the default delta
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep(tmp: Path, space: dict, seeds: int = 1) -> tuple[Path, SweepSpec]:
    """A sweep folder holding the shipped privacy spec with ``space`` and ``seeds``."""
    data = yaml.safe_load(SPEC.read_text())
    data.update(space=space, seeds=seeds)
    data["base"]["data"]["path"] = str(tmp / "phantoms")  # never read: nothing trains here
    spec = SweepSpec.model_validate(data)
    sweep = tmp / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (sweep / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return sweep, spec


def _trial(sweep: Path, spec: SweepSpec, params: dict, values: list[float], *, summary: bool = True,
           error: str | None = None) -> SimpleNamespace:
    """One trial's run folder as the server writes it: rounds 0..len(values)-1 of the metric (the
    round before the last is the best, so final and best differ), the accountant's row after
    each round, summary.json (unless the trial stopped early). Returns Tune's result for it."""
    cfg = trial_config(spec, params)
    run = sweep / "trials" / trial_name(params)
    run.mkdir()
    run.with_suffix(".params.json").write_text(json.dumps(params, sort_keys=True))
    cfg.save(run / "config.yaml")
    sink = MetricsSink(run / "metrics.parquet")
    p = cfg.privacy
    for rnd, value in enumerate(values):
        sink.log(rnd, "central", "val", {"jaccard": value, "loss": 1.0 - value})
        if rnd == 0:
            continue
        info = {"selected": 4, "replied": 4, "failures": 0, "failures_total": 0, "train_loss": 0.5}
        if p.mode == "client":
            eps = epsilon(Q, p.noise_multiplier, rnd, DELTA)
            info["epsilon"] = eps
            sink.log(rnd, "privacy", "federation", {"epsilon": eps, "delta": DELTA, "noise_multiplier":
                                                    p.noise_multiplier, "steps": rnd, "clip_norm": p.clip_norm,
                                                    "clipped_share": 0.5, "update_norm_median": 0.3,
                                                    "noise_std": p.noise_multiplier * p.clip_norm / 4})
        sink.log(rnd, "round", "server", info)
    sink.flush()
    if summary:
        rounds = len(values) - 1
        privacy = {"mode": "none"} if p.mode == "none" else {
            "mode": "client", "epsilon": epsilon(Q, p.noise_multiplier, rounds, DELTA), "delta": DELTA,
            "accountant": "rdp", "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm,
            "adaptive_clip": False, "rounds_accounted": rounds,
            "sampling": {"unit": "client", "rate": Q, "drawn": "fixed-size cohort"}, "approximation": "..."}
        write_json(run / "summary.json", {"main_metric": "jaccard", "rounds": rounds, "privacy": privacy})
    return SimpleNamespace(config=params, error=RuntimeError(error) if error else None)


def _curve(final: float, rounds: int = 3) -> list[float]:
    """A metric series ending at ``final`` whose best (final + 0.05) is the round before."""
    return [0.3] * (rounds - 1) + [final + 0.05, final]


REF = {"mode": "none"}


def _dp(clip: float, z: float) -> dict:
    return {"mode": "client", "clip_norm": clip, "noise_multiplier": z}


@pytest.fixture()
def dp_sweep(tmp_path):
    """The shipped spec's shape at 2 seeds: no DP, clip {0.1, 0.5} x z {0.6, 2.0}. Clip 0.5, z 0.6
    seed 1 failed after round 2; clip 0.5, z 2.0 seed 1 stopped after round 2 (no summary.json)."""
    grid = [REF, _dp(0.1, 0.6), _dp(0.1, 2.0), _dp(0.5, 0.6), _dp(0.5, 2.0)]
    sweep, spec = _sweep(tmp_path, {"privacy": {"grid": grid}}, seeds=2)
    finals = {(0, 0): 0.80, (0, 1): 0.84, (1, 0): 0.70, (1, 1): 0.72, (2, 0): 0.60, (2, 1): 0.64,
              (3, 0): 0.78, (4, 0): 0.74}
    results = [_trial(sweep, spec, {"privacy": grid[i], "seed": s}, _curve(v)) for (i, s), v in finals.items()]
    results.append(_trial(sweep, spec, {"privacy": grid[3], "seed": 1}, [0.3, 0.2, 0.1], summary=False,
                          error="DivergedError: round 2"))
    results.append(_trial(sweep, spec, {"privacy": grid[4], "seed": 1}, _curve(0.76, rounds=2), summary=False))
    write_trials_table(sweep, results)
    return sweep


def test_the_privacy_table_curve_and_plot_of_a_dp_sweep(dp_sweep):
    md = report(dp_sweep)
    out, text = md.parent, md.read_text()

    # Per trial: epsilon from summary.json, or from the last privacy row of metrics.parquet for
    # the trial that stopped after round 2; the final metric, not the best.
    trials = pd.read_csv(out / "privacy_trials.csv")
    assert len(trials) == 10
    for clip, z, seed, eps, final, source in [
            (0.1, 0.6, 0, epsilon(Q, 0.6, 3, DELTA), 0.70, "summary.json"),
            (0.5, 2.0, 0, epsilon(Q, 2.0, 3, DELTA), 0.74, "summary.json"),
            (0.5, 2.0, 1, epsilon(Q, 2.0, 2, DELTA), 0.76, "metrics.parquet round 2")]:
        row = trials[(trials["clip_norm"] == clip) & (trials["noise_multiplier"] == z) & (trials["seed"] == seed)]
        assert len(row) == 1
        assert row["epsilon"].iloc[0] == pytest.approx(eps, rel=1e-9)
        assert row["final"].iloc[0] == pytest.approx(final) and row["best"].iloc[0] == pytest.approx(final + 0.05)
        assert row["epsilon_from"].iloc[0] == source and row["delta"].iloc[0] == DELTA
    assert epsilon(Q, 2.0, 2, DELTA) < epsilon(Q, 2.0, 3, DELTA)  # the two sources really differ
    assert set(trials.loc[trials["mode"] == "none", "epsilon"]) == {math.inf}

    # Per configuration: the reference first, then by clip and noise; mean ± sd over the seeds
    # that finished (the failed seed is left out, not averaged in), and n.
    table = pd.read_csv(out / "privacy.csv", keep_default_na=False)
    final = f"final {METRIC}"
    assert table[["mode", "clip", "noise multiplier", final, "n"]].values.tolist() == [
        ["none", "", "", "0.8200 ± 0.0283", 2],
        ["client", "0.1", "0.6", "0.7100 ± 0.0141", 2],
        ["client", "0.1", "2", "0.6200 ± 0.0283", 2],
        ["client", "0.5", "0.6", "0.7800", 1],
        ["client", "0.5", "2", "0.7500 ± 0.0141", 2]]
    eps3 = {z: epsilon(Q, z, 3, DELTA) for z in (0.6, 2.0)}
    mixed = [epsilon(Q, 2.0, 3, DELTA), epsilon(Q, 2.0, 2, DELTA)]
    assert table["epsilon"].tolist() == [
        "∞ (no DP)", f"{eps3[0.6]:.4g}", f"{eps3[2.0]:.4g}", f"{eps3[0.6]:.4g}",
        f"{sum(mixed) / 2:.4g} ± {pd.Series(mixed).std(ddof=1):.4g}"]
    assert table["delta"].tolist() == ["", "1e-05", "1e-05", "1e-05", "1e-05"]

    # What the plot draws: one line per clip, x the mean epsilon, the no-DP level as reference.
    points = pd.read_csv(out / "privacy_curve.csv")
    ref = points[points["kind"] == "reference"]
    assert ref["line"].tolist() == ["no DP"] and ref["metric"].iloc[0] == pytest.approx(0.82)
    assert ref["n"].iloc[0] == 2
    dp = points[points["kind"] == "dp"]
    assert dp["line"].tolist() == ["clip 0.1", "clip 0.1", "clip 0.5", "clip 0.5"]
    assert dp["epsilon"].tolist() == pytest.approx([eps3[0.6], eps3[2.0], eps3[0.6], sum(mixed) / 2])
    assert dp["metric"].tolist() == pytest.approx([0.71, 0.62, 0.78, 0.75])
    assert dp["metric_sd"].tolist() == pytest.approx([0.0141421, 0.0282843, 0.0, 0.0141421], rel=1e-5)

    # report.md: the section with the reference level, the table and the plot.
    assert "## Privacy and utility" in text and "Without DP (dashed): no DP 0.8200 (n 2)." in text
    assert f"| client | 0.5 | 2 | {sum(mixed) / 2:.4g} ± {pd.Series(mixed).std(ddof=1):.4g} | 1e-05 | " \
           "0.7500 ± 0.0141 | 2 |" in text
    assert "1 failed trial(s) left out" in text and "![privacy-utility curve](privacy_utility.png)" in text
    png = out / "privacy_utility.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (600, 400)


def test_a_sweep_of_noise_and_clip_without_a_reference_gets_lines_per_clip_and_says_so(tmp_path):
    """``privacy.noise_multiplier`` x ``privacy.clip_norm`` over a DP base: the same curve, read
    from the run folders; no no-DP trial, so no reference line."""
    space = {"privacy.noise_multiplier": {"grid": [0.5, 1.0]}, "privacy.clip_norm": {"grid": [0.2, 1.0]}}
    sweep, spec = _sweep(tmp_path, space)
    data = yaml.safe_load((sweep / SPEC_FILE).read_text())
    data["base"]["privacy"] = {"mode": "client", "noise_multiplier": 1.0}
    (sweep / SPEC_FILE).write_text(yaml.safe_dump(data))
    spec = SweepSpec.model_validate(data)
    finals = {(0.5, 0.2): 0.5, (1.0, 0.2): 0.4, (0.5, 1.0): 0.7, (1.0, 1.0): 0.6}
    write_trials_table(sweep, [_trial(sweep, spec, {"privacy.noise_multiplier": z, "privacy.clip_norm": c},
                                      _curve(v)) for (z, c), v in finals.items()])
    out = report(sweep).parent
    text = (out / "report.md").read_text()
    assert "No trial ran without DP: there is no reference level" in text
    points = pd.read_csv(out / "privacy_curve.csv")
    assert set(points["kind"]) == {"dp"}
    assert points[["line", "noise_multiplier", "metric"]].values.tolist() == [
        ["clip 0.2", 0.5, 0.5], ["clip 0.2", 1.0, 0.4], ["clip 1", 0.5, 0.7], ["clip 1", 1.0, 0.6]]
    assert points["epsilon"].tolist() == pytest.approx([epsilon(Q, z, 3, DELTA) for z in (0.5, 1.0, 0.5, 1.0)])
    assert (out / "privacy_utility.png").read_bytes()[:8] == PNG_MAGIC


def test_a_sweep_without_dp_has_no_privacy_section(tmp_path):
    sweep, spec = _sweep(tmp_path, {"train.lr": {"grid": [0.5, 1.0]}})
    write_trials_table(sweep, [_trial(sweep, spec, {"train.lr": lr}, _curve(0.6)) for lr in (0.5, 1.0)])
    out = report(sweep).parent
    assert "Privacy" not in (out / "report.md").read_text()
    assert not (out / "privacy_utility.png").exists() and not (out / "privacy.csv").exists()


def test_without_matplotlib_the_table_is_written_and_the_plot_skipped_with_a_message(dp_sweep, monkeypatch):
    import pyarrow.parquet as pq

    trials = pq.read_table(dp_sweep / "trials.parquet").to_pandas()
    outcomes = trial_outcomes(trials, METRIC, "max", None, None)
    out = dp_sweep / "report"
    out.mkdir()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    lines = privacy_section(out, privacy_records(dp_sweep, outcomes), ["param:privacy", "param:seed"], METRIC,
                            "privacy")
    text = "\n".join(lines)
    assert "(matplotlib is not installed: no privacy_utility.png; the table has the same values.)" in text
    assert "| none |  |  | ∞ (no DP) |  | 0.8200 ± 0.0283 | 2 |" in text
    assert not (out / "privacy_utility.png").exists() and (out / "privacy.csv").is_file()


def test_the_shipped_privacy_sweep_is_one_reference_and_noise_by_clip(phantoms):
    """tune_configs/privacy.yaml validates on phantoms of its size, and its grid is what the
    report's curve needs: one no-DP trial and four noise multipliers at each of two clips."""
    data = yaml.safe_load(SPEC.read_text())
    spec = load_spec(SPEC, [f"base.data.path={phantoms(n=data['synthesize']['n'], size=48)}"])
    configs = validate(spec)
    modes = [c.privacy.mode for c in configs]
    assert modes.count("none") == 1 and modes.count("client") == 8
    dp = sorted((c.privacy.clip_norm, c.privacy.noise_multiplier) for c in configs if c.privacy.mode == "client")
    assert dp == [(c, z) for c in (0.5, 2.0) for z in (0.3, 0.6, 1.0, 2.0)]
    assert {c.clients_per_round / c.partition.clients for c in configs} == {Q}


def test_a_sample_level_trial_reads_the_federations_epsilon_and_each_clients_noise_range(tmp_path):
    """Sample level: per-client epsilons, the federation's the largest; with target_epsilon each
    client solves its own z (summary: {min, max}). Without summary.json the last round's
    ``federation`` row counts, not a client's row nor an earlier round."""
    from cxrfl_ray.config import build_config
    from cxrfl_ray.privacy_report import trial_privacy

    cfg = build_config({"task": "segmentation", "model": {"name": "tiny-conv-seg"},
                        "privacy": {"mode": "sample", "target_epsilon": 8.0, "clip_norm": 1.5, "delta": 1e-4}})
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    sink = MetricsSink(run / "metrics.parquet")
    for rnd, (fed, c0, c1) in enumerate([(2.0, 2.0, 1.0), (3.5, 3.5, 2.5)], start=1):
        sink.log(rnd, "privacy", "federation",
                 {"epsilon": fed, "delta": 1e-4, "steps": 4 * rnd, "noise_multiplier": 1.1})
        sink.log(rnd, "privacy", "0", {"epsilon": c0, "steps": 4 * rnd, "noise_multiplier": 1.1})
        sink.log(rnd, "privacy", "3", {"epsilon": c1, "steps": 2 * rnd, "noise_multiplier": 1.3})
    sink.flush()
    got = trial_privacy(run)
    assert (got["mode"], got["epsilon"], got["noise_multiplier"], got["rounds_accounted"]) == ("sample", 3.5, 1.1, 8)
    assert (got["delta"], got["clip_norm"], got["epsilon_from"]) == (1e-4, 1.5, "metrics.parquet round 2")
    write_json(run / "summary.json", {"privacy": {"mode": "sample", "epsilon": 3.5, "delta": 1e-4,
                                                  "noise_multiplier": {"min": 1.1, "max": 1.3}}})
    got = trial_privacy(run)
    assert (got["epsilon"], got["noise_multiplier"], got["noise_text"]) == (3.5, 1.1, "1.1–1.3")
    assert got["epsilon_from"] == "summary.json"
    # A DP run without noise: its infinite epsilon is null in strict JSON and reads back as inf.
    write_json(run / "summary.json", {"privacy": {"mode": "sample", "epsilon": math.inf, "delta": 1e-4}})
    assert trial_privacy(run)["epsilon"] == math.inf
