"""The privacy-utility curve of a sweep whose trials used differential privacy (``cxrfl report``).

Each trial's privacy is read from its run folder, not from the sweep's parameters, so every way a
spec can set the privacy section (one dimension of whole sections as ``tune_configs/privacy.yaml``,
or ``privacy.noise_multiplier`` x ``privacy.clip_norm`` over a DP base) reads the same: mode,
delta and the configured clip from ``config.yaml``; epsilon and the noise multiplier used (solved,
with ``target_epsilon``) from ``summary.json`` ``privacy``, or from the last round of the
``privacy`` rows of ``metrics.parquet`` for a trial without a summary (stopped by ASHA, still
running). The utility is each trial's final metric: its epsilon counts every round that released
a model, so it describes the final model (the best round is a choice made on validation data,
after the fact).

``report.md`` gets a table (one row per configuration: mean ± sd over seeds and n) and
``privacy_utility.png``; ``report/`` gets ``privacy_trials.csv`` (per trial, numeric),
``privacy.csv`` (the table) and ``privacy_curve.csv`` (the plotted points and reference levels).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

from cxrfl_ray.plots import save_figure
from cxrfl_ray.report import FAILED, _label, _markdown, _mean_spread

log = logging.getLogger("cxrfl.report")

PLOT_FILE = "privacy_utility.png"
NO_DP = "none"
# Resolved privacy settings that, when they differ between DP trials, make separate lines (the
# noise multiplier is the curve's own axis: it sets epsilon).
LINE_FIELDS = ("mode", "clip_norm", "adaptive_clip", "delta", "accountant")
PRIVACY_PARAM = "param:privacy"  # a swept privacy section, or privacy.<field>: not a line of its own


def run_folder(sweep_dir: Path, trial: str) -> Path:
    """A trial's run folder: ``trials/<trial>`` under the sweep folder (the trial id is the
    folder's name), so a sweep folder that was moved or fetched still reports."""
    return Path(sweep_dir) / "trials" / trial


def _worst(value: Any) -> float:
    """One number for a guarantee given per client (sample level): the largest, i.e. the weakest
    guarantee; a missing value (JSON null: non-finite when written) is NaN."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        numbers = [_worst(v) for v in value]
        return max(numbers) if numbers else math.nan
    return float(value) if isinstance(value, (int, float)) else math.nan


def _noise(value: Any) -> tuple[float, str]:
    """A noise multiplier as (number, text): one z, or per-client z solved from target_epsilon at
    sample level (summary ``{"min": .., "max": ..}``: the smallest, shown as the range)."""
    if isinstance(value, dict) and {"min", "max"} <= set(value):
        low, high = _worst(value["min"]), _worst(value["max"])
        return low, (_fmt(low) if low == high else f"{_fmt(low)}–{_fmt(high)}")
    number = _worst(value)
    return number, _fmt(number)


def last_privacy_round(run_dir: Path) -> dict[str, float]:
    """The accountant's rows of the last round in ``metrics.parquet`` (scope ``privacy``): those
    of id ``federation`` (the federation's epsilon: at sample level its worst client's), else the
    largest epsilon over the ids; with its noise multiplier and steps. {} when the run logged none."""
    path = run_dir / "metrics.parquet"
    if not path.is_file():
        return {}
    rows = pq.read_table(path).to_pandas()
    rows = rows[rows["scope"] == "privacy"]
    if rows.empty:
        return {}
    rows = rows[rows["round"] == rows["round"].max()]
    out = {"round": int(rows["round"].iloc[0])}
    if (rows["id"] == "federation").any():
        rows = rows[rows["id"] == "federation"]
    else:
        eps = rows[rows["metric"] == "epsilon"]
        if not eps.empty:
            rows = rows[rows["id"] == eps.loc[eps["value"].idxmax(), "id"]]
    for name in ("epsilon", "noise_multiplier", "steps"):
        values = rows.loc[rows["metric"] == name, "value"]
        if not values.empty:
            out[name] = float(values.iloc[0])
    return out


def trial_privacy(run_dir: Path) -> dict[str, Any]:
    """A trial's privacy: ``mode`` (None without a ``config.yaml``), ``epsilon`` (inf without
    noise, NaN when nothing says), ``delta``, ``noise_multiplier``, the configured ``clip_norm``
    (the start value under adaptive clipping), ``adaptive_clip`` (its settings as text, "" when
    off), ``accountant``, ``rounds_accounted``, ``noise_text`` (per-client z as a range, else "")
    and ``epsilon_from`` (which file said)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {"mode": None}
    p = (yaml.safe_load(config.read_text()) or {}).get("privacy") or {}  # runs from before DP have none
    mode = p.get("mode", NO_DP)
    adaptive = p.get("adaptive_clip")
    out: dict[str, Any] = {
        "mode": mode, "delta": float(p.get("delta", math.nan)) if mode != NO_DP else math.nan,
        "clip_norm": float(p["clip_norm"]) if mode != NO_DP and "clip_norm" in p else math.nan,
        "adaptive_clip": ", ".join(f"{k} {v}" for k, v in adaptive.items() if v is not None) if adaptive else "",
        "accountant": p.get("accountant", "") if mode != NO_DP else "",
        "noise_multiplier": _worst(p.get("noise_multiplier")) if mode != NO_DP else math.nan, "noise_text": "",
        "epsilon": math.inf if mode == NO_DP else math.nan, "rounds_accounted": math.nan, "epsilon_from": ""}
    if mode == NO_DP:
        return out
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()).get("privacy", {}) if summary_file.is_file() else {}
    if summary.get("mode") == mode:
        eps = _worst(summary.get("epsilon"))
        steps = _worst(summary.get("rounds_accounted"))
        # A null epsilon is a non-finite one (strict JSON): no noise, after at least one round.
        out["epsilon"] = math.inf if math.isnan(eps) and summary.get("epsilon", 0) is None else eps
        out["rounds_accounted"] = steps
        if math.isnan(out["noise_multiplier"]):
            out["noise_multiplier"], out["noise_text"] = _noise(summary.get("noise_multiplier"))
        out["epsilon_from"] = "summary.json"
        return out
    last = last_privacy_round(run_dir)
    if "epsilon" in last:
        out["epsilon"], out["rounds_accounted"] = last["epsilon"], last.get("steps", math.nan)
        if math.isnan(out["noise_multiplier"]):
            out["noise_multiplier"] = last.get("noise_multiplier", math.nan)
        out["epsilon_from"] = f"metrics.parquet round {last['round']}"
    return out


def privacy_records(sweep_dir: Path, outcomes: pd.DataFrame) -> pd.DataFrame:
    """``outcomes`` (one row per trial, ``report.trial_outcomes``) with each trial's privacy."""
    rows = [trial_privacy(run_folder(sweep_dir, t)) for t in outcomes["trial"]]
    return pd.concat([outcomes.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def uses_privacy(records: pd.DataFrame) -> bool:
    """Whether some trial ran with DP: only then does the report get the privacy section."""
    return bool(records["mode"].notna().any() and (records["mode"].dropna() != NO_DP).any())


def other_params(swept: list[str]) -> list[str]:
    """Swept parameters that are not the privacy section's own (nor the seed): a DP curve and its
    no-DP reference are compared only at the same values of these."""
    return [p for p in swept if p != "param:seed" and not (p == PRIVACY_PARAM or p.startswith(PRIVACY_PARAM + "."))]


def _key(row: pd.Series, cols: list[str]) -> tuple:
    return tuple("" if (isinstance(row[c], float) and math.isnan(row[c])) else row[c] for c in cols)


def _varying(frame: pd.DataFrame, cols: list[str]) -> list[str]:
    """The columns whose value differs between rows: a legend names only what tells lines apart."""
    return [c for c in cols if frame[c].astype(str).nunique(dropna=False) > 1]


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "∞" if math.isinf(value) else f"{value:.{digits}g}"


def _spread(values: pd.Series, digits: int = 4) -> str:
    """Mean, with ± sd when the seeds disagree (epsilon agrees unless some round failed)."""
    values = values.dropna().astype(float)
    if values.empty:
        return ""
    if np.isinf(values).any() or len(values) == 1 or values.std(ddof=1) == 0:
        return _fmt(float(values.mean()), digits)
    return f"{_fmt(float(values.mean()), digits)} ± {values.std(ddof=1):.{digits}g}"


def configurations(records: pd.DataFrame, swept: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """Trials grouped by their swept parameters other than the seed (one configuration each),
    ordered: the no-DP reference first, then by line, then by noise multiplier."""
    keys = [p for p in swept if p != "param:seed"]
    groups = list(records.groupby(keys, sort=False, dropna=False)) if keys else [((), records)]
    order = []
    for values, group in groups:
        first = group.iloc[0]
        dp = first["mode"] != NO_DP
        sort = (dp, *_key(first, other_params(swept)), *_key(first, list(LINE_FIELDS)),
                first["noise_multiplier"] if dp else 0.0)
        order.append((tuple(_sortable(v) for v in sort), values, group))
    order.sort(key=lambda item: item[0])
    return [(values if isinstance(values, tuple) else (values,), group) for _, values, group in order]


def _sortable(value: Any) -> tuple:
    """Numbers by value (0.5 before 10), anything else by its text, numbers first."""
    if isinstance(value, (bool, np.bool_)):
        return (0, float(value), "")
    if isinstance(value, (int, float, np.integer, np.floating)) and not math.isnan(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def privacy_table(records: pd.DataFrame, swept: list[str], metric: str) -> pd.DataFrame:
    """One row per configuration: the other swept parameters, mode, clip, noise multiplier,
    epsilon, delta, the final metric (mean ± sd over seeds) and n (the seeds that finished)."""
    rows = []
    for _, group in configurations(records, swept):
        first = group.iloc[0]
        dp = first["mode"] != NO_DP
        clip = _fmt(first["clip_norm"]) + (f" (adaptive: {first['adaptive_clip']})" if first["adaptive_clip"] else "")
        rows.append({**{_label(p): first[p] for p in other_params(swept)}, "mode": first["mode"],
                     "clip": clip if dp else "",
                     "noise multiplier": (first["noise_text"] or _spread(group["noise_multiplier"])) if dp else "",
                     "epsilon": _spread(group["epsilon"]) if dp else "∞ (no DP)",
                     "delta": _fmt(first["delta"]) if dp else "",
                     f"final {metric}": _mean_spread(group["final"]), "n": int(group["final"].notna().sum())})
    return pd.DataFrame(rows)


def curve_points(records: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """What the plot draws: per DP configuration one point (mean epsilon, mean ± sd final metric,
    n) on the line of its clip (and any other setting that differs), and per value of the other
    swept parameters the no-DP level (``kind`` reference)."""
    dp = records[records["mode"] != NO_DP]
    line_cols = _varying(dp, list(LINE_FIELDS)) + _varying(dp, other_params(swept))
    names = {"clip_norm": "clip", "adaptive_clip": "adaptive", **{p: _label(p) for p in swept}}
    rows = []
    for _, group in configurations(records, swept):
        first = group.iloc[0]
        final = group["final"].dropna().astype(float)
        sd = float(final.std(ddof=1)) if len(final) > 1 else 0.0
        if first["mode"] == NO_DP:
            label = ", ".join(f"{_label(p)}={first[p]}" for p in _varying(records, other_params(swept)))
            rows.append({"line": "no DP" + (f" ({label})" if label else ""), "kind": "reference",
                         "noise_multiplier": math.nan, "epsilon": math.inf, "delta": math.nan,
                         "metric": float(final.mean()), "metric_sd": sd, "n": len(final)})
            continue
        label = ", ".join(f"{names.get(c, c)} {_fmt(first[c]) if isinstance(first[c], float) else first[c]}"
                          for c in line_cols) or "DP"
        rows.append({"line": label, "kind": "dp", "noise_multiplier": float(group["noise_multiplier"].mean()),
                     "epsilon": float(group["epsilon"].mean()), "delta": float(first["delta"]),
                     "metric": float(final.mean()), "metric_sd": sd, "n": len(final)})
    return pd.DataFrame(rows, columns=["line", "kind", "noise_multiplier", "epsilon", "delta", "metric", "metric_sd",
                                       "n"])


def plot_privacy_utility(path: Path, points: pd.DataFrame, metric: str, title: str = "") -> Path:
    """Final metric against epsilon (log axis), one line per ``line`` of the DP points, error bars
    where seeds repeat, each reference level dashed (the style of ``plots.py``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    finite = points[(points["kind"] == "dp") & np.isfinite(points["epsilon"])]
    for name, line in finite.groupby("line", sort=False):
        line = line.sort_values("epsilon")
        ax.errorbar(line["epsilon"], line["metric"], yerr=line["metric_sd"] if (line["n"] > 1).any() else None,
                    marker="o", capsize=3, label=name)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ref in enumerate(points[points["kind"] == "reference"].itertuples()):
        ax.axhline(ref.metric, linestyle="--", color="k" if i == 0 else colors[-1 - i % len(colors)],
                   label=f"{ref.line}: {ref.metric:.4f}")
    if not finite.empty and (finite["epsilon"] > 0).all():
        ax.set_xscale("log")  # a sweep's noise multipliers give epsilons an order of magnitude apart
        ticks = sorted(set(np.round(finite["epsilon"], 6)))
        if len(ticks) <= 10:  # each swept epsilon labelled, not the log axis's crowded minor ticks
            from matplotlib.ticker import FixedLocator, NullLocator

            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    deltas = sorted(set(finite["delta"].dropna()))
    ax.set_xlabel(f"epsilon at delta {deltas[0]:g}" if len(deltas) == 1 else "epsilon (at each line's delta)")
    ax.set_ylabel(f"final {metric}")
    return save_figure(fig, ax, path, title)


def privacy_section(out: Path, records: pd.DataFrame, swept: list[str], metric: str, name: str) -> list[str]:
    """The report's privacy section (Markdown lines), its CSVs and its plot in ``out``. Failed
    trials and trials without a reported round are left out, as elsewhere in the report."""
    records.rename(columns=_label).to_csv(out / "privacy_trials.csv", index=False)
    failed = int((records["status"] == FAILED).sum())
    usable = records[(records["status"] != FAILED) & records["mode"].notna() & records["final"].notna()] \
        if "final" in records else records.iloc[0:0]
    lines = ["## Privacy and utility", ""]
    if usable.empty:
        return lines + ["No trial has a final value yet.", ""]
    table = privacy_table(usable, swept, metric)
    table.to_csv(out / "privacy.csv", index=False)
    points = curve_points(usable, swept)
    points.to_csv(out / "privacy_curve.csv", index=False)
    dp = usable[usable["mode"] != NO_DP]
    refs = points[points["kind"] == "reference"]
    lines += [f"Final `{metric}` (the model after every accounted round) against epsilon, the privacy loss at "
              f"delta after the rounds that released a noised model (failed rounds release nothing; fixed-size "
              f"draws accounted as Poisson sampling at the same rate: docs/PRIVACY.md). Mean ± sd over seeds; "
              f"n seeds." + (" At sample level a trial's epsilon is that of its worst client." if
                             (dp["mode"] == "sample").any() else ""), ""]
    if not refs.empty:
        lines += ["Without DP (dashed): " + "; ".join(f"{r.line} {r.metric:.4f} (n {r.n})" for r in refs.itertuples())
                  + ".", ""]
    else:
        lines += ["No trial ran without DP: there is no reference level (add `{mode: none}` to the sweep).", ""]
    lines += [_markdown(table), ""]
    if failed:
        lines += [f"{failed} failed trial(s) left out (see Failed trials).", ""]
    unbounded = dp[np.isinf(dp["epsilon"].astype(float))]
    if not unbounded.empty:
        lines += [f"{unbounded['trial'].nunique()} DP trial(s) with epsilon ∞ (no noise) are in the table but "
                  f"not on the plot's epsilon axis.", ""]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no privacy-utility plot")
        return lines + [f"(matplotlib is not installed: no {PLOT_FILE}; the table has the same values.)", ""]
    plot_privacy_utility(out / PLOT_FILE, points, metric, title=f"{name}: utility against privacy loss")
    return lines + [f"![privacy-utility curve]({PLOT_FILE})", ""]
