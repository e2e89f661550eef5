"""Statistics, tables and figures of the study report (used by ``pipelines/report.py``).

Seeds are the replicates: each table cell is mean ± sample std (ddof=1) over seeds, and a model
comparison is the difference of means with a Welch 95% confidence interval and Welch's t-test
p-value (``scipy.stats.ttest_ind(equal_var=False)``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

NA = "n/a"


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count."""

    mean: float
    std: float
    n: int


def summarize(values: Iterable[float]) -> Summary:
    """Summary of the finite values (non-finite ones are dropped); NaNs when there are none."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return Summary(float(arr.mean()), std, int(arr.size))


@dataclass(frozen=True)
class Comparison:
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
    """Welch comparison of two samples; CI and test are NaN when either has fewer than two values.

    CI: diff ± t_{(1+confidence)/2, ν} · se with se² = s_a²/n_a + s_b²/n_b and the
    Welch–Satterthwaite ν; p-value from ``scipy.stats.ttest_ind(a, b, equal_var=False)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    na, nb = int(xa.size), int(xb.size)
    if na == 0 or nb == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, na, nb)
    diff = float(xa.mean() - xb.mean())
    if na < 2 or nb < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, math.nan, math.nan, na, nb)
    va, vb = xa.var(ddof=1) / na, xb.var(ddof=1) / nb
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical constant samples: no spread, no test
        return Comparison(diff, diff, diff, math.nan, math.nan, math.nan, na, nb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df)) * se
    test = stats.ttest_ind(xa, xb, equal_var=False)
    return Comparison(diff, diff - half, diff + half, float(test.statistic), float(df), float(test.pvalue), na, nb)


# -- formatting ----------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, "n/a" for None/NaN, strings unchanged."""
    if value is None:
        return NA
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    value = float(value)
    if not math.isfinite(value):
        return NA
    return f"{value:.{digits}f}"


def fmt_pm(summary: Summary, digits: int = 3) -> str:
    """"mean ± std" (just the mean when std is undefined)."""
    if summary.n == 0:
        return NA
    if not math.isfinite(summary.std):
        return fmt(summary.mean, digits)
    return f"{fmt(summary.mean, digits)} ± {fmt(summary.std, digits)}"


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return NA
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (already formatted strings or numbers)."""
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Raw (unformatted) values as CSV; NaN/None are written as empty cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            clean = {}
            for c in columns:
                v = row.get(c)
                if isinstance(v, float) and not math.isfinite(v):
                    v = None
                clean[c] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
            writer.writerow(clean)


# -- tables --------------------------------------------------------------------------------------

def _values(records: Sequence[Mapping[str, Any]], dataset: str, model: str, metric: str) -> list[float]:
    """The metric of every seed of (dataset, model), seeds in increasing order, numbers only."""
    out = []
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["dataset"] == dataset and r["model"] == model:
            v = r.get("metrics", {}).get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
    return out


def _keys(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Distinct (dataset, model) pairs in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        seen.setdefault((r["dataset"], r["model"]), None)
    return list(seen)


def paper_entry(paper: Mapping[str, Any], family: str, dataset: str, model: str, metric: str) -> Optional[Mapping[str, Any]]:
    """The paper's value for a cell (``paper[family][dataset][model][metric]``), or None."""
    entry = paper.get(family, {}).get(dataset, {}).get(model, {})
    entry = entry.get(metric) if isinstance(entry, Mapping) else None
    if isinstance(entry, Mapping) and entry.get("value") is not None:
        return entry
    return None


def metric_rows(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    family: str,
    paper: Mapping[str, Any],
    paper_metric: Optional[str] = None,
) -> list[dict[str, Any]]:
    """One row per (dataset, model): per-metric mean/std, seeds, parameter count, paper value, diff.

    The difference is ``mean(paper_metric) − paper value`` (positive: worse bpd than the paper).
    """
    rows = []
    for dataset, model in _keys(records):
        row: dict[str, Any] = {"dataset": dataset, "model": model}
        n = 0
        for metric in metrics:
            s = summarize(_values(records, dataset, model, metric))
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.mean, s.std
            row[f"{metric}_pm"] = fmt_pm(s)
            n = max(n, s.n)
        row["seeds"] = n
        params = [r.get("num_params") for r in records if r["dataset"] == dataset and r["model"] == model]
        row["num_params"] = next((p for p in params if p is not None), None)
        entry = paper_entry(paper, family, dataset, model, paper_metric) if paper_metric else None
        row["paper"] = float(entry["value"]) if entry else None
        row["paper_source"] = (
            f"{entry.get('source', '?')} ({'verified' if entry.get('verified') else 'unverified'})" if entry else NA
        )
        if entry and paper_metric:
            row["diff_vs_paper"] = row[f"{paper_metric}_mean"] - float(entry["value"])
        else:
            row["diff_vs_paper"] = None
        rows.append(row)
    return rows


def comparison_rows(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    candidate: str = "sdn",
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """``candidate − other`` for every other model of each dataset and each metric (Welch)."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        models = [m for d, m in _keys(records) if d == dataset]
        if candidate not in models:
            continue
        for other in models:
            if other == candidate:
                continue
            for metric in metrics:
                c = welch(_values(records, dataset, candidate, metric), _values(records, dataset, other, metric), confidence)
                if c.n_a == 0 or c.n_b == 0:
                    continue
                rows.append({
                    "dataset": dataset, "metric": metric, "comparison": f"{candidate} − {other}",
                    "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "t": c.t, "df": c.df,
                    "p_value": c.p_value, "n_a": c.n_a, "n_b": c.n_b,
                    "ci": f"[{fmt(c.ci_low)}, {fmt(c.ci_high)}]", "p": fmt_p(c.p_value),
                })
    return rows


# -- figures -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], path: Path, title: str,
                ylabel: str = "train bpd") -> None:
    """Per model: the mean over seeds of y(step) and a min–max band, on the steps all seeds share."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, seeds in curves.items():
        seeds = [(np.asarray(x, float), np.asarray(y, float)) for x, y in seeds if len(x)]
        if not seeds:
            continue
        common = seeds[0][0]
        for x, _ in seeds[1:]:
            common = np.intersect1d(common, x)
        ys = np.stack([np.interp(common, x, y) for x, y in seeds])
        mean = ys.mean(axis=0)
        line, = ax.plot(common, mean, label=f"{model} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(common, ys.min(axis=0), ys.max(axis=0), alpha=0.25, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save_figure(plt, fig, path)


def _save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write a PNG (creating its folder) and release the figure."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars (one group per metric, one bar per row/model) with ± std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) * max(1, len(rows)) / 2), 4))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        means = [row.get(f"{m}_mean", math.nan) for m in metrics]
        stds = [row.get(f"{m}_std", math.nan) for m in metrics]
        stds = [s if s is not None and math.isfinite(s) else 0.0 for s in stds]
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=3, label=str(row["model"]))
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=20)
    ax.set_title(title)
    ax.legend()
    _save_figure(plt, fig, path)


# -- the study report ------------------------------------------------------------------------------

PAPER_DENSITY_CONFIGS = ("cifar10", "imagenet32", "celebahq256")
PAPER_IW_SAMPLES = 1024
PAPER_FID_SAMPLES = 50_000
DENSITY_METRICS = ("elbo_bpd", "iw_bpd")
# The scores the disentanglement tables show (the CSV keeps every score the metrics returned).
HEADLINE_DISENTANGLEMENT = ("beta_vae.eval_accuracy", "factor_vae.eval_accuracy", "mig.discrete_mig",
                            "dci.disentanglement", "dci.completeness", "dci.informativeness_test", "sap.SAP_score")
_VERSIONED = ("sdn-repro", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "mlflow", "dvc", "torch-fidelity")


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _read_curve(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one curve column, skipping empty cells."""
    steps, values = [], []
    if Path(path).is_file():
        with Path(path).open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(column) not in (None, ""):
                    steps.append(float(row["step"]))
                    values.append(float(row[column]))
    return np.asarray(steps), np.asarray(values)


def collect_records(study: Any) -> list[dict[str, Any]]:
    """One record per run of the study from its DVC metrics files (missing files: empty metrics)."""
    records = []
    for run in study.runs():
        paths = study.paths(run)
        train = _read_json(paths.train_metrics) or {}
        metrics = {k: v for k, v in (_read_json(paths.eval_metrics) or {}).items() if not k.startswith("settings.")}
        fid = _read_json(paths.fid_metrics) if run.family == "density" else None
        records.append({
            "family": run.family, "dataset": run.dataset, "model": run.model, "seed": run.seed,
            "num_params": train.get("num_params"), "train": train, "metrics": metrics, "fid": fid,
            "curve": paths.curve, "samples": paths.samples, "reconstructions": paths.reconstructions,
        })
    return records


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine the results."""
    from importlib import metadata
    import platform

    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def reductions(study: Any) -> list[str]:
    """What this study changes from the paper's protocol, one sentence each (empty: the paper's)."""
    out = []
    for dataset in study.datasets("density"):
        sec = study.section("density", dataset)
        if sec["config"] not in PAPER_DENSITY_CONFIGS or dataset != sec["config"]:
            out.append(f"density on `{dataset}` with config `{sec['config']}` (paper: CIFAR-10, ImageNet32, "
                       "CelebAHQ256 with their own configs)")
        if sec["overrides"]:
            out.append(f"`{dataset}` config overridden: {json.dumps(sec['overrides'], sort_keys=True)}")
        k = sec["eval"]["iw_samples"]
        if k < PAPER_IW_SAMPLES:
            out.append(f"`{dataset}`: importance-weighted bound with K = {k} (paper: {PAPER_IW_SAMPLES})")
        if sec["eval"]["max_examples"] is not None:
            out.append(f"`{dataset}`: evaluated on the first {sec['eval']['max_examples']} test images (paper: all)")
    for dataset in study.datasets("disentanglement"):
        sec = study.section("disentanglement", dataset)
        if dataset != "shapes3d" or sec["config"] != "shapes3d":
            out.append(f"disentanglement on `{dataset}` with VAE config `{sec['config']}` (paper: 3DShapes, `shapes3d`)")
        m = sec["metrics"]
        if (m.get("num_train") or 10000) < 10000 or (m.get("num_eval") or 5000) < 5000:
            out.append(f"`{dataset}`: metrics with num_train={m.get('num_train')}, num_eval={m.get('num_eval')} "
                       "(disentanglement_lib: 10000 / 5000)")
        if m.get("batch_size", 64) < 64:
            out.append(f"`{dataset}`: BetaVAE / FactorVAE average {m['batch_size']} observations per point "
                       "(disentanglement_lib: 64)")
        skipped = [name for name in ("beta_vae", "factor_vae", "mig", "dci", "sap") if name not in m.get("metrics", [name])]
        if skipped:
            out.append(f"`{dataset}`: not computed: {', '.join(skipped)} (disentanglement.{dataset}.metrics.metrics)")
    n = study.params["fid"]["num_samples"]
    if n < PAPER_FID_SAMPLES:
        out.append(f"FID from {n} samples (paper convention: {PAPER_FID_SAMPLES})")
    return out


def _fid_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per density model: FID and KID (torch-fidelity) over seeds; where they are n/a, the
    ``seeds_shown`` cell gives the recorded reason instead of a seed count of 0."""
    rows = []
    for dataset, model in _keys([r for r in records if r["family"] == "density"]):
        fids = [r["fid"] for r in records if r["dataset"] == dataset and r["model"] == model and r["fid"]]
        s = summarize([f["value"] for f in fids if f.get("available")])
        kid = [f for f in fids if f.get("kid_available")]
        k = summarize([f["kid_mean"] for f in kid])
        k_milli = summarize([1000.0 * f["kid_mean"] for f in kid])
        reasons = "; ".join(sorted({f.get("reason") or "" for f in fids if not f.get("available")}))
        kid_reasons = "; ".join(sorted({f.get("kid_reason") or "" for f in fids
                                        if f.get("available") and not f.get("kid_available")}))
        first = kid[0] if kid else (fids[0] if fids else {})
        if not fids:
            shown = NA
        elif s.n == len(fids):
            shown = str(s.n)
        else:
            shown = f"{s.n} of {len(fids)} (n/a ({reasons}))" if s.n else f"n/a ({reasons})"
        subsets = (f"{first['kid_subsets']} x {first['kid_subset_size']}" if first.get("kid_subset_size") else NA)
        rows.append({
            "dataset": dataset, "model": model, "fid_mean": s.mean, "fid_std": s.std, "seeds": s.n,
            "kid_mean": k.mean, "kid_std": k.std, "kid_seeds": k.n, "seeds_shown": shown,
            "fid": fmt_pm(s, 2) if s.n else NA,
            "kid_x1000": fmt_pm(k_milli, 3) if k.n else (f"n/a ({kid_reasons})" if kid_reasons else NA),
            "implementation": f"{first.get('implementation', NA)} {first.get('version', '')}".strip(),
            "num_samples": first.get("num_samples"), "reference": first.get("reference") or NA,
            "kid_subsets": subsets, "kid_reference": first.get("kid_reference") or NA,
            "reason": reasons or kid_reasons or None,
        })
    return rows


MIN_FIGURE_WIDTH = 256  # px: smaller sample grids (16x16 patches) are enlarged to be seen


def _samples_mosaic(paths: Sequence[Path], out: Path) -> bool:
    """Write the first existing sample grid (lowest seed) of a model to ``out``, enlarged by an
    integer factor with nearest-neighbour pixels when it is narrower than ``MIN_FIGURE_WIDTH``."""
    from PIL import Image

    for path in paths:
        if Path(path).is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as image:
                factor = max(1, -(-MIN_FIGURE_WIDTH // image.width))
                image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(out)
            return True
    return False


def build_report(study: Any, paper: Mapping[str, Any], out_dir: Path, confidence: float = 0.95) -> list[Path]:
    """Write tables (md + csv), figures (PNG) and ``index.md`` for the study; return the files written."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    if figures.exists():
        import shutil

        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    records = collect_records(study)
    dens = [r for r in records if r["family"] == "density"]
    dis = [r for r in records if r["family"] == "disentanglement"]
    written: list[Path] = []
    index = [f"# SDN study `{study.name}`: results\n",
             "Generated by `pipelines/report.py` from the DVC metrics files; do not edit.\n"]
    index += claims_section(study, records, dens, dis, confidence, out_dir)

    # Density.
    rows = metric_rows(dens, DENSITY_METRICS, "density", paper, paper_metric="iw_bpd")
    comp = comparison_rows(dens, DENSITY_METRICS, "sdn", confidence)
    cols = ["dataset", "model", "elbo_bpd_pm", "iw_bpd_pm", "seeds", "num_params", "paper", "paper_source", "diff_vs_paper"]
    heads = ["dataset", "model", "ELBO bpd", "IW bpd", "seeds", "parameters", "paper bpd", "paper source", "IW − paper"]
    ccols = ["dataset", "metric", "comparison", "diff", "ci", "p", "n_a", "n_b"]
    density_md = ["# Density estimation (test bits/dim, lower is better)\n",
                  "Mean ± std over seeds. IW: importance-weighted bound with the K in `index.md`.\n",
                  _renamed_table(rows, cols, heads),
                  f"\n## SDN − other models (Welch {int(confidence * 100)}% CI, Welch's t-test)\n",
                  markdown_table(comp, ccols) if comp else "No comparison (needs `sdn` and another model).\n"]
    related = [dict(r, verified=bool(r.get("verified"))) for r in paper.get("related", [])
               if r.get("dataset") in study.datasets("density")]
    if related:
        density_md += ["\n## Published reference points (other models)\n",
                       markdown_table(related, ["dataset", "model", "metric", "value", "source", "verified"])]
    (out_dir / "density.md").write_text("\n".join(density_md))
    write_csv(rows, ["dataset", "model", *(f"{m}_{s}" for m in DENSITY_METRICS for s in ("mean", "std")),
                     "seeds", "num_params", "paper", "paper_source", "diff_vs_paper"], out_dir / "density.csv")
    write_csv(comp, ["dataset", "metric", "comparison", "diff", "ci_low", "ci_high", "t", "df", "p_value", "n_a", "n_b"],
              out_dir / "density_comparison.csv")
    index += ["## Density\n", "\n".join(density_md[2:])]
    for dataset in study.datasets("density"):
        curves = {m: [_read_curve(r["curve"], "bpd") for r in dens if r["dataset"] == dataset and r["model"] == m]
                  for m in study.models("density")}
        name = f"curves_{dataset}.png"
        plot_curves(curves, figures / name, f"training bpd, {dataset} (mean, min–max over seeds)")
        bars = f"bars_{dataset}.png"
        plot_bars([r for r in rows if r["dataset"] == dataset], list(DENSITY_METRICS), figures / bars,
                  f"test bpd, {dataset} (± std over seeds)")
        index += [f"![training curves {dataset}](figures/{name})", f"![bpd {dataset}](figures/{bars})\n"]
        held_out = {m: [_read_curve(r["curve"], "val_elbo_bpd") for r in dens
                        if r["dataset"] == dataset and r["model"] == m] for m in study.models("density")}
        if any(len(x) for seeds in held_out.values() for x, _ in seeds):
            val_name = f"val_curves_{dataset}.png"
            plot_curves(held_out, figures / val_name, f"validation ELBO bpd, {dataset} (mean, min–max over seeds)",
                        ylabel="validation bpd")
            index += [f"![validation curves {dataset}](figures/{val_name})\n"]

    # FID.
    frows = _fid_rows(dens)
    fid_md = ["# FID and KID (lower is better)\n",
              "Inception-v3 pool3 features of model samples vs. the training split's reference statistics (FID) "
              "and a seeded subset of its features (KID: unbiased MMD² with the kernel (x·y/d + 1)³, mean over "
              "`kid subsets` random subsets of the given size, shown ×10³; mean ± std over seeds); "
              "implementation, sample count and references as recorded by the fid stage.\n",
              markdown_table([{**r, "seeds": r["seeds_shown"], "kid ×10³": r["kid_x1000"]} for r in frows],
                             ["dataset", "model", "fid", "kid ×10³", "seeds", "implementation", "num_samples",
                              "reference", "kid_subsets", "kid_reference"])]
    (out_dir / "fid.md").write_text("\n".join(fid_md))
    write_csv(frows, ["dataset", "model", "fid_mean", "fid_std", "seeds", "kid_mean", "kid_std", "kid_seeds",
                      "implementation", "num_samples", "reference", "kid_subsets", "kid_reference", "reason"],
              out_dir / "fid.csv")
    index += ["## FID and KID\n", "\n".join(fid_md[1:])]

    # Disentanglement.
    all_names = sorted({k for r in dis for k in r["metrics"]})
    metric_names = [m for m in HEADLINE_DISENTANGLEMENT if m in all_names] or all_names
    drows = metric_rows(dis, all_names, "disentanglement", paper)
    dcomp = comparison_rows(dis, metric_names, "sdn", confidence)
    dcols = ["dataset", "model", *(f"{m}_pm" for m in metric_names), "seeds", "num_params"]
    dis_md = ["# Disentanglement (higher is better)\n",
              "Encoder-mean representation, evaluation seed 0; mean ± std over training seeds.\n",
              _renamed_table(drows, dcols, ["dataset", "decoder", *metric_names, "seeds", "parameters"]),
              f"\n## SDN − CNN decoder (Welch {int(confidence * 100)}% CI, Welch's t-test)\n",
              markdown_table(dcomp, ccols) if dcomp else "No comparison (needs both decoders).\n"]
    (out_dir / "disentanglement.md").write_text("\n".join(dis_md))
    write_csv(drows, ["dataset", "model", *(f"{m}_{s}" for m in all_names for s in ("mean", "std")), "seeds",
                      "num_params"], out_dir / "disentanglement.csv")
    write_csv(dcomp, ["dataset", "metric", "comparison", "diff", "ci_low", "ci_high", "t", "df", "p_value", "n_a", "n_b"],
              out_dir / "disentanglement_comparison.csv")
    index += ["## Disentanglement\n", "\n".join(dis_md[2:])]
    for dataset in study.datasets("disentanglement"):
        if metric_names:
            bars = f"bars_{dataset}.png"
            plot_bars([r for r in drows if r["dataset"] == dataset], metric_names, figures / bars,
                      f"disentanglement, {dataset} (± std over seeds)")
            index.append(f"![metrics {dataset}](figures/{bars})\n")
        curves = {m: [_read_curve(r["curve"], "bpd") for r in dis if r["dataset"] == dataset and r["model"] == m]
                  for m in study.models("disentanglement")}
        name = f"curves_{dataset}.png"
        plot_curves(curves, figures / name, f"training bpd (negative ELBO), {dataset}")
        index.append(f"![training curves {dataset}](figures/{name})\n")

    # Samples and reconstructions.
    index.append("## Samples (lowest seed of each model)\n")
    for family in ("density", "disentanglement"):
        for dataset in study.datasets(family):
            for model in study.models(family):
                seeds = sorted((r for r in records if r["dataset"] == dataset and r["model"] == model),
                               key=lambda r: r["seed"])
                name = f"samples_{dataset}_{model}.png"
                if _samples_mosaic([r["samples"] for r in seeds], figures / name):
                    index.append(f"**{dataset} / {model}**\n\n![samples {dataset} {model}](figures/{name})\n")
                samples_cfg = study.section(family, dataset)["samples"]
                for temperature in samples_cfg.get("temperatures", []):
                    if float(temperature) == float(samples_cfg["temperature"]):
                        continue
                    name = f"samples_{dataset}_{model}_t{temperature:g}.png"
                    grids = [r["samples"].with_name(f"{r['samples'].stem}_t{temperature:g}.png") for r in seeds]
                    if _samples_mosaic(grids, figures / name):
                        index.append(f"Temperature {temperature:g}:\n\n![samples {dataset} {model} "
                                     f"t{temperature:g}](figures/{name})\n")
                recon = f"reconstructions_{dataset}_{model}.png"
                if _samples_mosaic([r["reconstructions"] for r in seeds], figures / recon):
                    index.append(f"Reconstructions (top: inputs, bottom: decoded posterior means):\n\n"
                                 f"![reconstructions {dataset} {model}](figures/{recon})\n")

    # Configuration, versions, reductions.
    index.append("## Configuration\n")
    index.append(f"- study `{study.name}`, seeds {study.seeds} ({study.runs_at_once} at a time, "
                 f"{study.threads_per_run or 'default'} thread(s) each), MLflow experiment `{study.experiment}`")
    for family in ("density", "disentanglement"):
        for dataset in study.datasets(family):
            sec = study.section(family, dataset)
            train = study.train_config(family, dataset, study.seeds[0], study.models(family)[0])
            index.append(f"- {family} `{dataset}`: config `{sec['config']}`, models {study.models(family)}, "
                         f"{train.steps} steps, global batch {train.batch_size}, lr {train.lr} ({train.lr_schedule})")
    fid = study.params["fid"]
    kid = fid.get("kid") or {}
    weights = (f"`{fid['weights_path']}`" + ("" if Path(fid["weights_path"]).is_file() else " (not present: FID n/a)")
               if fid["weights_path"] else "none (FID n/a)")
    index.append(f"- FID and KID: {fid['num_samples']} samples, weights {weights}"
                 + (f"; KID {kid['subsets']} subsets of {kid['subset_size']}, {kid['reference_features']} "
                    f"reference features (seed {kid['seed']})" if kid else "") + "\n")
    tuned = [(f"{family} `{dataset}`", line) for family in ("density", "disentanglement")
             for dataset in study.datasets(family) for line in study.section(family, dataset).get("tuned", [])]
    if tuned:
        index.append("## Chosen before this run, never on test data\n")
        index += [f"- {where}: {line}" for where, line in tuned]
        index.append("")
    index.append("## Versions\n")
    index += [f"- {k} {v}" for k, v in package_versions().items()]
    index.append("\n## Reduced from the paper\n")
    red = reductions(study)
    index += [f"- {r}" for r in red] if red else ["- nothing: the paper's protocol"]
    index.append("\nPaper values come from `reports/paper_results.yaml` (source and verified flag per value).\n")
    (out_dir / "index.md").write_text("\n".join(index) + "\n")
    written += sorted(p for p in out_dir.rglob("*") if p.is_file())
    return written


PLATEAU_TOLERANCE = 0.05  # bpd: |validation bpd at the last step − at 75 % of the steps| at a plateau
MAX_TRAIN_TEST_GAP = 0.3  # bpd: |train − test ELBO| beyond this is over- or under-fitting


def _plateau_change(curve: Path) -> tuple[Optional[float], Optional[float]]:
    """(validation bpd at the last step, its change since the evaluation at 75 % of the steps)."""
    steps, val = _read_curve(curve, "val_elbo_bpd")
    if not len(steps):
        return None, None
    at = min(int(np.searchsorted(steps, 0.75 * steps[-1])), len(val) - 1)
    return float(val[-1]), float(val[-1] - val[at])


def run_checks(dens: Sequence[Mapping[str, Any]], dis: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per run: has training reached its plateau, is the train − test gap small, is the VAE alive?

    ``failed`` lists the checks a run does not pass (empty: all passed); a check whose input is
    missing is reported as such rather than passed.
    """
    from sdn.claims import MIN_ACTIVE_DIMS

    rows = []
    for r in dens:
        val_final, change = _plateau_change(r["curve"])
        test, train = r["metrics"].get("elbo_bpd"), r["metrics"].get("train_elbo_bpd")
        gap = float(train - test) if isinstance(test, float) and isinstance(train, float) else None
        failed = []
        if change is None:
            failed.append("no validation curve")
        elif abs(change) > PLATEAU_TOLERANCE:
            failed.append(f"not at plateau (validation bpd changed {change:+.3f} over the last quarter)")
        if gap is None:
            failed.append("no train − test gap")
        elif abs(gap) > MAX_TRAIN_TEST_GAP:
            failed.append(f"train − test gap {gap:+.3f} bpd")
        rows.append({"dataset": r["dataset"], "model": r["model"], "seed": r["seed"],
                     "val_bpd_final": val_final, "val_change_last_quarter": change,
                     "train_elbo_bpd": train, "test_elbo_bpd": test, "train_minus_test_bpd": gap,
                     "test_iw_bpd": r["metrics"].get("iw_bpd"), "active_dims": None, "failed": "; ".join(failed),
                     "selected_step": r["train"].get("selected_step")})
    for r in dis:
        active = r["metrics"].get("active_units.count")
        failed = []
        if active is None:
            failed.append("no active-dimension count")
        elif active < MIN_ACTIVE_DIMS:
            failed.append(f"collapsed ({int(active)} active dimensions < {MIN_ACTIVE_DIMS})")
        rows.append({"dataset": r["dataset"], "model": r["model"], "seed": r["seed"], "val_bpd_final": None,
                     "val_change_last_quarter": None, "train_elbo_bpd": None, "test_elbo_bpd": None, "train_minus_test_bpd": None, "test_iw_bpd": None,
                     "active_dims": active, "failed": "; ".join(failed)})
    return rows


def _caveats(checks: Sequence[Mapping[str, Any]], dataset: str, models: Sequence[str]) -> str:
    """The failed run checks of ``models`` on ``dataset``, one phrase per run ("" if none)."""
    return "; ".join(f"{c['model']} seed {c['seed']}: {c['failed']}" for c in checks
                     if c["dataset"] == dataset and c["model"] in models and c["failed"])


def claims_section(study: Any, records: Sequence[Mapping[str, Any]], dens: Sequence[Mapping[str, Any]],
                   dis: Sequence[Mapping[str, Any]], confidence: float, out_dir: Path) -> list[str]:
    """The report's opening: one verdict per claim of the paper, the rule behind it, and run checks."""
    from sdn.claims import MIN_ACTIVE_DIMS, RULE, chance_level, claim_rows, default_claims

    names = sorted({k for r in dis for k in r["metrics"]})
    claims = default_claims([m for m in HEADLINE_DISENTANGLEMENT if m in names])
    factors = {d: len(study.ground_truth(d).factors_num_values) for d in study.datasets("disentanglement")}
    checks = run_checks(dens, dis)
    rows = claim_rows(records, claims, confidence, factors)
    for row in rows:
        row["caveats"] = _caveats(checks, row["dataset"], ["sdn", row["comparison"].split(" − ")[1]])
    cols = ["claim", "dataset", "comparison", "diff", "ci_low", "ci_high", "half_width", "seeds",
            "paper_direction", "verdict", "caveats"]
    write_csv(rows, cols, out_dir / "claims.csv")
    check_cols = ["dataset", "model", "seed", "val_bpd_final", "val_change_last_quarter", "train_elbo_bpd",
                  "test_elbo_bpd", "train_minus_test_bpd", "test_iw_bpd", "active_dims", "failed"]
    write_csv(checks, check_cols, out_dir / "run_checks.csv")
    chance = sorted({f"{m} {chance_level(m, n):.3f} ({d}, {n} factors)" for d, n in factors.items()
                     for m in names if chance_level(m, n) is not None and m.endswith("eval_accuracy")})
    failed = [c for c in checks if c["failed"]]
    dens_cols = ["dataset", "model", "seed", "val_bpd_final", "val_change_last_quarter", "train_elbo_bpd",
                 "test_elbo_bpd", "train_minus_test_bpd", "test_iw_bpd", "failed"]
    md = ["## Claims\n",
          f"Each row: `sdn − baseline` of the mean over seeds, its Welch {int(confidence * 100)} % CI, and the "
          f"verdict of this rule, applied to the numbers by `sdn/claims.py`: {RULE}. "
          f"A VAE with fewer than {MIN_ACTIVE_DIMS} active latent dimensions in any run counts as collapsed. "
          f"Chance levels: {'; '.join(chance) if chance else 'n/a'}. `caveats` lists the run checks "
          "below that the compared runs fail.\n",
          markdown_table(rows, cols) if rows else "No claim can be judged (needs sdn and its baselines).\n",
          "\n### Run checks\n",
          f"Density runs: validation ELBO bpd at the last step and its change since 75 % of the steps "
          f"(plateau: |change| ≤ {PLATEAU_TOLERANCE}), ELBO bpd of as many training images as the test split "
          f"holds and of the test split with the same weights (gap: |train − test| ≤ {MAX_TRAIN_TEST_GAP}). "
          f"VAEs: active latent dimensions (Burda et al.: Cov_x(E_q[z_j]) > 0.01; collapsed below "
          f"{MIN_ACTIVE_DIMS}). {len(failed)} of {len(checks)} runs fail a check.\n"]
    if any(c.get("selected_step") is not None for c in checks):
        md.append("Density runs with `train.keep_best` are evaluated on the EMA weights of the validation "
                  "evaluation with the lowest bpd (`selected_step`); the test split is scored once, on them.\n")
        dens_cols.insert(3, "selected_step")
    if dens:
        md.append(markdown_table(checks[:len(dens)], dens_cols))
    if dis:
        md.append(markdown_table(checks[len(dens):], ["dataset", "model", "seed", "active_dims", "failed"]))
    md.append("")
    return md


def _renamed_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str]) -> str:
    renamed = [{h: row.get(c) for c, h in zip(columns, headers)} for row in rows]
    return markdown_table(renamed, headers)
