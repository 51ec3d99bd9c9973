"""What matters in a sweep: importance, intervals, the monotonic trend and the report's
"what matters" paragraph, on constructed trial tables whose answers are known by hand."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from cxrfl_ray.report import report
from cxrfl_ray.sensitivity import importance, main_effects, monotonic_trend, trend_statement
from cxrfl_ray.sweep import SPEC_FILE, SweepSpec, trial_config, trial_name, write_trials_table
from cxrfl_ray.tracking import MetricsSink

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_grid_whose_metric_depends_on_one_parameter_gives_it_the_variance():
    rng = np.random.default_rng(0)
    rows = [{"epochs": e, "cpr": c, "lr": lr, "y": 0.3 * e + rng.normal(0, 0.01)}
            for e, c, lr, _ in itertools.product([1, 2, 3], [1, 2, 3], [0.01, 0.1], range(2))]
    imp = importance(pd.DataFrame(rows), ["epochs", "cpr", "lr"], "y")
    assert imp.method == "anova" and imp.main["epochs"] >= 0.99
    assert sum(imp.main.values()) + sum(imp.pairs.values()) + imp.residual == pytest.approx(1.0)


def test_a_random_search_whose_metric_depends_on_one_parameter_gives_it_optunas_fanova_importance():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"lr": rng.uniform(0.001, 0.1, 40), "epochs": rng.integers(1, 4, 40)})
    frame["y"] = 10 * frame["lr"] + rng.normal(0, 0.001, 40)
    imp = importance(frame, ["lr", "epochs"], "y")
    assert imp.method == "fanova" and imp.main["lr"] >= 0.9 and not imp.pairs


def test_main_effects_and_an_interaction_split_the_variance_as_computed_by_hand():
    """y = 2a ± 0.5 (+ when a == b): cells 0.5, -0.5, 1.5, 2.5 around a grand mean of 1. The a
    effect is ±1 in all 4 cells (SS 4), b has none, the interaction is ±0.5 (SS 1), total 5."""
    frame = pd.DataFrame({"a": [0, 0, 1, 1], "b": [0, 1, 0, 1], "y": [0.5, -0.5, 1.5, 2.5]})
    imp = importance(frame, ["a", "b"], "y")
    assert imp.main == pytest.approx({"a": 0.8, "b": 0.0}) and imp.pairs == {("a", "b"): pytest.approx(0.2)}
    assert imp.residual == pytest.approx(0.0, abs=1e-12) and imp.strongest_pair() == ("a", "b")


def test_intervals_are_the_t_interval_over_seeds_and_the_other_parameters():
    # a=1 holds y 1, 2, 3, 6: mean 3, sd sqrt(14/3), t(0.975, 3) = 3.182446 -> half width 3.43741.
    frame = pd.DataFrame({"a": [1, 1, 1, 1, 2, 2, 2, 2], "b": [0, 0, 1, 1] * 2, "y": [1, 2, 3, 6, 5, 5, 5, 5]})
    table = main_effects(frame, ["a", "b"], "y", seeds=2)[0].table.set_index("value")
    assert table.loc[1, "mean"] == 3.0 and table.loc[1, "n"] == 4
    assert (table.loc[1, "low"], table.loc[1, "high"]) == pytest.approx((3 - 3.43741, 3 + 3.43741), abs=1e-4)
    assert table.loc[2, "low"] == table.loc[2, "high"] == 5.0  # no spread, no width
    one_seed = main_effects(frame, ["a"], "y", seeds=1)[0].table
    assert one_seed["low"].isna().all() and one_seed["high"].isna().all()


def test_the_trend_holds_on_the_papers_shape_and_names_each_cell_that_breaks_it():
    paper = pd.DataFrame([[14, 9, 8], [10, 7, 6], [9, 6, 5]], index=[1, 2, 3], columns=[1, 2, 3])
    trend = monotonic_trend(paper, "train.epochs", "fl.clients_per_round")
    assert trend.along_rows and trend.along_cols and not trend.violations
    assert "holds in every cell" in trend_statement(trend, "Rounds")
    broken = paper.astype(float).copy()
    broken.loc[3, 2] = 11.0  # more rounds than (2, 2) above it and (3, 1) before it
    broken.loc[2, 3] = np.nan  # never reached: breaks the fall from (2, 2) and from (1, 3)
    trend = monotonic_trend(broken, "e", "c")
    assert not trend.along_rows and not trend.along_cols
    assert trend.violations == [
        "(e=2, c=3): not reached after 8 at e=1", "(e=2, c=3): not reached after 7 at c=2",
        "(e=3, c=2): 11 after 7 at e=2", "(e=3, c=2): 11 after 9 at c=1"]
    statement = trend_statement(trend, "Rounds")
    assert "do not fall monotonically as e grows" in statement and "(e=3, c=2): 11 after 7 at e=2" in statement


def _write_sweep(tmp: Path, finals: dict, reached: dict, seeds: int, scheduler: dict | None = None,
                 rounds: int = 4, stopped: set = frozenset()) -> Path:
    """A smoke-shaped sweep folder (epochs x clients per round, ``seeds`` seeds) whose trial at
    (e, c, seed) first reaches 0.8 at round ``reached`` (None: never), stays there, and ends at
    ``finals`` (below 0.8) in its last round."""
    data = yaml.safe_load(SMOKE.read_text())
    data["base"]["data"]["path"] = str(tmp / "phantoms")  # never read: nothing trains here
    data.update(seeds=seeds, threshold=0.8, scheduler=scheduler or {"name": "none"})
    data["base"]["fl"]["rounds"] = rounds
    spec = SweepSpec.model_validate(data)
    sweep = tmp / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (sweep / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    results = []
    for (e, c, seed), final in finals.items():
        params = {"train.epochs": e, "fl.clients_per_round": c, **({"seed": seed} if seeds > 1 else {})}
        run = sweep / "trials" / trial_name(params)
        run.mkdir()
        run.with_suffix(".params.json").write_text(json.dumps(params, sort_keys=True))
        trial_config(spec, params).save(run / "config.yaml")
        sink = MetricsSink(run / "metrics.parquet")
        last = 1 if (e, c, seed) in stopped else rounds
        at = reached[(e, c, seed)]
        for rnd in range(last + 1):
            value = final if rnd == last else (0.9 if at is not None and rnd >= at else 0.1)
            sink.log(rnd, "central", "val", {"jaccard": value, "loss": 1.0 - value})
        sink.flush()
        (run / "summary.json").write_text(json.dumps({"main_metric": "jaccard", "rounds": last}))
        results.append(SimpleNamespace(config=params, error=None))
    write_trials_table(sweep, results)
    return sweep


def test_the_report_says_what_matters_with_intervals_the_median_grid_and_the_trend(tmp_path):
    """Two seeds: the final value is 0.6 + 0.1 (epochs - 1) ± 0.01 by seed, so epochs hold all of
    its variance but the seed noise; rounds to 0.8 fall with epochs except at (2, 2)."""
    cells = list(itertools.product([1, 2], [1, 2], [0, 1]))
    finals = {(e, c, s): 0.6 + 0.1 * (e - 1) + (0.01 if s else -0.01) for e, c, s in cells}
    reached = {(1, 1, 0): 3, (1, 1, 1): 2, (1, 2, 0): 2, (1, 2, 1): 2,
               (2, 1, 0): 1, (2, 1, 1): 1, (2, 2, 0): 3, (2, 2, 1): None}
    sweep = _write_sweep(tmp_path, finals, reached, seeds=2)
    md = report(sweep)
    text, out = md.read_text(), md.parent
    total = sum((v - 0.65) ** 2 for v in finals.values())
    epochs_share = 8 * 0.05 ** 2 / total  # the epochs effect is ±0.05 in all 8 trials
    assert f"For the final `central/val/jaccard`, train.epochs explains {epochs_share:.0%} of the variance" in text
    assert "exact variance decomposition of the full grid" in text
    shares = pd.read_csv(out / "importance.csv").set_index(["target", "term"])["share"]
    assert shares[("final", "train.epochs")] == pytest.approx(epochs_share)
    assert shares[("final", "residual")] == pytest.approx(1 - epochs_share)  # the seeds
    # The paper's grid: median (range) over seeds; (2, 2) reached by one seed of two.
    assert "| 1 | 2 (2–3) | 2 (2–2) |" in text and "| 2 | 1 (1–1) | 3 [1/2 seeds] |" in text
    assert ("**Trend.** Median rounds to 0.8 do not fall monotonically as train.epochs grows and do not fall "
            "monotonically as fl.clients_per_round grows. Cells that break it: "
            "(train.epochs=2, fl.clients_per_round=2): not reached after 2 at train.epochs=1; "
            "(train.epochs=2, fl.clients_per_round=2): not reached after 1 at fl.clients_per_round=1.") in text
    assert "The 1 trial(s) that never reached 0.8 count as 5 rounds." in text
    # Main effects: the epochs=1 mean 0.6 over 4 trials (0.59 x 2, 0.61 x 2), t(0.975, 3) interval.
    half = 3.182446 * np.std([0.59, 0.59, 0.61, 0.61], ddof=1) / 2
    assert f"| train.epochs | 1 | 0.6 | {0.6 - half:.4f} – {0.6 + half:.4f} | 4 |" in text
    for png in ("main_effects.png", "interaction.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in text
    configs = pd.read_csv(out / "configs.csv")
    assert set(configs["seeds"]) == {2} and configs["final"].str.contains("±").all()


def test_with_one_seed_the_report_draws_no_interval_and_says_so(tmp_path):
    cells = list(itertools.product([1, 2], [1, 2], [0]))
    sweep = _write_sweep(tmp_path, {k: 0.5 + 0.1 * k[0] + 0.01 * k[1] for k in cells}, dict.fromkeys(cells, 1), seeds=1)
    text = report(sweep).read_text()
    assert "One seed per configuration: intervals are not drawn" in text and "never reached" not in text
    assert "(exact variance decomposition of the full grid). With one seed per configuration, seed noise is " \
           "inside these shares." in text
    assert "Rounds to `central/val/jaccard` ≥ 0.8 is the same in every trial" in text


def test_trials_asha_stopped_are_marked_stopped_with_the_round(tmp_path):
    cells = list(itertools.product([1, 2], [1, 2], [0]))
    sweep = _write_sweep(tmp_path, {k: 0.5 + 0.1 * k[0] for k in cells}, dict.fromkeys(cells, 1), seeds=1,
                         scheduler={"name": "asha", "grace_period": 1}, stopped={(1, 1, 0)})
    md = report(sweep)
    text = md.read_text()
    assert "## Stopped early by ASHA (1 of 4 trials)" in text
    name = trial_name({"train.epochs": 1, "fl.clients_per_round": 1})
    assert f"- `{name}`: stopped after round 1 at 0.6000" in text
    trials = pd.read_csv(md.parent / "trials.csv").set_index("trial")
    assert trials["stopped_at"].dropna().to_dict() == {name: 1.0}
