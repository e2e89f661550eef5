"""The report's figures: training curves over seeds, grouped bars of the tables, and sample grids.

The sample grids are made by the train stage (``torchvision.utils.save_image``); the report copies
the lowest seed's grid, enlarged pixel for pixel when it is too small to be seen. ``write_plot_data``
writes the curves of every run of a dataset as one long table for ``dvc plots`` (docs/dvc.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import csv

import numpy as np
import pandas as pd

MIN_FIGURE_WIDTH = 256  # px: smaller sample grids (16x16 patches) are enlarged to be seen
PLOT_DATA_FIELDS = ("dataset", "model", "seed", "metric", "step", "value")  # dvc plots data (long format)


def read_curve(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one column of a training-curve CSV, skipping empty cells."""
    frame = pd.read_csv(path) if Path(path).is_file() else pd.DataFrame()
    if column not in frame:
        return np.asarray([]), np.asarray([])
    frame = frame.dropna(subset=[column])
    return frame["step"].to_numpy(float), frame[column].to_numpy(float)


def curves(records: Sequence[Mapping[str, Any]], dataset: str, models: Sequence[str], column: str) -> dict[str, list]:
    """Model -> the (steps, values) of ``column`` of each of its runs on ``dataset``."""
    return {m: [read_curve(r["curve"], column) for r in records if r["dataset"] == dataset and r["model"] == m]
            for m in models}


def _axes(figsize: tuple[float, float]) -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return (plt, *plt.subplots(figsize=figsize))


def _save(plt: Any, fig: Any, ax: Any, path: Path, title: str) -> None:
    """Title, legend and layout; write a PNG (creating its folder) and release the figure."""
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], path: Path, title: str,
                ylabel: str = "train bpd") -> None:
    """Per model: the mean over seeds of y(step) and a min–max band, on the steps all seeds share."""
    plt, fig, ax = _axes((6, 4))
    for model, seeds in curves.items():
        seeds = [(np.asarray(x, float), np.asarray(y, float)) for x, y in seeds if len(x)]
        if not seeds:
            continue
        common = seeds[0][0]
        for x, _ in seeds[1:]:
            common = np.intersect1d(common, x)
        ys = np.stack([np.interp(common, x, y) for x, y in seeds])
        line, = ax.plot(common, ys.mean(axis=0), label=f"{model} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(common, ys.min(axis=0), ys.max(axis=0), alpha=0.25, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    _save(plt, fig, ax, path, title)


def plot_bars(rows: pd.DataFrame, metrics: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars (one group per metric, one bar per row/model) with ± std error bars."""
    plt, fig, ax = _axes((max(5, 1.6 * len(metrics) * max(1, len(rows)) / 2), 4))
    width, x = 0.8 / max(1, len(rows)), np.arange(len(metrics))
    means, stds = (rows.reindex(columns=[f"{m}_{s}" for m in metrics]).to_numpy(float) for s in ("mean", "std"))
    for i, (model, mean, std) in enumerate(zip(rows["model"], means, np.where(np.isfinite(stds), stds, 0.0))):
        ax.bar(x + i * width - 0.4 + width / 2, mean, width, yerr=std, capsize=3, label=str(model))
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=20)
    _save(plt, fig, ax, path, title)


def copy_grid(paths: Sequence[Path], out: Path) -> bool:
    """Write the first existing sample grid of ``paths`` (lowest seed first) to ``out``, enlarged by
    an integer factor with nearest-neighbour pixels when narrower than ``MIN_FIGURE_WIDTH``."""
    from PIL import Image

    for path in (p for p in paths if Path(p).is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            factor = max(1, -(-MIN_FIGURE_WIDTH // image.width))
            image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(out)
        return True
    return False


def write_plot_data(records: Sequence[Mapping[str, Any]], dataset: str, models: Sequence[str],
                    metrics: Mapping[str, str], path: Path) -> int:
    """The curves of every run of ``dataset`` as one long CSV for ``dvc plots`` (dvc.yaml's top-level
    ``plots``, template ``pipelines/reporting/dvc_curves.json``): one row per model, seed, metric and
    step, ``metric`` naming the curve column (``metrics``: column -> label, e.g. ``bpd`` -> ``train
    bpd``). Values as the curve files hold them (no averaging: the template draws seed means and
    ranges). Returns the number of rows written (atomically)."""
    rows = []
    for model in models:
        for record in sorted((r for r in records if r["dataset"] == dataset and r["model"] == model),
                             key=lambda r: r["seed"]):
            for column, label in metrics.items():
                steps, values = read_curve(record["curve"], column)
                rows += [(dataset, model, record["seed"], label, int(step), repr(float(value)))
                         for step, value in zip(steps, values)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PLOT_DATA_FIELDS)
        writer.writerows(rows)
    tmp.replace(path)
    return len(rows)
