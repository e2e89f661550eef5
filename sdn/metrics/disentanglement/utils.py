"""Shared helpers for the disentanglement metrics: input checks, batched encoding, discretisation.

Arrays are laid out with one row per sample: codes are (N, D) and factors are (N, K). (The
reference, google-research/disentanglement_lib, stores them transposed; the maths is the same.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import sklearn.metrics

from sdn.data.ground_truth import GroundTruthData, RepresentationFn


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; otherwise raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def make_random_state(seed: object) -> np.random.RandomState:
    """The metric's single source of randomness, ``np.random.RandomState(seed)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return np.random.RandomState(int(seed))


def factor_sizes(ground_truth_data: GroundTruthData) -> list[int]:
    """Number of values of each factor; every factor must take at least two values."""
    if not isinstance(ground_truth_data, GroundTruthData):
        raise ValueError(
            "ground_truth_data must follow sdn.data.ground_truth.GroundTruthData, "
            f"got {type(ground_truth_data).__name__}"
        )
    sizes = [int(n) for n in ground_truth_data.factors_num_values]
    if len(sizes) < 1 or min(sizes) < 2:
        raise ValueError(
            "ground_truth_data.factors_num_values must list >= 1 factor, each with >= 2 values "
            f"(drop constant factors), got {sizes}"
        )
    return sizes


def represent(
    representation_fn: RepresentationFn, observations: np.ndarray, batch_size: int
) -> np.ndarray:
    """Encode uint8 ``observations`` (N, C, H, W) in batches into float64 codes (N, D)."""
    num = observations.shape[0]
    chunks = []
    for start in range(0, num, batch_size):
        batch = observations[start : start + batch_size]
        codes = np.asarray(representation_fn(batch))
        if codes.ndim != 2 or codes.shape[0] != batch.shape[0]:
            raise ValueError(
                f"representation_fn must return an array (N, D) with N={batch.shape[0]} rows, "
                f"got shape {codes.shape}"
            )
        chunks.append(codes.astype(np.float64, copy=False))
    codes = np.concatenate(chunks, axis=0)
    if not np.all(np.isfinite(codes)):
        raise ValueError("representation_fn returned non-finite values (NaN or inf)")
    return codes


POINTS_PER_ENCODE = 64  # BetaVAE/FactorVAE points whose observations share one encoder call


def encode_groups(representation_fn: RepresentationFn, groups: Sequence[np.ndarray],
                  encode_batch_size: int) -> list[np.ndarray]:
    """Codes of several observation groups, encoded together in batches of ``encode_batch_size``.

    The metrics that draw a small group of observations per training point (BetaVAE, FactorVAE)
    collect ``POINTS_PER_ENCODE`` groups first, so the encoder sees batches of an efficient size;
    the random stream is consumed in exactly the reference's order, since encoding draws nothing.
    """
    sizes = [len(g) for g in groups]
    codes = represent(representation_fn, np.concatenate(groups), encode_batch_size)
    return np.split(codes, np.cumsum(sizes)[:-1])


def sample_codes_and_factors(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    num_points: int,
    random_state: np.random.RandomState,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_points`` factor vectors batch by batch and encode their observations.

    Factors and observations are drawn batch after batch (the reference uses batches of 16; the
    batch size only changes how the random stream is split, not what is estimated).

    Returns codes (num_points, D) float64 and factors (num_points, K) int64.
    """
    codes, factors = [], []
    done = 0
    while done < num_points:
        num = min(batch_size, num_points - done)
        batch_factors = ground_truth_data.sample_factors(num, random_state)
        observations = ground_truth_data.sample_observations_from_factors(
            batch_factors, random_state
        )
        codes.append(represent(representation_fn, observations, num))
        factors.append(np.asarray(batch_factors, dtype=np.int64))
        done += num
    return np.concatenate(codes, axis=0), np.concatenate(factors, axis=0)


def sample_train_test(
    ground_truth_data: GroundTruthData,
    representation_fn,
    num_train: object,
    num_test: object,
    seed: object,
    batch_size: object,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated counts, then (codes, factors) of a train and a test sample from one seeded stream,
    for the metrics that fit a classifier on one and score it on the other (DCI, SAP)."""
    num_train = check_positive_int(num_train, "num_train", minimum=2)
    num_test = check_positive_int(num_test, "num_test")
    batch_size = check_positive_int(batch_size, "batch_size")
    random_state = make_random_state(seed)
    codes, factors = sample_codes_and_factors(
        ground_truth_data, representation_fn, num_train, random_state, batch_size
    )
    require_at_least(codes.shape[1], 2, "codes", metric)
    codes_test, factors_test = sample_codes_and_factors(
        ground_truth_data, representation_fn, num_test, random_state, batch_size
    )
    return codes, factors, codes_test, factors_test


def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """Map each code column to the index (1..num_bins) of its equal-width histogram bin.

    Same rule as disentanglement_lib's histogram discretiser: ``num_bins`` equal-width bins over
    the column's [min, max] (a constant column gets one bin), bin i holds edge[i-1] <= x < edge[i],
    the maximum falls in the last bin.
    """
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (N, D), got shape {codes.shape}")
    check_positive_int(num_bins, "num_bins")
    out = np.zeros(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        lower_edges = np.histogram_bin_edges(codes[:, d], bins=num_bins)[:-1]
        out[:, d] = np.searchsorted(lower_edges, codes[:, d], side="right")
    return out


def discrete_mutual_info(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Mutual information in nats, (D, K): entry (d, k) is I(code d; factor k) (sklearn)."""
    num_codes, num_factors = discrete_codes.shape[1], factors.shape[1]
    info = np.zeros((num_codes, num_factors))
    for d in range(num_codes):
        for k in range(num_factors):
            info[d, k] = sklearn.metrics.mutual_info_score(factors[:, k], discrete_codes[:, d])
    return info


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
    """Entropy in nats of each factor column, computed as I(y; y) with sklearn."""
    return np.array(
        [sklearn.metrics.mutual_info_score(column, column) for column in np.asarray(factors).T]
    )


def require_at_least(count: int, minimum: int, what: str, metric: str) -> None:
    """Raise a ValueError if the metric gets fewer than ``minimum`` ``what`` (factors, codes)."""
    if count < minimum:
        raise ValueError(f"{metric} needs >= {minimum} {what}, got {count}")
