"""Tables and plots from a sweep (``trials.parquet``) or one run (``metrics.parquet``).

For a sweep, trials that differ only in their seed form one configuration. Per configuration:
the final and best value of the sweep's metric (mean and spread over seeds), the lowest
validation loss, and the rounds needed to reach a threshold (the paper's segmentation table:
Jaccard 0.92 by local epochs x clients per round). With two swept parameters the rounds table is
laid out as the paper's grid; every pair of swept parameters gets heatmaps of the final and best
value, and each configuration a metric-by-round curve. "What matters" gives each parameter's share
of the variance of the final metric and of the rounds to the threshold, main effects with 95%
intervals over seeds, the strongest interaction and, on a two-parameter grid, whether the rounds
fall along each axis (``sensitivity.py``; docs/REPORT.md). A sweep with DP trials also gets the
privacy-utility curve (``privacy_report.py``). ``report.md`` embeds the PNGs; CSVs sit beside it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from cxrfl_ray.config import ConfigError, load_yaml
from cxrfl_ray.plots import plot_heatmap, plot_main_effects, plot_series
from cxrfl_ray.sensitivity import Importance, importance, main_effects, monotonic_trend, trend_statement, what_matters

NOT_REACHED = "not reached"


SIM_TIME = "round/server/sim_time_s"  # a trial's simulated time after each round, as it reports it


def rounds_to_reach(rounds: list[int], values: list[float], threshold: float, mode: str) -> int | None:
    """First round whose value reaches the threshold (>= for max, <= for min); None if none does."""
    for rnd, value in sorted(zip(rounds, values)):
        if (value >= threshold) if mode == "max" else (value <= threshold):
            return int(rnd)
    return None


def trial_outcomes(trials: pd.DataFrame, metric: str, mode: str, threshold: float | None,
                   loss: str | None, planned: int | None = None) -> pd.DataFrame:
    """One row per trial: its parameters, final/best metric, best round, rounds to threshold, min loss;
    with ``planned`` rounds (an early-stopping scheduler), ``stopped_at``: the last round of a trial
    the scheduler stopped before it, so its "final" is not read as a finished run's."""
    params = [c for c in trials.columns if c.startswith("param:")]
    rows = []
    for trial, group in trials.groupby("trial", sort=True):
        status = group["status"].iloc[0]  # also for a trial that failed before any round
        group = group.dropna(subset=["round"]).sort_values("round")
        row = {"trial": trial, "status": status,
               **{p: trials.loc[trials["trial"] == trial, p].iloc[0] for p in params}}
        if metric in group and group[metric].notna().any():
            series = group[["round", metric]].dropna()
            best_at = series[metric].idxmax() if mode == "max" else series[metric].idxmin()
            row.update({"rounds": int(series["round"].max()), "final": float(series[metric].iloc[-1]),
                        "best": float(series.loc[best_at, metric]), "best_round": int(series.loc[best_at, "round"])})
            if threshold is not None:
                reached = rounds_to_reach(series["round"].tolist(), series[metric].tolist(), threshold, mode)
                row["rounds_to_threshold"] = reached
                if SIM_TIME in group:  # the virtual clock (fl/system): simulated hours to the same round
                    clock = dict(zip(group["round"], group[SIM_TIME].fillna(0.0)))
                    row["hours_to_threshold"] = None if reached is None else clock.get(reached, 0.0) / 3600
        if loss and loss in group and group[loss].notna().any():
            row["min_loss"] = float(group[loss].min())
        if planned is not None:
            rounds = row.get("rounds", 0)
            row["stopped_at"] = rounds if status == "TERMINATED" and rounds < planned else None
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_spread(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return ""
    return f"{values.mean():.4f}" if len(values) == 1 else f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def _rounds_cell(values: pd.Series, digits: int = 1) -> str:
    """Mean ± spread of the rounds (or simulated hours) needed by the seeds that reached it; how
    many did, if not all."""
    reached = values.dropna().astype(float)
    if reached.empty:
        return NOT_REACHED
    text = f"{reached.mean():.{digits}f}" if len(reached) == 1 else \
        f"{reached.mean():.{digits}f} ± {reached.std(ddof=1):.{digits}f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


FAILED = "ERROR"  # Tune's status of a trial whose run raised (after its retries)


def config_table(outcomes: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """Trials grouped by their non-seed parameters: mean ± spread over the seeds that finished.
    A failed trial's rounds (up to its failure) are not a result: it is counted under ``failed``
    (a column present when any trial failed), never averaged in."""
    keys = swept or ["_all"]
    frame = outcomes.assign(_all="all") if not swept else outcomes
    any_failed = bool((outcomes["status"] == FAILED).any())
    rows = []
    for values, group in frame.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(keys, values)) if swept else {}
        failed = group["status"] == FAILED
        group = group[~failed]
        row["seeds"] = len(group)
        if any_failed:
            row["failed"] = int(failed.sum())
        if "stopped_at" in group and outcomes["stopped_at"].notna().any():
            row["stopped"] = int(group["stopped_at"].notna().sum())
        for col in ("final", "best", "min_loss"):
            if col in group:
                row[col] = _mean_spread(group[col])
        for col in ("rounds_to_threshold", "hours_to_threshold"):
            if col in group:
                row[col] = _rounds_cell(group[col], digits=1 if col.startswith("rounds") else 3) if len(group) \
                    else "failed"
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _none_shown(frame: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """A swept value of null (``fl.deadline_s: null``: no deadline) reads ``none``, not a blank cell."""
    return frame.assign(**{p: frame[p].astype(object).where(frame[p].notna(), "none") for p in params if p in frame})


def _label(param: str) -> str:
    return param.removeprefix("param:")


def report_sweep(sweep_dir: Path, threshold: float | None = None) -> Path:
    """``report/`` in a sweep folder: trial and configuration CSVs, ``report.md`` with the tables,
    the rounds-to-threshold grid, heatmaps and curves."""
    from cxrfl_ray.sweep import SPEC_FILE, TRIALS_FILE, SweepSpec, default_metric, default_mode, trial_config

    spec = SweepSpec.model_validate(load_yaml(sweep_dir / SPEC_FILE))
    first = trial_config(spec, {})
    metric = spec.metric or default_metric(first)
    mode = spec.mode or default_mode(first, metric)
    threshold = threshold if threshold is not None else spec.threshold
    if threshold is None and first.task == "segmentation":
        threshold = 0.92  # the paper's Jaccard threshold
    trials = pq.read_table(sweep_dir / TRIALS_FILE).to_pandas()
    if trials.empty or "round" not in trials:
        raise ConfigError(f"{sweep_dir / TRIALS_FILE}: no trial has reported a round yet")
    loss = f"{metric.rsplit('/', 1)[0]}/loss"
    planned = first.fl.rounds if spec.scheduler.name == "asha" else None
    outcomes = trial_outcomes(trials, metric, mode, threshold, loss, planned)
    swept = [f"param:{k}" for k in spec.space if f"param:{k}" in outcomes]  # the spec's order
    configs = config_table(outcomes, swept)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    outcomes.rename(columns=_label).to_csv(out / "trials.csv", index=False)
    configs.rename(columns=_label).to_csv(out / "configs.csv", index=False)

    lines = [f"# Sweep {spec.name}", "",
             f"{len(outcomes)} trials ({int((outcomes['status'] == FAILED).sum())} failed), "
             f"{len(configs)} configurations; metric `{metric}` ({mode}).", ""]
    finished = outcomes[outcomes["status"] != FAILED]  # plots and grids show results, not runs that failed
    if threshold is not None and len(swept) == 2 and "rounds_to_threshold" in finished:
        lines += _rounds_grid(finished, swept, metric, mode, threshold)
        if "hours_to_threshold" in finished:
            lines += _rounds_grid(finished, swept, metric, mode, threshold, "hours_to_threshold")
    lines += [f"## Per configuration (best and final {metric}, lowest `{loss}`; mean ± sd over `seeds` runs)", "",
              _markdown(_none_shown(configs, swept).rename(columns=_label)), ""]
    if "stopped_at" in outcomes and outcomes["stopped_at"].notna().any():
        stopped = outcomes.dropna(subset=["stopped_at"])
        lines += [f"## Stopped early by ASHA ({len(stopped)} of {len(outcomes)} trials)", "",
                  f"Their final {metric} is at the round they were stopped, not at round {planned}.", ""]
        lines += [f"- `{r.trial}`: stopped after round {int(r.stopped_at)} at {r.final:.4f}" for r in stopped.itertuples()]
        lines += [""]
    lines += sensitivity_section(out, finished, swept, metric, mode, spec.seeds, threshold, first.fl.rounds)
    if "error" in trials and trials["error"].notna().any():
        failed = trials.dropna(subset=["error"]).drop_duplicates("trial")
        lines += ["## Failed trials", ""] + [f"- `{r.trial}`: {r.error}" for r in failed.itertuples()] + [""]
    from cxrfl_ray.privacy_report import privacy_records, privacy_section, uses_privacy

    private = privacy_records(sweep_dir, outcomes)
    if uses_privacy(private):  # some trial ran with DP: final metric against epsilon (privacy_report.py)
        lines += privacy_section(out, private, swept, metric, spec.name)
    lines += _heatmaps(out, finished, swept, metric)
    if metric in trials and (trials["status"] != FAILED).any():
        lines += _curves(out, trials[trials["status"] != FAILED], swept, metric, spec.name)
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _median_range(values: pd.Series, digits: int) -> str:
    """The paper's grid cell over seeds: median (min–max) of the seeds that reached it, and how many did."""
    reached = values.dropna().astype(float)
    if reached.empty:
        return NOT_REACHED
    text = f"{reached.median():.{digits}f}"
    if len(reached) > 1:
        text += f" ({reached.min():.{digits}f}–{reached.max():.{digits}f})"
    return text + ("" if len(reached) == len(values) else f" [{len(reached)}/{len(values)} seeds]")


def _rounds_grid(outcomes: pd.DataFrame, swept: list[str], metric: str, mode: str, threshold: float,
                 column: str = "rounds_to_threshold") -> list[str]:
    """The paper's table: rounds (or simulated hours) to the threshold, first swept parameter by the
    second, median and range over seeds; for rounds, whether they fall along each axis."""
    rows_p, cols_p = swept
    digits = 0 if column == "rounds_to_threshold" else 3
    cells = outcomes.groupby([rows_p, cols_p], sort=True)[column]
    grid = cells.apply(lambda v: _median_range(v, digits)).unstack(cols_p)
    shown = grid.reset_index().rename(columns=lambda c: f"{_label(cols_p)}={c}" if c != rows_p else _label(rows_p))
    what = "Rounds" if column == "rounds_to_threshold" else "Simulated hours"
    lines = [f"## {what} to reach {metric} {'≥' if mode == 'max' else '≤'} {threshold}", "",
             f"Rows: {_label(rows_p)}; columns: {_label(cols_p)}; median (range) over seeds.", "",
             _markdown(shown.fillna("")), ""]
    numeric = all(pd.api.types.is_numeric_dtype(outcomes[p]) for p in swept)
    if column == "rounds_to_threshold" and numeric:  # the paper's trend: more work per round, fewer rounds
        medians = cells.apply(lambda v: v.astype(float).median() if v.notna().all() else np.nan).unstack(cols_p)
        trend = monotonic_trend(medians, _label(rows_p), _label(cols_p))
        lines += ["**Trend.** " + trend_statement(trend, f"Median rounds to {threshold}"), ""]
    return lines


SENSITIVITY_TARGETS = {"final": "the final {metric}", "rounds_to_threshold": "rounds to {metric} {op} {threshold}",
                       "hours_to_threshold": "simulated hours to {metric} {op} {threshold}"}


def sensitivity_section(out: Path, outcomes: pd.DataFrame, swept: list[str], metric: str, mode: str, seeds: int,
                        threshold: float | None, rounds: int) -> list[str]:
    """"What matters": each swept parameter's share of the variance of the final metric and of the
    rounds to the threshold (sensitivity.py), the main effects with intervals, the strongest interaction."""
    if not swept or len(outcomes) < 2:
        return []
    frame = outcomes.copy()
    never = int(frame["rounds_to_threshold"].isna().sum()) if "rounds_to_threshold" in frame else 0
    if "rounds_to_threshold" in frame:  # a run that never reached it needed more than all its rounds
        frame["rounds_to_threshold"] = frame["rounds_to_threshold"].astype(float).fillna(rounds + 1)
    lines, shares = ["## What matters", ""], []
    op = "≥" if mode == "max" else "≤"
    for target, name in SENSITIVITY_TARGETS.items():
        if target not in frame or frame[target].isna().all():
            continue
        if target == "hours_to_threshold" and frame[target].isna().any():  # no clock reading for "never"
            lines += [f"Simulated hours are not ranked: {int(frame[target].isna().sum())} trial(s) never reached "
                      f"{threshold}.", ""]
            continue
        imp = importance(frame, swept, target)
        label = name.format(metric=f"`{metric}`", op=op, threshold=threshold)
        if imp is None:
            lines += [f"{label[0].upper()}{label[1:]} is the same in every trial: no parameter explains anything.", ""]
            continue
        caveat = " With one seed per configuration, seed noise is inside these shares." \
            if seeds == 1 and imp.method == "anova" else ""
        lines += [what_matters(_labelled(imp), label) + caveat, ""]
        shares += [{"target": target, "term": _label(p), "share": v} for p, v in imp.main.items()]
        shares += [{"target": target, "term": f"{_label(a)} x {_label(b)}", "share": v} for (a, b), v in imp.pairs.items()]
        if imp.residual is not None:
            shares.append({"target": target, "term": "residual", "share": imp.residual})
        if target == "final":
            lines += _effects(out, frame, swept, target, metric, seeds, imp)
    if never:
        lines += [f"The {never} trial(s) that never reached {threshold} count as {rounds + 1} rounds.", ""]
    if shares:
        pd.DataFrame(shares).to_csv(out / "importance.csv", index=False)
    return lines


def _labelled(imp: Importance) -> Importance:
    return Importance(imp.method, {_label(p): v for p, v in imp.main.items()},
                      {(_label(a), _label(b)): v for (a, b), v in imp.pairs.items()}, imp.residual)


def _effects(out: Path, frame: pd.DataFrame, swept: list[str], target: str, metric: str, seeds: int,
             imp: Importance) -> list[str]:
    """The main-effects PNG and table, and the strongest pair's heatmap."""
    effects = main_effects(frame, swept, target, seeds)
    plot_main_effects(out / "main_effects.png", {_label(e.param): e.table for e in effects}, ylabel=f"final {metric}",
                      title="mean ± 95% interval over seeds and the other parameters" if seeds > 1 else
                      "mean over the other parameters (one seed: no interval)")
    rows = [{"parameter": _label(e.param), "value": "none" if pd.isna(r.value) else r.value, "mean": round(r.mean, 4),
             "95% interval": "" if np.isnan(r.low) else f"{r.low:.4f} – {r.high:.4f}", "n": r.n}
            for e in effects for r in e.table.itertuples()]
    lines = ["### Main effects (final value)", "",
             ("Mean over every trial with that value, 95% t-interval over the seeds and the other parameters."
              if seeds > 1 else "One seed per configuration: intervals are not drawn (run with `seeds: N` for them)."),
             "", _markdown(pd.DataFrame(rows)), "", "![main effects](main_effects.png)", ""]
    pair = imp.strongest_pair()
    if pair is not None:
        a, b = pair
        cell = frame.groupby([a, b])[target].mean().unstack(b)
        plot_heatmap(out / "interaction.png", cell.to_numpy(), list(cell.index), list(cell.columns), _label(a),
                     _label(b), title=f"final {metric}: strongest interaction ({imp.pairs[pair]:.0%} of the variance)")
        lines += [f"Strongest interaction: {_label(a)} × {_label(b)}.", "", "![interaction](interaction.png)", ""]
    return lines


def _heatmaps(out: Path, outcomes: pd.DataFrame, swept: list[str], metric: str) -> list[str]:
    """Final and best value for every pair of swept parameters (mean over the others)."""
    lines = []
    if outcomes.empty:
        return lines
    for a, b in itertools.combinations(swept, 2):
        for value in ("final", "best"):
            if value not in outcomes:
                continue
            cell = outcomes.groupby([a, b])[value].mean().unstack(b)
            name = f"heatmap_{value}_{_label(a)}_x_{_label(b)}.png".replace("/", "_")
            plot_heatmap(out / name, cell.to_numpy(), list(cell.index), list(cell.columns), _label(a), _label(b),
                         title=f"{value} {metric} (mean over other parameters)")
            lines += [f"![{value} {a} x {b}]({name})", ""]
    return lines


def _curves(out: Path, trials: pd.DataFrame, swept: list[str], metric: str, name: str) -> list[str]:
    """The metric by round, one curve per configuration (mean over seeds)."""
    reported = trials.dropna(subset=["round"])
    groups = reported.groupby(swept, sort=True) if swept else [(("all",), reported)]
    curves = {}
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{_label(p)}={v}" for p, v in zip(swept, values)) or "all"
        mean = group.groupby("round")[metric].mean()
        curves[label] = list(zip(mean.index.astype(int), mean.to_numpy()))
    plot_series(out / "curves.png", curves, ylabel=metric, xlabel="round", title=f"{name}: mean over seeds")
    lines = ["## By round", "", "![metric by round](curves.png)", ""]
    if SIM_TIME in reported and reported[SIM_TIME].notna().any():  # the same curves on the simulated clock
        hours = {}
        for values, group in (reported.groupby(swept, sort=True) if swept else [(("all",), reported)]):
            values = values if isinstance(values, tuple) else (values,)
            label = ", ".join(f"{_label(p)}={v}" for p, v in zip(swept, values)) or "all"
            mean = group.assign(_h=group[SIM_TIME].fillna(0.0) / 3600).groupby("round")[[metric, "_h"]].mean()
            hours[label] = list(zip(mean["_h"].to_numpy(), mean[metric].to_numpy()))
        plot_series(out / "curves_sim_hours.png", hours, ylabel=metric, xlabel="simulated hours",
                    title=f"{name}: mean over seeds")
        lines += ["## By simulated hours", "", "![metric by simulated hours](curves_sim_hours.png)", ""]
    return lines


def report_run(run_dir: Path) -> Path:
    """A single run: the main metric of every view by round, and the summary."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    rows = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    metric = summary.get("main_metric") or ("jaccard" if "jaccard" in set(rows["metric"]) else "accuracy")
    views = rows[(rows["metric"] == metric) & rows["scope"].isin(["central", "site", "holdout"])]
    table = views.assign(view=views["scope"] + ":" + views["id"]).pivot(index="round", columns="view", values="value")
    out = run_dir / "report.md"
    table.reset_index().to_csv(run_dir / "report.csv", index=False)
    lines = [f"# Run {run_dir.name}", "", f"`{metric}` by round and view.", "",
             _markdown(table.reset_index().round(4)), ""]
    if summary:
        lines += [f"Best {summary.get('selected_by')} {metric}: {summary.get('best_value')} at round "
                  f"{summary.get('best_round')}; rounds to threshold: {summary.get('rounds_to_threshold')}.", ""]
    if (run_dir / f"{metric}.png").is_file():
        lines += [f"![{metric}]({metric}.png)", ""]
    out.write_text("\n".join(lines))
    return out


def report(path: str | Path, threshold: float | None = None) -> Path:
    """Report a sweep folder or a run folder; returns the Markdown file."""
    from cxrfl_ray.sweep import TRIALS_FILE

    path = Path(path)
    if (path / TRIALS_FILE).is_file():
        return report_sweep(path, threshold)
    if (path / "metrics.parquet").is_file():
        return report_run(path)
    raise ConfigError(f"{path}: neither a sweep folder (no {TRIALS_FILE}) nor a run folder (no metrics.parquet)")
