"""Which swept parameter matters, how sure that is, and whether the paper's trend holds.

From a sweep's per-trial outcomes (one row per trial: its parameters and a target such as the
final metric or the rounds to a threshold):

- ``importance``: each parameter's share of the target's variance across trials. A full grid
  (every combination of the swept values, the same number of seeds in each) gets the exact
  variance decomposition of main effects and pairwise interactions (the functional ANOVA of that
  grid: sums of squares of its cell means, which add up to the total). Any other design (random or
  Optuna search, continuous values) gets Optuna's fANOVA evaluator (a random forest over the
  trials), which gives main effects only. The report names which one it used.
- ``main_effects``: per value of a parameter, the mean over every trial with that value (over the
  seeds and the other parameters) and its 95% t-interval; no interval with a single seed.
- ``monotonic_trend``: whether rounds-to-threshold never rises along each axis of a two-parameter
  grid (the paper: 13-14 rounds at (1, 1) down to 5 at (3, 3)), and the cells that break it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RESIDUAL = "residual"  # higher-order interactions and seed-to-seed noise


@dataclass
class Importance:
    """Shares of a target's variance (0..1) by parameter, and by pair where the method gives them."""

    method: str  # "anova" (a full grid's exact decomposition) or "fanova" (Optuna's evaluator)
    main: dict[str, float]
    pairs: dict[tuple[str, str], float] = field(default_factory=dict)
    residual: float | None = None

    def strongest_pair(self) -> tuple[str, str] | None:
        return max(self.pairs, key=self.pairs.get) if self.pairs else None


def _key(value) -> object:
    """A hashable, printable value for a parameter (a strategy dict becomes its JSON)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _prepared(frame: pd.DataFrame, params: list[str], target: str) -> pd.DataFrame:
    data = frame[params + [target]].copy()
    for p in params:
        data[p] = data[p].map(_key)
    return data.dropna(subset=[target]).astype({target: float})


def is_full_grid(frame: pd.DataFrame, params: list[str], target: str) -> bool:
    """Every combination of the observed values present, each with the same number of trials."""
    data = _prepared(frame, params, target)
    if data.empty:
        return False
    cells = data.groupby(params, dropna=False).size()
    expected = math.prod(data[p].nunique(dropna=False) for p in params)
    return len(cells) == expected and cells.nunique() == 1


def importance(frame: pd.DataFrame, params: list[str], target: str, seed: int = 0) -> Importance | None:
    """Each parameter's share of ``target``'s variance over the trials; None when it does not vary."""
    data = _prepared(frame, params, target)
    varied = [p for p in params if data[p].nunique(dropna=False) > 1]
    if len(data) < 2 or not varied or float(data[target].var(ddof=0)) == 0.0:
        return None
    if is_full_grid(data, varied, target):
        return _anova(data, varied, target)
    return _fanova(data, varied, target, seed)


def _anova(data: pd.DataFrame, params: list[str], target: str) -> Importance:
    """A balanced grid's sums of squares: main effects and pairwise interactions, as shares."""
    y = data[target]
    grand = y.mean()
    total = float(((y - grand) ** 2).sum())
    effect = {p: data.groupby(p, dropna=False)[target].transform("mean") - grand for p in params}
    main = {p: float((effect[p] ** 2).sum()) / total for p in params}
    pairs = {}
    for i, a in enumerate(params):
        for b in params[i + 1:]:
            cell = data.groupby([a, b], dropna=False)[target].transform("mean")
            pairs[(a, b)] = float(((cell - grand - effect[a] - effect[b]) ** 2).sum()) / total
    residual = max(0.0, 1.0 - sum(main.values()) - sum(pairs.values()))
    return Importance("anova", main, pairs, residual)


def _fanova(data: pd.DataFrame, params: list[str], target: str, seed: int) -> Importance:
    """Optuna's fANOVA importance over the trials as a study (normalised: shares of main effects)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for p in params:
        values = data[p]
        numeric = pd.api.types.is_numeric_dtype(values) and values.nunique() > 3
        dists[p] = FloatDistribution(float(values.min()), float(values.max())) if numeric else \
            CategoricalDistribution(sorted({str(v) for v in values}))
    study = optuna.create_study(direction="maximize")
    for row in data.to_dict("records"):  # per column types (iterrows makes every value a float)
        trial_params = {p: float(row[p]) if isinstance(dists[p], FloatDistribution) else str(row[p]) for p in params}
        study.add_trial(optuna.trial.create_trial(params=trial_params, distributions=dists, value=float(row[target])))
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), normalize=True)
    return Importance("fanova", {p: float(scores.get(p, 0.0)) for p in params})


@dataclass
class Effect:
    """One parameter's main effect: per value, the mean, its 95% interval (NaN without seeds) and n."""

    param: str
    table: pd.DataFrame  # columns: value, mean, low, high, n


def main_effects(frame: pd.DataFrame, params: list[str], target: str, seeds: int) -> list[Effect]:
    """Mean ± 95% t-interval of ``target`` per value of each parameter, over seeds and the other
    parameters. With one seed the spread is only the other parameters', so no interval is given."""
    from scipy import stats

    data = _prepared(frame, params, target)
    out = []
    for p in params:
        rows = []
        for value, group in data.groupby(p, sort=True, dropna=False):
            y = group[target].to_numpy()
            mean, n = float(y.mean()), len(y)
            half = float(stats.t.ppf(0.975, n - 1) * y.std(ddof=1) / math.sqrt(n)) if seeds > 1 and n > 1 else math.nan
            rows.append({"value": value, "mean": mean, "low": mean - half, "high": mean + half, "n": n})
        out.append(Effect(p, pd.DataFrame(rows)))
    return out


@dataclass
class Trend:
    """Whether a grid's values never rise along each axis, and the cells that break it."""

    rows: str
    cols: str
    along_rows: bool  # never rises as the row parameter grows (in every column)
    along_cols: bool
    violations: list[str]


def monotonic_trend(grid: pd.DataFrame, rows: str, cols: str) -> Trend:
    """``grid``: index = row parameter's values, columns = column parameter's values, cells =
    rounds to threshold (NaN: not reached, counted as never). A cell breaks the trend when it needs
    more rounds than the cell before it along an axis."""
    grid = grid.sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    values = np.where(np.isnan(values), np.inf, values)
    violations, ok = [], {"rows": True, "cols": True}

    def label(i: int, j: int) -> str:
        return f"{rows}={grid.index[i]}, {cols}={grid.columns[j]}"

    def show(v: float) -> str:
        return "not reached" if np.isinf(v) else f"{v:g}"

    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if i and values[i, j] > values[i - 1, j]:
                ok["rows"] = False
                violations.append(f"({label(i, j)}): {show(values[i, j])} after {show(values[i - 1, j])} "
                                  f"at {rows}={grid.index[i - 1]}")
            if j and values[i, j] > values[i, j - 1]:
                ok["cols"] = False
                violations.append(f"({label(i, j)}): {show(values[i, j])} after {show(values[i, j - 1])} "
                                  f"at {cols}={grid.columns[j - 1]}")
    return Trend(rows, cols, ok["rows"], ok["cols"], violations)


def trend_statement(trend: Trend, what: str) -> str:
    """One paragraph: holds or not along each axis, and the breaking cells."""
    def axis(name: str, holds: bool) -> str:
        return f"{'never rise' if holds else 'do not fall monotonically'} as {name} grows"

    text = f"{what} {axis(trend.rows, trend.along_rows)} and {axis(trend.cols, trend.along_cols)}."
    if trend.violations:
        text += " Cells that break it: " + "; ".join(trend.violations) + "."
    else:
        text += " The paper's trend holds in every cell."
    return text


def what_matters(imp: Importance, target: str) -> str:
    """A sentence from the numbers: the parameters by share, the strongest interaction, the rest."""
    ranked = sorted(imp.main.items(), key=lambda kv: -kv[1])
    parts = [f"{p} {share:.0%}" for p, share in ranked]
    text = f"For {target}, " + (f"{ranked[0][0]} explains {ranked[0][1]:.0%} of the variance across trials"
                                if ranked else "nothing varies")
    if len(parts) > 1:
        text += "; " + "; ".join(parts[1:])
    pair = imp.strongest_pair()
    if pair is not None:
        text += f"; the strongest interaction, {pair[0]} × {pair[1]}, {imp.pairs[pair]:.0%}"
    if imp.residual is not None:
        text += f"; the rest (seed noise and higher-order interactions) {imp.residual:.0%}"
    how = ("exact variance decomposition of the full grid" if imp.method == "anova"
           else "Optuna's fANOVA importance (not a full grid; main effects only)")
    return text + f" ({how})."
