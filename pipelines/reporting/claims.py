"""The paper's claims judged from a study's numbers: difference, Welch CI, and a verdict by rule.

Rule (stated in the report, applied in this order; δ is ``report.claims.<family>.margin``):

1. *not judged*: a comparison built on degenerate values (a metric identical for every run, a
   collapsed model, a score at chance level), with the reason;
2. *supported* when the confidence interval of ``sdn − baseline`` excludes 0 in the paper's
   direction, *contradicted* when it excludes 0 the other way; "(by less than δ)" is added when the
   whole interval also lies inside (−δ, +δ): a real difference, smaller than the margin;
3. *no difference beyond ±δ* when the interval contains 0 and lies inside (−δ, +δ);
4. *inconclusive* otherwise (it contains 0 and reaches ±δ), or with fewer than two seeds a side.

Rows whose CI half-width exceeds ``report.claims.<family>.half_width_target`` are marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from pipelines.reporting.figures import plot_curves, read_curve
from pipelines.reporting.outliers import RULE as OUTLIER_RULE, flag_outliers
from pipelines.reporting.tables import NA, fmt, markdown_table, metric_values, values_of, welch, write_csv
from sdn.metrics.disentanglement import chance_level  # each metric declares its scores' chance levels

MIN_ACTIVE_DIMS = 3  # fewer active latent dimensions than this: the VAE is treated as collapsed
CLAIM_COLUMNS = ["claim", "dataset", "comparison", "diff", "ci_low", "ci_high", "half_width", "half_width_target",
                 "half_width_exceeds_target", "margin", "seeds", "paper_direction", "verdict", "caveats"]
# index.md: the half-width with its mark instead of the two settings the rule text states
CLAIM_TABLE = ["claim", "dataset", "comparison", "diff", "ci_low", "ci_high", "half_width_shown", "seeds",
               "paper_direction", "verdict", "caveats"]
CLAIM_HEADERS = [*CLAIM_TABLE[:6], "half_width", *CLAIM_TABLE[7:]]
CHECK_COLUMNS = ["dataset", "model", "seed", "val_bpd_final", "val_change_last_quarter", "train_elbo_bpd",
                 "test_elbo_bpd", "train_minus_test_bpd", "test_iw_bpd", "active_dims", "failed"]


class Claim(NamedTuple):
    """One claim of the paper: ``sdn`` beats ``baseline`` on ``metric`` (``lower`` is better or not)."""

    text: str
    family: str
    metric: str
    baseline: str
    lower_is_better: bool
    unit: str = ""  # of the metric ("bpd"), for the margin in the verdict; "" for unitless scores


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}".rstrip()


def verdict(ci_low: float, ci_high: float, lower_is_better: bool, margin: Optional[float] = None,
            unit: str = "") -> str:
    """The rule's verdict (steps 2–4 of the module's rule) for a CI of ``sdn − baseline``; without a
    ``margin`` δ there is no equivalence verdict."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    better_side = (ci_high < 0) if lower_is_better else (ci_low > 0)
    worse_side = (ci_low > 0) if lower_is_better else (ci_high < 0)
    within = margin is not None and -margin < ci_low and ci_high < margin
    if better_side or worse_side:
        word = "supported" if better_side else "contradicted"
        return f"{word} (by less than {_amount(margin, unit)})" if within else word
    return f"no difference beyond ±{_amount(margin, unit)}" if within else "inconclusive"


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


def _half_width_shown(half: float, target: Optional[float]) -> str:
    """The half-width for index.md: bold with its target when above it, n/a without a CI."""
    if not math.isfinite(half):
        return NA if target is None else f"{NA} (target {target:g})"
    return f"**{fmt(half)}** (> {target:g})" if target is not None and half > target else fmt(half)


def claim_rows(records: Sequence[Mapping[str, Any]], claims: Sequence[Claim], confidence: float = 0.95,
               num_factors: Optional[Mapping[str, int]] = None,
               rules: Optional[Mapping[str, Mapping[str, float]]] = None) -> list[dict[str, Any]]:
    """One row per claim and dataset of its family: difference, CI, seeds, verdict (or why not judged),
    the half-width against its target (``rules``: family -> ``report.claims.<family>``; a family
    without one gets neither a margin nor a target)."""
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
            rule = (rules or {}).get(claim.family, {})
            margin, target = rule.get("margin"), rule.get("half_width_target")
            half = (c.ci_high - c.ci_low) / 2
            exceeds = target is not None and not half <= target  # NaN (too few seeds) exceeds it too
            rows.append({
                "claim": claim.text, "dataset": dataset, "metric": claim.metric,
                "comparison": f"sdn − {claim.baseline}", "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                "half_width": half, "half_width_target": target, "half_width_exceeds_target": exceeds,
                "half_width_shown": _half_width_shown(half, target),
                "margin": margin, "seeds": f"{c.n_a} vs {c.n_b}",
                "paper_direction": "lower" if claim.lower_is_better else "higher",
                "verdict": f"not judged: {reason}" if reason else verdict(c.ci_low, c.ci_high, claim.lower_is_better,
                                                                           margin, claim.unit),
            })
    return rows


def failures(check: Mapping[str, Any], metric: Optional[str] = None) -> str:
    """A run-check row's failed checks and outlier flags (``check["outliers"]``: metric -> phrase;
    with ``metric``, only that metric's flag), "" if none."""
    flags = [p for m, p in check.get("outliers", {}).items() if metric is None or m == metric]
    return "; ".join(p for p in (check["failed"], *flags) if p)


def caveats(checks: Sequence[Mapping[str, Any]], dataset: str, models: Sequence[str],
            metric: Optional[str] = None) -> str:
    """The failed run checks of ``models`` on ``dataset``, one phrase per run ("" if none); with
    ``metric``, of the outlier flags only that metric's."""
    return "; ".join(f"{c['model']} seed {c['seed']}: {failures(c, metric)}" for c in checks
                     if c["dataset"] == dataset and c["model"] in models and failures(c, metric))


def rule_text(rules: Mapping[str, Mapping[str, float]], units: Mapping[str, str]) -> str:
    """The verdict rule as the report states it, with each family's δ and half-width target
    (``rules``: family -> ``report.claims.<family>``; ``units``: family -> its claims' unit)."""
    margins = "; ".join(f"{family} {_amount(rule['margin'], units.get(family, ''))}" for family, rule in rules.items())
    targets = "; ".join(f"{family} ≤ {_amount(rule['half_width_target'], units.get(family, ''))}"
                        for family, rule in rules.items())
    return ("applied in this order: (1) not judged: degenerate inputs (a metric identical for every run, a "
            "collapsed model, or a mean score at chance level); (2) supported: the CI of sdn − baseline excludes 0 "
            "in the paper's direction; contradicted: it excludes 0 the other way; either gets \"(by less than δ)\" "
            "when the whole CI also lies inside (−δ, +δ); (3) no difference beyond ±δ: the CI contains 0 and lies "
            "inside (−δ, +δ) (bounds excluded); (4) inconclusive: otherwise (the CI contains 0 and reaches ±δ). "
            f"δ (`report.claims.<family>.margin`): {margins or 'none'}. Target CI half-width "
            f"(`report.claims.<family>.half_width_target`): {targets or 'none'}; a half-width above it is shown "
            "as **value** (> target)")


def mark_outliers(checks: list[dict[str, Any]], flagged: Mapping[tuple[str, str, int], Mapping[str, str]]) -> None:
    """Set each run-check row's ``outliers`` (metric -> phrase; empty if not flagged), in place."""
    for check in checks:
        check["outliers"] = dict(flagged.get((check["dataset"], check["model"], check["seed"]), {}))


def outlier_curves(records: Sequence[Mapping[str, Any]], flagged: Mapping[tuple[str, str, int], Mapping[str, str]],
                   curve: tuple[str, str], figures: Path) -> list[str]:
    """Per flagged run: a figure of its learning curve (``curve``: column, label) against its model's
    other seeds (mean and min–max band), and index.md lines with why it was flagged."""
    column, label = curve
    lines = []
    for (dataset, model, seed), phrases in flagged.items():
        runs = [r for r in records if r["dataset"] == dataset and r["model"] == model]
        this = [read_curve(r["curve"], column) for r in runs if r["seed"] == seed]
        head = f"**{dataset} / {model} seed {seed}**: {'; '.join(phrases.values())}"
        if not any(len(steps) for steps, _ in this):
            lines.append(f"{head} (no `{column}` curve recorded)\n")
            continue
        name = f"outlier_{dataset}_{model}_seed{seed}.png"
        plot_curves({f"{model} seed {seed} (flagged)": this,
                     f"{model}, its other seeds": [read_curve(r["curve"], column) for r in runs if r["seed"] != seed]},
                    figures / name, f"{model} seed {seed} vs. its other seeds ({dataset})", ylabel=label)
        lines.append(f"{head}\n\n![{label} of {dataset} {model} seed {seed}](figures/{name})\n")
    return lines


def claims_section(records: Sequence[Mapping[str, Any]], families: Mapping[str, Any],
                   num_factors: Mapping[str, int], confidence: float, out_dir: Path,
                   rules: Optional[Mapping[str, Mapping[str, float]]] = None) -> list[str]:
    """The report's opening: one verdict per claim of the paper, the rule behind it (``rules``: family
    -> ``report.claims.<family>``), run checks with the outlier rule applied to the claims' metrics,
    and the flagged runs' curves (``families``: name -> ``FamilyReport``); writes ``claims.csv``,
    ``run_checks.csv`` and the flagged runs' figures under ``out_dir/figures``."""
    by_family = {name: [r for r in records if r["family"] == name] for name in families}
    found = {name: family.claims(by_family[name]) for name, family in families.items()}
    claims = [c for name in families for c in found[name]]
    checks = {name: family.run_checks(by_family[name]) for name, family in families.items()}
    flagged = {name: flag_outliers(metric_values(by_family[name]), list(dict.fromkeys(c.metric for c in found[name])))
               for name in families}
    for name in families:
        mark_outliers(checks[name], flagged[name])
    all_checks = [c for rows in checks.values() for c in rows]
    rows = claim_rows(records, claims, confidence, num_factors, rules)
    for row in rows:
        baseline = row["comparison"].split(" − ")[1]
        row["caveats"] = caveats(all_checks, row["dataset"], ["sdn", baseline], row["metric"])
    shown = {name: [dict(c, failed=failures(c)) for c in rows_] for name, rows_ in checks.items()}
    write_csv(rows, CLAIM_COLUMNS, out_dir / "claims.csv")
    write_csv([c for rows_ in shown.values() for c in rows_], CHECK_COLUMNS, out_dir / "run_checks.csv")
    chance = sorted({f"{c.metric} {level:.3f} ({d}, {n} factors)" for d, n in num_factors.items() for c in claims
                     if (level := chance_level(c.metric, n))})  # the judged scores' non-zero chance levels
    units = {c.family: c.unit for c in claims}
    md = ["## Claims\n",
          f"Each row: `sdn − baseline` of the mean over seeds, its Welch {int(confidence * 100)} % CI, and the "
          f"verdict of this rule, applied to the numbers by `pipelines/reporting/claims.py`, "
          f"{rule_text({f: r for f, r in (rules or {}).items() if f in units}, units)}. "
          f"A VAE with fewer than {MIN_ACTIVE_DIMS} active latent dimensions in any run counts as collapsed. "
          f"Chance levels: {'; '.join(chance) if chance else 'n/a'}. `caveats` lists the run checks "
          "below that the compared runs fail.\n",
          markdown_table(rows, CLAIM_TABLE, CLAIM_HEADERS) if rows
          else "No claim can be judged (needs sdn and its baselines).\n",
          "\n### Run checks\n",
          "".join(family.check_text for family in families.values()) + f"Every run: {OUTLIER_RULE}. "
          + f"{sum(bool(failures(c)) for c in all_checks)} of {len(all_checks)} runs fail a check.\n"]
    md += [line for name, family in families.items() if shown[name] for line in family.check_tables(shown[name])]
    curves = [line for name, family in families.items()
              for line in outlier_curves(by_family[name], flagged[name], family.outlier_curve, out_dir / "figures")]
    if curves:
        md += ["\n### Flagged runs' learning curves\n", *curves]
    return md + [""]
