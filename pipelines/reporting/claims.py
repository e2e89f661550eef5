"""The paper's claims judged from a study's numbers: difference, Welch CI, and a verdict by rule.

Rule (stated in the report): a claim is *supported* when the confidence interval of
``sdn − baseline`` excludes 0 in the paper's direction, *contradicted* when it excludes 0 the other
way, *inconclusive* otherwise. A comparison built on degenerate values (a metric identical for every
run, a collapsed model, a score at chance level) is *not judged* and the reason is given instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from pipelines.reporting.tables import markdown_table, metric_values, values_of, welch, write_csv
from sdn.metrics.disentanglement import chance_level  # each metric declares its scores' chance levels

RULE = ("supported: the CI of sdn − baseline excludes 0 in the paper's direction; contradicted: it "
        "excludes 0 the other way; inconclusive: it contains 0; not judged: degenerate inputs "
        "(a metric identical for every run, a collapsed model, or a mean score at chance level)")
MIN_ACTIVE_DIMS = 3  # fewer active latent dimensions than this: the VAE is treated as collapsed
CLAIM_COLUMNS = ["claim", "dataset", "comparison", "diff", "ci_low", "ci_high", "half_width", "seeds",
                 "paper_direction", "verdict", "caveats"]
CHECK_COLUMNS = ["dataset", "model", "seed", "val_bpd_final", "val_change_last_quarter", "train_elbo_bpd",
                 "test_elbo_bpd", "train_minus_test_bpd", "test_iw_bpd", "active_dims", "failed"]


class Claim(NamedTuple):
    """One claim of the paper: ``sdn`` beats ``baseline`` on ``metric`` (``lower`` is better or not)."""

    text: str
    family: str
    metric: str
    baseline: str
    lower_is_better: bool


def verdict(ci_low: float, ci_high: float, lower_is_better: bool) -> str:
    """The rule's verdict for a CI of ``sdn − baseline``."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    better_side = (ci_high < 0) if lower_is_better else (ci_low > 0)
    worse_side = (ci_low > 0) if lower_is_better else (ci_high < 0)
    return "supported" if better_side else "contradicted" if worse_side else "inconclusive"


def degenerate_reason(values: pd.DataFrame, claim: Claim, dataset: str, num_factors: Optional[int] = None,
                      chance_margin: float = 0.05) -> Optional[str]:
    """Why the comparison of ``claim`` on ``dataset`` must not be judged, or None (``values``: the
    long frame of ``tables.metric_values``)."""
    a, b = (values_of(values, dataset, m, claim.metric) for m in ("sdn", claim.baseline))
    if not a.size or not b.size:
        return "missing runs"
    if np.unique(np.concatenate([a, b])).size == 1:
        return f"{claim.metric} is {a[0]:.4g} for every run"
    chance = chance_level(claim.metric, num_factors)
    for model, scores in (("sdn", a), (claim.baseline, b)):
        active = values_of(values, dataset, model, "active_units.count")
        if active.size and active.min() < MIN_ACTIVE_DIMS:
            return f"{model} collapsed ({int(active.min())} active dimensions in one run, need {MIN_ACTIVE_DIMS})"
        if chance is not None and float(np.mean(scores)) <= chance + chance_margin:
            return f"{model} mean {float(np.mean(scores)):.3f} is at chance level ({chance:.3f})"
    return None


def claim_rows(records: Sequence[Mapping[str, Any]], claims: Sequence[Claim], confidence: float = 0.95,
               num_factors: Optional[Mapping[str, int]] = None) -> list[dict[str, Any]]:
    """One row per claim and dataset of its family: difference, CI, seeds, verdict (or why not judged)."""
    rows = []
    for claim in claims:
        family = [r for r in records if r["family"] == claim.family]
        values = metric_values(family)
        for dataset in dict.fromkeys(r["dataset"] for r in family):
            c = welch(values_of(values, dataset, "sdn", claim.metric),
                      values_of(values, dataset, claim.baseline, claim.metric), confidence)
            if not c.n_a or not c.n_b:
                continue
            reason = degenerate_reason(values, claim, dataset, (num_factors or {}).get(dataset))
            rows.append({
                "claim": claim.text, "dataset": dataset, "metric": claim.metric,
                "comparison": f"sdn − {claim.baseline}", "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                "half_width": (c.ci_high - c.ci_low) / 2, "seeds": f"{c.n_a} vs {c.n_b}",
                "paper_direction": "lower" if claim.lower_is_better else "higher",
                "verdict": f"not judged: {reason}" if reason else verdict(c.ci_low, c.ci_high, claim.lower_is_better),
            })
    return rows


def caveats(checks: Sequence[Mapping[str, Any]], dataset: str, models: Sequence[str]) -> str:
    """The failed run checks of ``models`` on ``dataset``, one phrase per run ("" if none)."""
    return "; ".join(f"{c['model']} seed {c['seed']}: {c['failed']}" for c in checks
                     if c["dataset"] == dataset and c["model"] in models and c["failed"])


def claims_section(records: Sequence[Mapping[str, Any]], families: Mapping[str, Any],
                   num_factors: Mapping[str, int], confidence: float, out_dir: Path) -> list[str]:
    """The report's opening: one verdict per claim of the paper, the rule behind it, and run checks
    (``families``: name -> ``FamilyReport``); writes ``claims.csv`` and ``run_checks.csv``."""
    by_family = {name: [r for r in records if r["family"] == name] for name in families}
    claims = [c for name, family in families.items() for c in family.claims(by_family[name])]
    checks = {name: family.run_checks(by_family[name]) for name, family in families.items()}
    all_checks = [c for rows in checks.values() for c in rows]
    rows = claim_rows(records, claims, confidence, num_factors)
    for row in rows:
        row["caveats"] = caveats(all_checks, row["dataset"], ["sdn", row["comparison"].split(" − ")[1]])
    write_csv(rows, CLAIM_COLUMNS, out_dir / "claims.csv")
    write_csv(all_checks, CHECK_COLUMNS, out_dir / "run_checks.csv")
    chance = sorted({f"{c.metric} {level:.3f} ({d}, {n} factors)" for d, n in num_factors.items() for c in claims
                     if (level := chance_level(c.metric, n))})  # the judged scores' non-zero chance levels
    md = ["## Claims\n",
          f"Each row: `sdn − baseline` of the mean over seeds, its Welch {int(confidence * 100)} % CI, and the "
          f"verdict of this rule, applied to the numbers by `pipelines/reporting/claims.py`: {RULE}. "
          f"A VAE with fewer than {MIN_ACTIVE_DIMS} active latent dimensions in any run counts as collapsed. "
          f"Chance levels: {'; '.join(chance) if chance else 'n/a'}. `caveats` lists the run checks "
          "below that the compared runs fail.\n",
          markdown_table(rows, CLAIM_COLUMNS) if rows else "No claim can be judged (needs sdn and its baselines).\n",
          "\n### Run checks\n",
          "".join(family.check_text for family in families.values())
          + f"{sum(bool(c['failed']) for c in all_checks)} of {len(all_checks)} runs fail a check.\n"]
    md += [line for name, family in families.items() if checks[name] for line in family.check_tables(checks[name])]
    return md + [""]
