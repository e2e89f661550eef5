"""The paper's claims judged from a study's numbers: difference, Welch CI, and a verdict by rule.

Rule (stated in the report): a claim is *supported* when the confidence interval of
``sdn − baseline`` excludes 0 in the paper's direction, *contradicted* when it excludes 0 the other
way, *inconclusive* otherwise. A comparison built on degenerate values (a metric identical for every
run, a collapsed model, a score at chance level) is *not judged* and the reason is given instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from sdn.reporting import welch

RULE = ("supported: the CI of sdn − baseline excludes 0 in the paper's direction; contradicted: it "
        "excludes 0 the other way; inconclusive: it contains 0; not judged: degenerate inputs "
        "(a metric identical for every run, a collapsed model, or a mean score at chance level)")
MIN_ACTIVE_DIMS = 3  # fewer active latent dimensions than this: the VAE is treated as collapsed


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: ``sdn`` beats ``baseline`` on ``metric`` (``lower`` is better or not)."""

    text: str
    family: str
    metric: str
    baseline: str
    lower_is_better: bool


def default_claims(disentanglement_metrics: Sequence[str]) -> list[Claim]:
    """The paper's claims this suite can test: density against both CNNs, every disentanglement score."""
    claims = [
        Claim("SDN decoder lowers test bpd against the CNN of the same setup", "density", "iw_bpd", "cnn", True),
        Claim("SDN decoder lowers test bpd against the parameter-matched CNN", "density", "iw_bpd",
              "cnn_matched", True),
    ]
    claims += [Claim(f"SDN decoder improves {m}", "disentanglement", m, "cnn", False) for m in disentanglement_metrics]
    return claims


def verdict(ci_low: float, ci_high: float, lower_is_better: bool) -> str:
    """The rule's verdict for a CI of ``sdn − baseline``."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    better_side = (ci_high < 0) if lower_is_better else (ci_low > 0)
    worse_side = (ci_low > 0) if lower_is_better else (ci_high < 0)
    return "supported" if better_side else "contradicted" if worse_side else "inconclusive"


def chance_level(metric: str, num_factors: Optional[int]) -> Optional[float]:
    """Score of a representation that carries no information: 1/K for the BetaVAE and FactorVAE
    classifiers (K ground-truth factors, balanced votes), 0 for MIG, SAP and DCI disentanglement."""
    if metric.startswith(("beta_vae.", "factor_vae.")) and metric.endswith("accuracy"):
        return 1.0 / num_factors if num_factors else None
    if metric in ("mig.discrete_mig", "sap.SAP_score", "dci.disentanglement", "dci.completeness"):
        return 0.0
    return None


def _values(records: Sequence[Mapping[str, Any]], dataset: str, model: str, key: str) -> list[float]:
    return [float(r["metrics"][key]) for r in sorted(records, key=lambda r: r["seed"])
            if r["dataset"] == dataset and r["model"] == model and isinstance(r["metrics"].get(key), (int, float))]


def degenerate_reason(records: Sequence[Mapping[str, Any]], claim: Claim, dataset: str,
                      num_factors: Optional[int] = None, chance_margin: float = 0.05) -> Optional[str]:
    """Why the comparison of ``claim`` on ``dataset`` must not be judged, or None."""
    a = _values(records, dataset, "sdn", claim.metric)
    b = _values(records, dataset, claim.baseline, claim.metric)
    if not a or not b:
        return "missing runs"
    if len(set(a + b)) == 1:
        return f"{claim.metric} is {a[0]:.4g} for every run"
    for model in ("sdn", claim.baseline):
        active = _values(records, dataset, model, "active_units.count")
        if active and min(active) < MIN_ACTIVE_DIMS:
            return f"{model} collapsed ({int(min(active))} active dimensions in one run, need {MIN_ACTIVE_DIMS})"
        chance = chance_level(claim.metric, num_factors)
        values = a if model == "sdn" else b
        if chance is not None and float(np.mean(values)) <= chance + chance_margin:
            return f"{model} mean {float(np.mean(values)):.3f} is at chance level ({chance:.3f})"
    return None


def claim_rows(records: Sequence[Mapping[str, Any]], claims: Sequence[Claim], confidence: float = 0.95,
               num_factors: Optional[Mapping[str, int]] = None) -> list[dict[str, Any]]:
    """One row per claim and dataset of its family: difference, CI, seeds, verdict (or why not judged)."""
    rows = []
    for claim in claims:
        family = [r for r in records if r["family"] == claim.family]
        for dataset in dict.fromkeys(r["dataset"] for r in family):
            a = _values(family, dataset, "sdn", claim.metric)
            b = _values(family, dataset, claim.baseline, claim.metric)
            if not a or not b:
                continue
            c = welch(a, b, confidence)
            reason = degenerate_reason(family, claim, dataset, (num_factors or {}).get(dataset))
            rows.append({
                "claim": claim.text, "dataset": dataset, "metric": claim.metric,
                "comparison": f"sdn − {claim.baseline}", "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                "half_width": (c.ci_high - c.ci_low) / 2, "seeds": f"{c.n_a} vs {c.n_b}",
                "paper_direction": "lower" if claim.lower_is_better else "higher",
                "verdict": f"not judged: {reason}" if reason else verdict(c.ci_low, c.ci_high, claim.lower_is_better),
            })
    return rows
