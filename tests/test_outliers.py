"""The run checks' outlier rule (scaled MAD over seeds) against scipy and hand-computed cases."""

import math

import numpy as np
import pytest
from scipy import stats

from pipelines.reporting import outliers
from pipelines.reporting.tables import metric_values


def test_scale_matches_scipy_median_abs_deviation():
    rng = np.random.default_rng(0)
    for n in (3, 4, 5, 8):
        x = rng.normal(4.2, 0.1, n)
        scale, name = outliers.robust_scale(x)
        assert name == "scaled MAD"
        assert scale == pytest.approx(stats.median_abs_deviation(x, scale="normal"), rel=1e-12)
        expected = np.abs(x - np.median(x)) / stats.median_abs_deviation(x, scale="normal")
        np.testing.assert_allclose(outliers.robust_distances(x), expected, rtol=1e-12)
    assert outliers.MAD_SCALE == pytest.approx(1.4826, abs=1e-4)


def test_hand_cases():
    # median 3, |x − 3| = 2, 1, 0, 1, 97: MAD 1, scaled 1.4826; 100 lies 97 / 1.4826 = 65.4 away
    d = outliers.robust_distances([1, 2, 3, 4, 100])
    assert d[4] == pytest.approx(97 / 1.482602218505602) and d[0] == pytest.approx(2 / 1.482602218505602)
    # The committed cnn seeds: median 4.19, |x − m| = .037 .037 .246 .052: MAD .0445
    cnn = [4.227, 4.153, 4.436, 4.138]
    assert outliers.robust_distances(cnn)[2] == pytest.approx(0.246 / (0.0445 * 1.482602218505602))  # 3.73 > 3
    # MAD 0 (three seeds equal): mean |x − median| = 4 / 4 = 1, scale sqrt(pi / 2): 4 / 1.2533 = 3.19 > 3
    scale, name = outliers.robust_scale([1, 1, 1, 5])
    assert scale == pytest.approx(math.sqrt(math.pi / 2)) and "mean absolute deviation" in name
    assert outliers.robust_distances([1, 1, 1, 5])[3] == pytest.approx(4 / math.sqrt(math.pi / 2))
    # MAD 0 with two seeds off by the same amount: 0.1 / (1.2533 · 0.04) = 1.99, not flagged
    assert outliers.robust_distances([1, 1, 1, 1.1, 1.1]).max() == pytest.approx(0.1 / (math.sqrt(math.pi / 2) * 0.04))
    # every seed equal: nothing is an outlier, no division by zero
    np.testing.assert_array_equal(outliers.robust_distances([2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])


def _record(model, seed, value, metric="iw_bpd"):
    return {"family": "density", "dataset": "d", "model": model, "seed": seed, "metrics": {metric: value}}


def test_flags_the_seed_far_from_its_model_median_only():
    values = {"sdn": [4.087, 4.134, 4.184, 4.133], "cnn": [4.227, 4.153, 4.436, 4.138],
              "cnn_matched": [4.322, 4.299, 4.010, 4.309], "two": [4.0, 9.0]}
    records = [_record(m, s, v) for m, vs in values.items() for s, v in enumerate(vs)]
    records += [_record("cnn", s, 1.0 + 5 * (s == 1), "elbo_bpd") for s in range(4)]  # not a claim metric
    flagged = outliers.flag_outliers(metric_values(records), ["iw_bpd"])
    assert sorted(flagged) == [("d", "cnn", 2), ("d", "cnn_matched", 2)]  # two seeds: never flagged
    assert list(flagged[("d", "cnn", 2)]) == ["iw_bpd"]
    phrase = flagged[("d", "cnn", 2)]["iw_bpd"]
    assert phrase.startswith("outlier: iw_bpd 4.436 lies 3.7 × the scaled MAD")
    assert "median 4.190 of cnn's 4 seeds" in phrase
    assert ("d", "cnn", 1) in outliers.flag_outliers(metric_values(records), ["iw_bpd", "elbo_bpd"])
