"""Statistics over seeds and the report's tables (markdown and CSV) on pandas and scipy.

Seeds are the replicates: a cell is mean ± sample std (ddof=1) over seeds; a model comparison is the
difference of means with Welch's confidence interval and t-test (``scipy.stats.ttest_ind``,
``equal_var=False``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

NA = "n/a"


class Summary(NamedTuple):
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count of finite values."""

    mean: float
    std: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the finite values (the others are dropped); NaNs when there are none."""
    s = pd.Series(values, dtype=np.float64)
    s = s[np.isfinite(s)]
    return Summary(float(s.mean()), float(s.std()), int(s.size))


class Comparison(NamedTuple):
    """``mean(a) − mean(b)`` with its Welch confidence interval, t statistic, df and p-value."""

    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p_value: float
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Comparison:
    """Welch comparison of the finite values of two samples; CI and test are NaN when either has
    fewer than two values, and the CI is the difference itself when neither varies."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xa, xb = (np.asarray(x, dtype=np.float64) for x in (a, b))
    xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    na, nb = xa.size, xb.size
    diff = float(xa.mean() - xb.mean()) if na and nb else math.nan
    if na < 2 or nb < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, math.nan, math.nan, na, nb)
    if xa.var() == 0.0 and xb.var() == 0.0:  # identical constant samples: no spread, no test
        return Comparison(diff, diff, diff, math.nan, math.nan, math.nan, na, nb)
    test = stats.ttest_ind(xa, xb, equal_var=False)
    ci = test.confidence_interval(confidence)
    return Comparison(diff, float(ci.low), float(ci.high), float(test.statistic), float(test.df),
                      float(test.pvalue), na, nb)


# -- formatting ----------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (integers with thousands commas), "n/a" for None/NaN."""
    if value is None or isinstance(value, (str, bool)):
        return NA if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{float(value):.{digits}f}" if math.isfinite(value) else NA


def fmt_pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    """"mean ± std" (just the mean when std is undefined, "n/a" without values)."""
    if not n:
        return NA
    return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if math.isfinite(std) else "")


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return NA
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def markdown_table(frame: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None) -> str:
    """A GitHub-flavoured markdown table of ``columns`` (titled ``headers``), cells through ``fmt``."""
    cells = pd.DataFrame(frame, dtype=object).reindex(columns=list(columns)).astype(object)
    cells = cells.map(lambda v: fmt(v).replace("|", "\\|"))
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_csv(frame: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Raw values as CSV (floats ``%.6g``, NaN/None as empty cells)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cells = pd.DataFrame(frame, dtype=object).reindex(columns=list(columns)).astype(object)
    cells.map(_csv_cell).to_csv(path, index=False, lineterminator="\n")


# -- tables --------------------------------------------------------------------------------------

KEYS = ["dataset", "model"]


def metric_values(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long frame (dataset, model, seed, metric, value) of every finite number in the records'
    ``metrics``, seeds in increasing order."""
    rows = [(r["dataset"], r["model"], r["seed"], k, float(v)) for r in records for k, v in r["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    frame = pd.DataFrame(rows, columns=[*KEYS, "seed", "metric", "value"])
    return frame.sort_values("seed", kind="stable")


def values_of(values: pd.DataFrame, dataset: str, model: str, metric: str) -> np.ndarray:
    """The metric of every seed of (dataset, model), seeds in increasing order."""
    return values.loc[(values.dataset == dataset) & (values.model == model) & (values.metric == metric),
                      "value"].to_numpy()


def keys(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Distinct (dataset, model) pairs in first-seen order."""
    return pd.DataFrame(records, columns=KEYS).drop_duplicates(ignore_index=True)


def paper_entry(paper: Mapping[str, Any], family: str, dataset: str, model: str, metric: str) -> Optional[Mapping[str, Any]]:
    """The paper's value for a cell (``paper[family][dataset][model][metric]``), or None."""
    entry = paper.get(family, {}).get(dataset, {}).get(model, {})
    entry = entry.get(metric) if isinstance(entry, Mapping) else None
    return entry if isinstance(entry, Mapping) and entry.get("value") is not None else None


def metric_rows(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], family: str,
                paper: Mapping[str, Any], paper_metric: Optional[str] = None) -> pd.DataFrame:
    """One row per (dataset, model): ``<metric>_mean/_std/_pm`` over seeds, ``seeds`` (the most values
    of any metric), ``num_params``, the paper's value and ``diff_vs_paper`` = mean(paper_metric) − paper."""
    values = metric_values(records)
    index = pd.MultiIndex.from_frame(keys(records))
    columns = pd.MultiIndex.from_product([["mean", "std", "count"], metrics])
    agg = (values[values.metric.isin(metrics)].groupby([*KEYS, "metric"])["value"].agg(["mean", "std", "count"])
           .unstack("metric").reindex(index=index, columns=columns))
    rows = pd.DataFrame({f"{m}_{s}": agg[(s, m)] for m in metrics for s in ("mean", "std")}, index=index)
    for m in metrics:
        rows[f"{m}_pm"] = [fmt_pm(*cell) for cell in zip(agg[("mean", m)], agg[("std", m)], agg[("count", m)].fillna(0))]
    rows["seeds"] = agg["count"].max(axis=1).fillna(0).astype(int).astype(object) if metrics else 0
    params = pd.DataFrame(records, columns=[*KEYS, "num_params"], dtype=object).dropna().drop_duplicates(KEYS).set_index(KEYS)
    rows["num_params"] = params["num_params"].reindex(index).astype(object)
    entries = [paper_entry(paper, family, d, m, paper_metric) if paper_metric else None for d, m in index]
    rows["paper"] = [float(e["value"]) if e else math.nan for e in entries]
    rows["paper_source"] = [f"{e.get('source', '?')} ({'verified' if e.get('verified') else 'unverified'})"
                            if e else NA for e in entries]
    rows["diff_vs_paper"] = rows[f"{paper_metric}_mean"] - rows["paper"] if paper_metric else math.nan
    return rows.astype(object).where(rows.notna(), None).reset_index()


def comparison_rows(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], candidate: str = "sdn",
                    confidence: float = 0.95) -> pd.DataFrame:
    """``candidate − other`` (Welch) for every other model of each dataset and each metric."""
    values, pairs, rows = metric_values(records), keys(records), []
    for dataset, models in pairs.groupby("dataset", sort=False)["model"]:
        if candidate not in set(models):
            continue
        for other in (m for m in models if m != candidate):
            for metric in metrics:
                c = welch(values_of(values, dataset, candidate, metric), values_of(values, dataset, other, metric),
                          confidence)
                if c.n_a and c.n_b:
                    rows.append({"dataset": dataset, "metric": metric, "comparison": f"{candidate} − {other}",
                                 **c._asdict(), "ci": f"[{fmt(c.ci_low)}, {fmt(c.ci_high)}]", "p": fmt_p(c.p_value)})
    return pd.DataFrame(rows, dtype=object)


COMPARISON_COLUMNS = ["dataset", "metric", "comparison", "diff", "ci", "p", "n_a", "n_b"]
COMPARISON_CSV = ["dataset", "metric", "comparison", "diff", "ci_low", "ci_high", "t", "df", "p_value", "n_a", "n_b"]
