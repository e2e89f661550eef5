"""Claim verdicts: the stated rule on hand-made CIs, chance levels, degenerate flags, and the CI
of each claim row against the textbook Welch t-interval."""

import math

import numpy as np
import pytest
from scipy import stats

from pipelines.reporting import claims, density, disentanglement


@pytest.mark.parametrize("low, high, lower_is_better, expected", [
    (-0.3, -0.1, True, "supported"),      # sdn lower, lower is better
    (0.1, 0.3, True, "contradicted"),
    (-0.1, 0.2, True, "inconclusive"),
    (0.1, 0.3, False, "supported"),       # sdn higher, higher is better
    (-0.3, -0.1, False, "contradicted"),
    (-0.2, 0.0, False, "inconclusive"),   # touching 0 does not exclude it
    (math.nan, math.nan, True, "inconclusive"),
])
def test_verdict_rule(low, high, lower_is_better, expected):
    assert claims.verdict(low, high, lower_is_better) == expected


def test_chance_levels():
    assert claims.chance_level("beta_vae.eval_accuracy", 5) == pytest.approx(0.2)
    assert claims.chance_level("factor_vae.eval_accuracy", 4) == pytest.approx(0.25)
    assert claims.chance_level("beta_vae.eval_accuracy", None) is None
    assert claims.chance_level("mig.discrete_mig", 5) == 0.0
    assert claims.chance_level("dci.informativeness_test", 5) is None


def _record(family, model, seed, **metrics):
    return {"family": family, "dataset": "d", "model": model, "seed": seed, "metrics": metrics}


def _density(sdn_values, cnn_values):
    return ([_record("density", "sdn", s, iw_bpd=v) for s, v in enumerate(sdn_values)]
            + [_record("density", "cnn", s, iw_bpd=v) for s, v in enumerate(cnn_values)])


def test_claim_row_ci_matches_scipy_welch_interval():
    a, b = [5.01, 5.05, 4.98, 5.02], [5.31, 5.22, 5.40]
    claim = claims.Claim("lower bpd", "density", "iw_bpd", "cnn", True)
    (row,) = claims.claim_rows(_density(a, b), [claim], confidence=0.95)
    # diff ± t_{0.975, ν} · se with the Welch–Satterthwaite ν, written out
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = sum(a) / len(a) - sum(b) / len(b)
    assert row["diff"] == pytest.approx(diff)
    assert row["ci_low"] == pytest.approx(diff - half)
    assert row["ci_high"] == pytest.approx(diff + half)
    assert row["half_width"] == pytest.approx(half)
    assert row["seeds"] == "4 vs 3" and row["verdict"] == "supported"


def test_identical_metric_is_not_judged():
    claim = claims.Claim("lower bpd", "density", "iw_bpd", "cnn", True)
    (row,) = claims.claim_rows(_density([6.0] * 3, [6.0] * 3), [claim])
    assert row["verdict"].startswith("not judged") and "every run" in row["verdict"]


def _dis(model, accuracies, active):
    return [_record("disentanglement", model, s, **{"beta_vae.eval_accuracy": acc, "active_units.count": n})
            for s, (acc, n) in enumerate(zip(accuracies, active))]


def test_collapsed_model_is_not_judged():
    claim = claims.Claim("better", "disentanglement", "beta_vae.eval_accuracy", "cnn", False)
    recs = _dis("sdn", [0.7, 0.75, 0.72], [6, 2, 7]) + _dis("cnn", [0.6, 0.62, 0.61], [5, 5, 6])
    (row,) = claims.claim_rows(recs, [claim], num_factors={"d": 5})
    assert "sdn collapsed (2 active dimensions" in row["verdict"]


def test_chance_level_score_is_not_judged_and_healthy_one_is():
    claim = claims.Claim("better", "disentanglement", "beta_vae.eval_accuracy", "cnn", False)
    at_chance = _dis("sdn", [0.21, 0.22, 0.20], [6, 6, 6]) + _dis("cnn", [0.6, 0.62, 0.61], [5, 5, 6])
    (row,) = claims.claim_rows(at_chance, [claim], num_factors={"d": 5})
    assert "sdn mean 0.210 is at chance level (0.200)" in row["verdict"]
    healthy = _dis("sdn", [0.51, 0.53, 0.52], [6, 6, 6]) + _dis("cnn", [0.6, 0.62, 0.61], [5, 5, 6])
    (row,) = claims.claim_rows(healthy, [claim], num_factors={"d": 5})
    assert row["verdict"] == "contradicted"


def test_family_claims_cover_both_density_baselines_and_each_recorded_score():
    recorded = _dis("sdn", [0.5], [6]) + [_record("disentanglement", "cnn", 0, **{"mig.discrete_mig": 0.1})]
    found = density.claims([]) + disentanglement.claims(recorded)
    assert [(c.family, c.metric, c.baseline, c.lower_is_better) for c in found] == [
        ("density", "iw_bpd", "cnn", True), ("density", "iw_bpd", "cnn_matched", True),
        ("disentanglement", "beta_vae.eval_accuracy", "cnn", False),
        ("disentanglement", "mig.discrete_mig", "cnn", False),
    ]


# -- the equivalence margin δ, the half-width target and the order of the rules ----------------------

@pytest.mark.parametrize("low, high, lower_is_better, unit, expected", [
    (-0.04, 0.03, True, "bpd", "no difference beyond ±0.05 bpd"),    # contains 0, inside (−δ, δ)
    (-0.03, 0.02, False, "", "no difference beyond ±0.05"),          # unitless scores
    (-0.04, -0.01, True, "bpd", "supported (by less than 0.05 bpd)"),  # excludes 0 and inside (−δ, δ)
    (0.01, 0.04, True, "bpd", "contradicted (by less than 0.05 bpd)"),
    (0.01, 0.04, False, "", "supported (by less than 0.05)"),
    (-0.2, -0.01, True, "bpd", "supported"),                         # excludes 0, reaches beyond −δ
    (0.01, 0.2, True, "bpd", "contradicted"),
    (-0.06, 0.01, True, "bpd", "inconclusive"),                      # contains 0, reaches beyond −δ
    (-0.05, 0.01, True, "bpd", "inconclusive"),                      # touching −δ is not inside (−δ, δ)
    (-0.01, 0.05, False, "", "inconclusive"),
    (math.nan, math.nan, True, "bpd", "inconclusive"),
])
def test_verdict_rule_with_margin(low, high, lower_is_better, unit, expected):
    assert claims.verdict(low, high, lower_is_better, 0.05, unit) == expected


def _textbook_welch_ci(a, b, confidence=0.95):
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb)
    diff = np.mean(a) - np.mean(b)
    return diff - half, diff + half, half


RULES = {"density": {"margin": 0.05, "half_width_target": 0.05}}


def test_claim_rows_equivalence_and_half_width_target():
    claim = claims.Claim("lower bpd", "density", "iw_bpd", "cnn", True, "bpd")
    close = ([5.000, 5.010, 5.020, 5.005], [5.010, 5.000, 5.015, 5.012])  # CI ≈ [−0.015, 0.012]
    low, high, half = _textbook_welch_ci(*close)
    assert -0.05 < low < 0 < high < 0.05 and half < 0.05  # the case is what it claims to be
    (row,) = claims.claim_rows(_density(*close), [claim], rules=RULES)
    assert row["verdict"] == "no difference beyond ±0.05 bpd"
    assert row["half_width"] == pytest.approx(half) and row["half_width_exceeds_target"] is False
    assert row["half_width_shown"] == f"{half:.3f}" and (row["margin"], row["half_width_target"]) == (0.05, 0.05)
    wide = ([5.0, 5.2, 4.9, 5.1], [5.05, 4.85, 5.25, 5.0])
    low, high, half = _textbook_welch_ci(*wide)
    assert low < -0.05 and high > 0 and half > 0.05
    (row,) = claims.claim_rows(_density(*wide), [claim], rules=RULES)
    assert row["verdict"] == "inconclusive" and row["half_width_exceeds_target"] is True
    assert row["half_width_shown"] == f"**{half:.3f}** (> 0.05)"
    small_but_real = ([5.000, 5.002, 5.001, 5.003], [5.020, 5.021, 5.019, 5.022])
    assert -0.05 < _textbook_welch_ci(*small_but_real)[0] and _textbook_welch_ci(*small_but_real)[1] < 0
    (row,) = claims.claim_rows(_density(*small_but_real), [claim], rules=RULES)
    assert row["verdict"] == "supported (by less than 0.05 bpd)"


def test_without_a_rule_there_is_no_equivalence_verdict_nor_target():
    claim = claims.Claim("lower bpd", "density", "iw_bpd", "cnn", True, "bpd")
    (row,) = claims.claim_rows(_density([5.000, 5.010, 5.020], [5.010, 5.000, 5.015]), [claim])
    assert row["verdict"] == "inconclusive" and row["half_width_exceeds_target"] is False
    assert row["margin"] is None and row["half_width_target"] is None
    (row,) = claims.claim_rows(_density([5.0], [5.1, 5.2]), [claim], rules=RULES)  # one seed: no CI
    assert row["half_width_exceeds_target"] is True and row["half_width_shown"] == "n/a (target 0.05)"


def test_degenerate_inputs_are_judged_before_the_margin():
    """Identical values give the CI [0, 0], inside any ±δ: rule 1 (not judged) comes first."""
    claim = claims.Claim("lower bpd", "density", "iw_bpd", "cnn", True, "bpd")
    (row,) = claims.claim_rows(_density([6.0] * 3, [6.0] * 3), [claim], rules=RULES)
    assert (row["ci_low"], row["ci_high"]) == (0.0, 0.0) and row["verdict"].startswith("not judged")


def test_rule_text_states_each_family_margin_and_target():
    text = claims.rule_text({"density": {"margin": 0.05, "half_width_target": 0.03},
                             "disentanglement": {"margin": 0.02, "half_width_target": 0.04}},
                            {"density": "bpd", "disentanglement": ""})
    assert "density 0.05 bpd; disentanglement 0.02" in text
    assert "density ≤ 0.03 bpd; disentanglement ≤ 0.04" in text
    assert text.index("(1) not judged") < text.index("(2) supported") < text.index("(3) no difference") < text.index(
        "(4) inconclusive")


def test_outlier_flags_join_the_failed_checks_and_caveat_only_their_metric():
    checks = [{"dataset": "d", "model": "cnn", "seed": 0, "failed": "not at plateau"},
              {"dataset": "d", "model": "cnn", "seed": 1, "failed": ""},
              {"dataset": "d", "model": "sdn", "seed": 1, "failed": ""}]
    claims.mark_outliers(checks, {("d", "cnn", 0): {"a": "outlier: a"},
                                  ("d", "cnn", 1): {"b": "outlier: b", "c": "outlier: c"}})
    assert [claims.failures(c) for c in checks] == ["not at plateau; outlier: a", "outlier: b; outlier: c", ""]
    assert claims.caveats(checks, "d", ["sdn", "cnn"], "b") == "cnn seed 0: not at plateau; cnn seed 1: outlier: b"
    assert claims.caveats(checks, "d", ["sdn", "cnn"]) == ("cnn seed 0: not at plateau; outlier: a; "
                                                           "cnn seed 1: outlier: b; outlier: c")
