"""Active latent dimensions (Burda et al.) against closed forms and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from sdn.metrics.active_units import compute_active_units, count_active, posterior_mean_variance
from test_disentanglement_metrics import TinyFactors, decode


def test_variance_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(50, 4)) * np.array([0.01, 0.5, 1.0, 2.0])
    naive = []
    for j in range(means.shape[1]):
        column = means[:, j]
        mu = sum(column) / len(column)
        naive.append(sum((v - mu) ** 2 for v in column) / (len(column) - 1))
    np.testing.assert_allclose(posterior_mean_variance(means), naive, rtol=1e-12)


def test_count_separates_known_variances():
    rng = np.random.default_rng(1)
    # standard deviations 0, 0.03, 0.3, 1, 3: variances 0, 9e-4, 0.09, 1, 9 -> three above 0.01
    means = rng.normal(size=(20000, 5)) * np.array([0.0, 0.03, 0.3, 1.0, 3.0])
    assert count_active(means) == 3
    assert count_active(means, threshold=1e-4) == 4
    assert count_active(np.ones((10, 3))) == 0  # a collapsed encoder
    with pytest.raises(ValueError, match="N >= 2"):
        posterior_mean_variance(np.zeros((1, 3)))


def test_compute_active_units_on_ground_truth():
    sizes = [4, 10]
    data = TinyFactors(sizes)

    def representation(images):  # factor 0 scaled to variance ~0.078 (active), factor 1 to ~8e-5
        values = decode(images)
        return np.stack([0.2 * values[:, 0], 0.001 * values[:, 1], np.zeros(len(values))], axis=1)

    out = compute_active_units(data, representation, seed=0, num_points=4000)
    assert out["active_units.count"] == 1 and out["active_units.num_points"] == 4000
    # variance of a uniform factor on 0..n-1 is (n^2 - 1) / 12
    np.testing.assert_allclose(out["active_units.var_0"], 0.04 * (16 - 1) / 12, rtol=0.1)
    np.testing.assert_allclose(out["active_units.var_1"], 1e-6 * (100 - 1) / 12, rtol=0.1)
    assert out["active_units.var_2"] == 0.0
    assert compute_active_units(data, representation, seed=0, num_points=4000) == out
