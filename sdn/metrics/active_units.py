"""Active latent dimensions (Burda et al., 2016): a posterior-collapse check for VAEs.

A latent dimension u is *active* when Cov_x(E_q(z|x)[z_u]) > threshold (0.01 in the paper): the
posterior mean moves with the input. A collapsed VAE has (almost) no active dimension, whatever its
disentanglement scores say, so the study reports the count next to them.
"""

from __future__ import annotations

import numpy as np

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement.utils import check_positive_int, make_random_state, sample_codes_and_factors

BURDA_THRESHOLD = 0.01


def posterior_mean_variance(means: np.ndarray) -> np.ndarray:
    """Per-dimension variance over inputs (unbiased, ddof=1) of posterior means (N, D), N >= 2."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(f"posterior means must be (N >= 2, D), got shape {means.shape}")
    return means.var(axis=0, ddof=1)


def count_active(means: np.ndarray, threshold: float = BURDA_THRESHOLD) -> int:
    """Number of dimensions whose posterior-mean variance exceeds ``threshold``."""
    return int((posterior_mean_variance(means) > threshold).sum())


def compute_active_units(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                         seed: int, num_points: int = 10000, batch_size: int = 64,
                         threshold: float = BURDA_THRESHOLD) -> dict[str, float]:
    """Active-dimension count and per-dimension variances of the representation on sampled data."""
    check_positive_int(num_points, "num_points", minimum=2)
    codes, _ = sample_codes_and_factors(ground_truth_data, representation_fn, num_points,
                                        make_random_state(seed), check_positive_int(batch_size, "batch_size"))
    variance = posterior_mean_variance(codes)
    out: dict[str, float] = {"active_units.count": int((variance > threshold).sum()),
                             "active_units.num_points": int(num_points)}
    out.update({f"active_units.var_{j}": float(v) for j, v in enumerate(variance)})
    return out
