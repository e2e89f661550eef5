"""The density family in the report: bpd tables and comparisons, FID and KID, curves, run checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from pipelines.reporting import FamilyReport, Records
from pipelines.reporting.claims import Claim
from pipelines.reporting.figures import curves, plot_bars, plot_curves, read_curve
from pipelines.reporting.tables import (COMPARISON_COLUMNS, COMPARISON_CSV, KEYS, NA, comparison_rows, fmt_pm,
                                        keys, markdown_table, metric_rows, summarize, write_csv)

PAPER_CONFIGS = ("cifar10", "imagenet32", "celebahq256")
PAPER_IW_SAMPLES = 1024
METRICS = ("elbo_bpd", "iw_bpd")
PLATEAU_TOLERANCE = 0.05  # bpd: |validation bpd at the last step − at 75 % of the steps| at a plateau
MAX_TRAIN_TEST_GAP = 0.3  # bpd: |train − test ELBO| beyond this is over- or under-fitting
CHECK_TEXT = (f"Density runs: plateau rule: |validation ELBO bpd at the last evaluation − at the first evaluation "
              f"at or after 75 % of the steps| ≤ {PLATEAU_TOLERANCE} bpd (the learning-rate schedule and steps of "
              f"each dataset: Configuration below); ELBO bpd of as many training images as the test split holds "
              f"and of the test split with the same weights (gap: |train − test| ≤ {MAX_TRAIN_TEST_GAP} bpd). ")


def claims(records: Records) -> list[Claim]:
    return [Claim("SDN decoder lowers test bpd against the CNN of the same setup", "density", "iw_bpd", "cnn", True,
                  "bpd"),
            Claim("SDN decoder lowers test bpd against the parameter-matched CNN", "density", "iw_bpd",
                  "cnn_matched", True, "bpd")]


def _plateau_change(curve: Path) -> tuple[Optional[float], Optional[float]]:
    """(validation bpd at the last step, its change since the evaluation at 75 % of the steps)."""
    steps, val = read_curve(curve, "val_elbo_bpd")
    if not len(steps):
        return None, None
    at = min(int(np.searchsorted(steps, 0.75 * steps[-1])), len(val) - 1)
    return float(val[-1]), float(val[-1] - val[at])


def run_checks(records: Records) -> list[dict[str, Any]]:
    """Per run: has training reached its plateau, is the train − test gap small? A check whose input
    is missing is failed as such."""
    rows = []
    for r in records:
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
                     "test_iw_bpd": r["metrics"].get("iw_bpd"), "failed": "; ".join(failed),
                     "selected_step": r["train"].get("selected_step")})
    return rows


def check_tables(checks: list[dict[str, Any]]) -> list[str]:
    columns = ["dataset", "model", "seed", "val_bpd_final", "val_change_last_quarter", "train_elbo_bpd",
               "test_elbo_bpd", "train_minus_test_bpd", "test_iw_bpd", "failed"]
    if not any(c.get("selected_step") is not None for c in checks):
        return [markdown_table(checks, columns)]
    return ["Density runs with `train.keep_best` are evaluated on the EMA weights of the validation "
            "evaluation with the lowest bpd (`selected_step`); the test split is scored once, on them.\n",
            markdown_table(checks, [*columns[:3], "selected_step", *columns[3:]])]


def fid_rows(records: Records) -> list[dict[str, Any]]:
    """One row per model: FID and KID (torch-fidelity) over seeds; where they are n/a, the
    ``seeds_shown`` cell gives the recorded reason instead of a seed count of 0."""
    rows = []
    for dataset, model in keys(records).itertuples(index=False):
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
        rows.append({
            "dataset": dataset, "model": model, "fid_mean": s.mean, "fid_std": s.std, "seeds": s.n,
            "kid_mean": k.mean, "kid_std": k.std, "kid_seeds": k.n, "seeds_shown": shown,
            "fid": fmt_pm(*s, 2), "kid_x1000": fmt_pm(*k_milli) if k.n else (f"n/a ({kid_reasons})" if kid_reasons else NA),
            "implementation": f"{first.get('implementation', NA)} {first.get('version', '')}".strip(),
            "num_samples": first.get("num_samples"), "reference": first.get("reference") or NA,
            "kid_subsets": f"{first['kid_subsets']} x {first['kid_subset_size']}" if first.get("kid_subset_size") else NA,
            "kid_reference": first.get("kid_reference") or NA, "reason": reasons or kid_reasons or None,
        })
    return rows


def section(records: Records, params: Mapping[str, Any], paper: Mapping[str, Any], confidence: float,
            out_dir: Path) -> list[str]:
    """``density.md/.csv``, ``density_comparison.csv``, ``fid.md/.csv``, curves and bars; index lines."""
    datasets, models = params["study"]["density"]["datasets"], params["study"]["density"]["models"]
    rows = metric_rows(records, METRICS, "density", paper, paper_metric="iw_bpd")
    comp = comparison_rows(records, METRICS, "sdn", confidence)
    md = ["# Density estimation (test bits/dim, lower is better)\n",
          "Mean ± std over seeds. IW: importance-weighted bound with the K in `index.md`.\n",
          markdown_table(rows, ["dataset", "model", "elbo_bpd_pm", "iw_bpd_pm", "seeds", "num_params", "paper",
                                "paper_source", "diff_vs_paper"],
                         ["dataset", "model", "ELBO bpd", "IW bpd", "seeds", "parameters", "paper bpd",
                          "paper source", "IW − paper"]),
          f"\n## SDN − other models (Welch {int(confidence * 100)}% CI, Welch's t-test)\n",
          markdown_table(comp, COMPARISON_COLUMNS) if len(comp) else "No comparison (needs `sdn` and another model).\n"]
    related = [dict(r, verified=bool(r.get("verified"))) for r in paper.get("related", []) if r.get("dataset") in datasets]
    if related:
        md += ["\n## Published reference points (other models)\n",
               markdown_table(related, ["dataset", "model", "metric", "value", "source", "verified"])]
    (out_dir / "density.md").write_text("\n".join(md))
    write_csv(rows, [*KEYS, *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "seeds", "num_params", "paper",
                     "paper_source", "diff_vs_paper"], out_dir / "density.csv")
    write_csv(comp, COMPARISON_CSV, out_dir / "density_comparison.csv")
    index = ["## Density\n", "\n".join(md[2:])]
    figures = out_dir / "figures"
    for dataset in datasets:
        plot_curves(curves(records, dataset, models, "bpd"), figures / f"curves_{dataset}.png",
                    f"training bpd, {dataset} (mean, min–max over seeds)")
        plot_bars(rows[rows.dataset == dataset], list(METRICS), figures / f"bars_{dataset}.png",
                  f"test bpd, {dataset} (± std over seeds)")
        index += [f"![training curves {dataset}](figures/curves_{dataset}.png)",
                  f"![bpd {dataset}](figures/bars_{dataset}.png)\n"]
        held_out = curves(records, dataset, models, "val_elbo_bpd")
        if any(len(x) for seeds in held_out.values() for x, _ in seeds):
            plot_curves(held_out, figures / f"val_curves_{dataset}.png",
                        f"validation ELBO bpd, {dataset} (mean, min–max over seeds)", ylabel="validation bpd")
            index += [f"![validation curves {dataset}](figures/val_curves_{dataset}.png)\n"]
    return index + _fid_section(records, out_dir)


def _fid_section(records: Records, out_dir: Path) -> list[str]:
    rows = fid_rows(records)
    md = ["# FID and KID (lower is better)\n",
          "Inception-v3 pool3 features of model samples vs. the training split's reference statistics (FID) "
          "and a seeded subset of its features (KID: unbiased MMD² with the kernel (x·y/d + 1)³, mean over "
          "`kid subsets` random subsets of the given size, shown ×10³; mean ± std over seeds); "
          "implementation, sample count and references as recorded by the fid stage.\n",
          markdown_table([{**r, "seeds": r["seeds_shown"], "kid ×10³": r["kid_x1000"]} for r in rows],
                         ["dataset", "model", "fid", "kid ×10³", "seeds", "implementation", "num_samples",
                          "reference", "kid_subsets", "kid_reference"])]
    (out_dir / "fid.md").write_text("\n".join(md))
    write_csv(rows, [*KEYS, "fid_mean", "fid_std", "seeds", "kid_mean", "kid_std", "kid_seeds", "implementation",
                     "num_samples", "reference", "kid_subsets", "kid_reference", "reason"], out_dir / "fid.csv")
    return ["## FID and KID\n", "\n".join(md[1:])]


def reductions(params: Mapping[str, Any]) -> list[str]:
    """What the density runs change from the paper's protocol, one sentence each."""
    out = []
    for dataset in params["study"]["density"]["datasets"]:
        sec = params["density"][dataset]
        if sec["config"] not in PAPER_CONFIGS or dataset != sec["config"]:
            out.append(f"density on `{dataset}` with config `{sec['config']}` (paper: CIFAR-10, ImageNet32, "
                       "CelebAHQ256 with their own configs)")
        if sec["overrides"]:
            out.append(f"`{dataset}` config overridden: {json.dumps(sec['overrides'], sort_keys=True)}")
        k = sec["eval"]["iw_samples"]
        if k < PAPER_IW_SAMPLES:
            out.append(f"`{dataset}`: importance-weighted bound with K = {k} (paper: {PAPER_IW_SAMPLES})")
        if sec["eval"]["max_examples"] is not None:
            out.append(f"`{dataset}`: evaluated on the first {sec['eval']['max_examples']} test images (paper: all)")
    return out


REPORT = FamilyReport(claims=claims, num_factors=lambda study: {}, run_checks=run_checks, check_text=CHECK_TEXT,
                      check_tables=check_tables, section=section, reductions=reductions, summary=METRICS,
                      outlier_curve=("val_elbo_bpd", "validation bpd"))
