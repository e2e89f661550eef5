"""The disentanglement family in the report: score tables and comparisons, bars, curves, collapse checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipelines.reporting import FamilyReport, Records
from pipelines.reporting.claims import MIN_ACTIVE_DIMS, Claim
from pipelines.reporting.figures import curves, plot_bars, plot_curves
from pipelines.reporting.tables import (COMPARISON_COLUMNS, COMPARISON_CSV, KEYS, comparison_rows, markdown_table,
                                        metric_rows, write_csv)
from sdn.metrics.disentanglement import headline_scores, higher_is_better
from sdn.metrics.disentanglement.registry import PAPER_METRICS

CHECK_TEXT = (f"VAEs: active latent dimensions (Burda et al.: Cov_x(E_q[z_j]) > 0.01; collapsed below "
              f"{MIN_ACTIVE_DIMS}). ")


def _names(records: Records) -> list[str]:
    """Every score the runs recorded, sorted."""
    return sorted({k for r in records for k in r["metrics"]})


def headline(records: Records) -> list[str]:
    """The headline scores (each metric's ``MetricSpec.headline``) the runs recorded (all of them when none is)."""
    names = _names(records)
    return [m for m in headline_scores() if m in names] or names


def claims(records: Records) -> list[Claim]:
    names = _names(records)
    return [Claim(f"SDN decoder improves {m}", "disentanglement", m, "cnn", not higher_is_better(m))
            for m in headline_scores() if m in names]


def num_factors(study: Any) -> dict[str, int]:
    """Ground-truth factor count of each dataset (the classifiers' chance level is 1 / count)."""
    return {d: len(study.ground_truth(d).factors_num_values) for d in study.datasets("disentanglement")}


def run_checks(records: Records) -> list[dict[str, Any]]:
    """Per run: is the VAE alive (at least ``MIN_ACTIVE_DIMS`` active latent dimensions)?"""
    rows = []
    for r in records:
        active = r["metrics"].get("active_units.count")
        failed = ("no active-dimension count" if active is None else
                  f"collapsed ({int(active)} active dimensions < {MIN_ACTIVE_DIMS})" if active < MIN_ACTIVE_DIMS else "")
        rows.append({"dataset": r["dataset"], "model": r["model"], "seed": r["seed"], "active_dims": active,
                     "failed": failed})
    return rows


def check_tables(checks: list[dict[str, Any]]) -> list[str]:
    return [markdown_table(checks, ["dataset", "model", "seed", "active_dims", "failed"])]


def section(records: Records, params: Mapping[str, Any], paper: Mapping[str, Any], confidence: float,
            out_dir: Path) -> list[str]:
    """``disentanglement.md/.csv``, ``disentanglement_comparison.csv``, bars and curves; index lines."""
    datasets, models = params["study"]["disentanglement"]["datasets"], params["study"]["disentanglement"]["models"]
    names, shown = _names(records), headline(records)
    rows = metric_rows(records, names, "disentanglement", paper)
    comp = comparison_rows(records, shown, "sdn", confidence)
    md = ["# Disentanglement (higher is better)\n",
          "Encoder-mean representation, evaluation seed 0; mean ± std over training seeds.\n",
          markdown_table(rows, [*KEYS, *(f"{m}_pm" for m in shown), "seeds", "num_params"],
                         ["dataset", "decoder", *shown, "seeds", "parameters"]),
          f"\n## SDN − CNN decoder (Welch {int(confidence * 100)}% CI, Welch's t-test)\n",
          markdown_table(comp, COMPARISON_COLUMNS) if len(comp) else "No comparison (needs both decoders).\n"]
    (out_dir / "disentanglement.md").write_text("\n".join(md))
    write_csv(rows, [*KEYS, *(f"{m}_{s}" for m in names for s in ("mean", "std")), "seeds", "num_params"],
              out_dir / "disentanglement.csv")
    write_csv(comp, COMPARISON_CSV, out_dir / "disentanglement_comparison.csv")
    index = ["## Disentanglement\n", "\n".join(md[2:])]
    figures = out_dir / "figures"
    for dataset in datasets:
        if shown:
            plot_bars(rows[rows.dataset == dataset], shown, figures / f"bars_{dataset}.png",
                      f"disentanglement, {dataset} (± std over seeds)")
            index.append(f"![metrics {dataset}](figures/bars_{dataset}.png)\n")
        plot_curves(curves(records, dataset, models, "bpd"), figures / f"curves_{dataset}.png",
                    f"training bpd (negative ELBO), {dataset}")
        index.append(f"![training curves {dataset}](figures/curves_{dataset}.png)\n")
    return index


def reductions(params: Mapping[str, Any]) -> list[str]:
    """What the disentanglement runs change from the paper's protocol, one sentence each."""
    out = []
    for dataset in params["study"]["disentanglement"]["datasets"]:
        sec = params["disentanglement"][dataset]
        if dataset != "shapes3d" or sec["config"] != "shapes3d":
            out.append(f"disentanglement on `{dataset}` with VAE config `{sec['config']}` (paper: 3DShapes, `shapes3d`)")
        m = sec["metrics"]
        if (m.get("num_train") or 10000) < 10000 or (m.get("num_eval") or 5000) < 5000:
            out.append(f"`{dataset}`: metrics with num_train={m.get('num_train')}, num_eval={m.get('num_eval')} "
                       "(disentanglement_lib: 10000 / 5000)")
        if m.get("batch_size", 64) < 64:
            out.append(f"`{dataset}`: BetaVAE / FactorVAE average {m['batch_size']} observations per point "
                       "(disentanglement_lib: 64)")
        skipped = [name for name in PAPER_METRICS if name not in m.get("metrics", [name])]
        if skipped:
            out.append(f"`{dataset}`: not computed: {', '.join(skipped)} (disentanglement.{dataset}.metrics.metrics)")
    return out


REPORT = FamilyReport(claims=claims, num_factors=num_factors, run_checks=run_checks, check_text=CHECK_TEXT,
                      check_tables=check_tables, section=section, reductions=reductions,
                      summary=headline_scores() + ("active_units.count",))
