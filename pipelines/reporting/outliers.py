"""The run checks' outlier rule: a seed whose metric lies far from its model's median over seeds,
measured in robust units (scaled MAD), so that one wild seed cannot hide itself by widening the
spread it is measured against."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from pipelines.reporting.tables import KEYS

MAD_SCALE = float(1.0 / stats.norm.ppf(0.75))  # 1.4826: σ of a normal sample over its MAD
MEAN_AD_SCALE = math.sqrt(math.pi / 2.0)  # 1.2533: σ of a normal sample over its mean |x − median|
THRESHOLD = 3.0  # scaled MADs from the median beyond which a seed is flagged
MIN_SEEDS = 3  # fewer seeds of a model: no median to stand apart from, nothing flagged
RULE = (f"outlier: a seed whose value of a claim's metric lies more than {THRESHOLD:g} scaled MADs "
        f"({MAD_SCALE:.4f} · median |x − median|) from the median of its model's seeds (same dataset, same "
        f"metric; {MIN_SEEDS} seeds or more); where the MAD is 0 (half the seeds or more share the median "
        f"value) the scale is {MEAN_AD_SCALE:.4f} · mean |x − median| instead (Iglewicz & Hoaglin), and "
        "where that is 0 too (every seed equal) nothing is flagged. A flagged run stays in every mean, CI "
        "and verdict; its learning curve is shown below its table")


def robust_scale(values: Sequence[float]) -> tuple[float, str]:
    """(scale, its name): the scaled MAD of ``values``, or where that is 0 the scaled mean absolute
    deviation from the median (0 when every value is the same)."""
    x = np.asarray(values, dtype=np.float64)
    deviation = np.abs(x - np.median(x))
    mad = MAD_SCALE * float(np.median(deviation))
    if mad > 0.0:
        return mad, "scaled MAD"
    return MEAN_AD_SCALE * float(np.mean(deviation)), "scaled mean absolute deviation (the MAD is 0)"


def robust_distances(values: Sequence[float]) -> np.ndarray:
    """|x − median| of each value in units of :func:`robust_scale`; zeros when every value is the same."""
    x = np.asarray(values, dtype=np.float64)
    scale, _ = robust_scale(x)
    return np.abs(x - np.median(x)) / scale if scale > 0.0 else np.zeros_like(x)


def flag_outliers(values: pd.DataFrame, metrics: Sequence[str]) -> dict[tuple[str, str, int], dict[str, str]]:
    """(dataset, model, seed) -> {metric: why} for each of ``metrics`` on which the run is an outlier
    by :data:`RULE` (``values``: the long frame of ``tables.metric_values``)."""
    flagged: dict[tuple[str, str, int], dict[str, str]] = {}
    chosen = values[values.metric.isin(list(metrics))]
    for (dataset, model, metric), group in chosen.groupby([*KEYS, "metric"], sort=False):
        if len(group) < MIN_SEEDS:
            continue
        x = group["value"].to_numpy()
        scale, name = robust_scale(x)
        for seed, value, distance in zip(group["seed"], x, robust_distances(x)):
            if distance > THRESHOLD:
                flagged.setdefault((dataset, model, int(seed)), {})[metric] = (
                    f"outlier: {metric} {value:.3f} lies {distance:.1f} × the {name} ({scale:.3g}) from the "
                    f"median {float(np.median(x)):.3f} of {model}'s {len(x)} seeds")
    return flagged
