"""A benchmark's ``benchmark.md`` and per-site bar charts (``cxrfl_ray.benchmark``), all from
``benchmark.csv`` and ``trials.csv``, so the report can be rebuilt without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfl_ray.report import _markdown, _mean_spread
from cxrfl_ray.tasks import TASKS

LOCAL = "local-only"


def _row_name(method: str, train_site: str) -> str:
    return f"{method} ({train_site})" if train_site != "all" else method


def _header(test: str) -> str:
    scope, _, site = test.partition(":")
    return {"site": site, "holdout": f"{site} (held out)", "personal": f"{site} (its own model)",
            "adapted": f"{site} (held out, AdaBN)"}.get(scope, "pooled test")


def _tests(frame: pd.DataFrame) -> list[str]:
    """Test sets in reading order: pooled, each site's test rows, the held-out sites."""
    order = {"pooled": 0, "site": 1, "holdout": 2, "personal": 3, "adapted": 4}
    return sorted(frame["test"].unique(), key=lambda t: (order[t.partition(":")[0]], t))


def _training(record: pd.Series) -> str:
    """How a model spent its budget, e.g. ``3 rounds x 1 epoch(s) x 3 clients`` or ``9 epochs``."""
    unit = f"{int(record['steps'])} steps of {int(record['batch_size'])}" if pd.notna(record["steps"]) \
        else "a full pass"
    if record["kind"] == "federated":
        return (f"{int(record['rounds'])} rounds x {int(record['epochs'])} epoch(s) x "
                f"{int(record['clients_per_round'])} clients; epoch = {unit}")
    return f"{int(record['epochs'])} epochs of {unit}"


def results_table(frame: pd.DataFrame, records: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows: models (pooled, each local-only, each federated method); columns: budget, then
    mean ± sd (n seeds) of ``metric`` on each test set."""
    tests = _tests(frame)
    rows = []
    for (method, site), group in records.groupby(["method", "train_site"], sort=False):
        values = frame[(frame["method"] == method) & (frame["train_site"] == site) & (frame["metric"] == metric)]
        seen = group["rows_seen"].astype(int)
        row = {"model": _row_name(method, site), "training": _training(group.iloc[0]),
               "rows seen": str(seen.iloc[0]) if seen.nunique() == 1 else f"{seen.min()}-{seen.max()}"}
        for test in tests:
            cell = values[values["test"] == test]["value"]
            row[_header(test)] = f"{_mean_spread(cell)} (n={cell.notna().sum()})" if len(cell) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _stats(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna().astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def held_out_finding(frame: pd.DataFrame, records: pd.DataFrame, task: str) -> str:
    """Where federated models beat every local-only model on a held-out site and where not,
    comparing means over seeds (and saying when a gap is within the seeds' spread)."""
    metric, mode = TASKS[task].main_metric, TASKS[task].mode
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    scores = frame[frame["metric"] == metric]
    held = [t for t in _tests(scores) if t.startswith("holdout:")]
    kinds = records.drop_duplicates("method").set_index("method")["kind"]
    fed = [m for m, k in kinds.items() if k == "federated"]
    local = [m for m, k in kinds.items() if k == "local"]
    if not held:
        return f"{task}: no site is held out, so generalisation to an unseen site is not measured."
    if not fed or not local:
        return f"{task}: the benchmark needs federated and local-only methods to compare them on held-out sites."
    sentences = []
    for test in held:
        here = scores[scores["test"] == test]
        locals_ = {site: _stats(g["value"]) for site, g in here[here["method"].isin(local)].groupby("train_site")}
        best_site = (max if mode == "max" else min)(locals_, key=lambda s: locals_[s][0])
        l_mean, l_sd, _ = locals_[best_site]
        wins, losses = [], []
        for method in fed:
            mean, sd, n = _stats(here[here["method"] == method]["value"])
            if n == 0:
                continue
            close = " (within the seeds' spread)" if abs(mean - l_mean) <= max(sd, l_sd) else ""
            (wins if better(mean, l_mean) else losses).append(f"{method} {mean:.3f}{close}")
        site = test.partition(":")[2]
        text = f"On held-out {site} ({metric}, mean over seeds), against the best local-only model (trained on " \
               f"{best_site}: {l_mean:.3f}), FL "
        text += (f"beats it with {', '.join(wins)}" if wins else f"does not beat it with any method ({', '.join(losses)})")
        text += f" and does not with {', '.join(losses)}." if wins and losses else "."
        sentences.append(text)
    return f"{task}: " + " ".join(sentences)


def plot_sites(path: Path, frame: pd.DataFrame, records: pd.DataFrame, task: str) -> Path:
    """Bars per site's test rows and per held-out site (shaded, marked): pooled, local-only (the
    site's own model; on a held-out site the mean of all local models), each federated method and,
    where it has them, its sites' own models (FedBN), mean over seeds with the sd as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task].main_metric
    scores = frame[frame["metric"] == metric]
    tests = [t for t in _tests(scores) if t.startswith(("site:", "holdout:"))]
    kinds = records.drop_duplicates("method").set_index("method")["kind"]
    local = [m for m, k in kinds.items() if k == "local"]
    personal = set(scores[scores["test"].str.startswith("personal:")]["method"])
    adapted = set(scores[scores["test"].str.startswith("adapted:")]["method"])
    series = [m for m, k in kinds.items() if k == "pooled"] + ([LOCAL] if local else [])
    for m in (m for m, k in kinds.items() if k == "federated"):
        series += [m] + ([f"{m} (own model)"] if m in personal else []) + ([f"{m} (AdaBN)"] if m in adapted else [])

    def values(name: str, test: str) -> pd.Series:
        here = scores[scores["test"] == test]
        if name.endswith(" (AdaBN)"):  # the global model with a held-out site's own BatchNorm statistics
            mine = scores[scores["test"] == f"adapted:{test.removeprefix('holdout:')}"] if test.startswith("holdout:") \
                else scores.iloc[:0]
            return mine[mine["method"] == name.removesuffix(" (AdaBN)")]["value"]
        if name.endswith(" (own model)"):  # a site's own model exists for its own site only
            mine = scores[scores["test"] == f"personal:{test.removeprefix('site:')}"] if test.startswith("site:") \
                else scores.iloc[:0]
            return mine[mine["method"] == name.removesuffix(" (own model)")]["value"]
        if name != LOCAL:
            return here[here["method"] == name]["value"]
        mine = here[here["method"].isin(local)]
        own = mine[mine["train_site"] == test.partition(":")[2]]
        return own["value"] if test.startswith("site:") and len(own) else mine["value"]

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tests), 4.2), dpi=100)
    for j, name in enumerate(series):
        stats = [_stats(values(name, t)) if len(values(name, t)) else (np.nan, 0.0, 0) for t in tests]
        ax.bar(np.arange(len(tests)) + (j - (len(series) - 1) / 2) * width, [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=2, label=name)
    for i, test in enumerate(tests):
        if test.startswith("holdout:"):
            ax.axvspan(i - 0.45, i + 0.45, color="0.85", zorder=0)
    ax.set_xticks(range(len(tests)), [_header(t).replace(" (held out)", "\n(held out)") for t in tests])
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{task}: best checkpoint per model, mean ± sd over seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _personal_note(frame: pd.DataFrame) -> list[str]:
    """What the "its own model" columns are, where a method has them."""
    methods = sorted(set(frame[frame["test"].str.startswith("personal:")]["method"]))
    if not methods:
        return []
    return [f"{', '.join(methods)}: the site columns are the global model (BatchNorm at its initial values: what "
            f"a new hospital gets), picked by central val like every model; \"its own model\" is each site's model "
            f"(the global weights plus that site's BatchNorm) of the last round, on that site's test rows (it is "
            f"not evaluated on val, so nothing picks a best round for it)."
            + (" \"held out, AdaBN\" is the global model of the same best round on the held-out site with BatchNorm "
               "statistics computed from that site's own (unlabeled) images." if
               frame["test"].str.startswith("adapted:").any() else ""), ""]


def write_report(out: Path, spec, failed: dict[str, str]) -> Path:
    """``OUT/benchmark.md`` (and a PNG per task) from the benchmark's CSVs."""
    from cxrfl_ray.benchmark import CSV_FILE, TRIALS_FILE

    frame = pd.read_csv(out / CSV_FILE)
    records = pd.read_csv(out / TRIALS_FILE)
    seeds = sorted(records["seed"].unique().tolist())
    lines = [f"# Benchmark {spec.name}", "",
             f"Methods: {', '.join(m.title for m in spec.methods)}; seeds {seeds}. Each model is its best "
             f"checkpoint by the central val split, evaluated on the pooled test split, each site's test rows "
             f"and every held-out site. Cells: mean ± sd over seeds (n). Every value is in `{CSV_FILE}`; the "
             f"budget and wall time of each trial in `{TRIALS_FILE}`.", ""]
    for task in records["task"].unique():
        metric = TASKS[task].main_metric
        mine, recs = frame[frame["task"] == task], records[records["task"] == task]
        seen = recs["rows_seen"].astype(int)
        budget = (f"every model saw {seen.iloc[0]} training rows" if seen.nunique() == 1
                  else f"models saw {seen.min()}-{seen.max()} training rows")
        png = f"{task}_sites.png"
        plot_sites(out / png, mine, recs, task)
        lines += [f"## {task}: test {metric}", "",
                  f"Budget (rows seen, counted in the run folders): {budget}; federated: rounds x local epochs "
                  f"x clients per round, pooled and local-only: as many epochs as see as many rows.", "",
                  _markdown(results_table(mine, recs, metric)), "", *_personal_note(mine), f"![{task} per site]({png})", "",
                  f"**Held-out sites.** {held_out_finding(mine, recs, task)}", ""]
    if failed:
        lines += ["## Failed trials", "", *[f"- `{k}`: {v}" for k, v in failed.items()], ""]
    path = out / "benchmark.md"
    path.write_text("\n".join(lines))
    return path
