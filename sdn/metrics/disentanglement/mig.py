"""Mutual Information Gap (Chen et al., 2018), following disentanglement_lib.

Codes are discretised into equal-width histogram bins; for each factor the gap between the two
codes with the highest mutual information with it, divided by the factor's entropy, is averaged.
"""

from __future__ import annotations

import numpy as np

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement import utils
from sdn.metrics.disentanglement.registry import MetricSpec, SampleCounts, Score, zero


def compute_mig(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    num_train: int = 10000,
    num_bins: int = 20,
    batch_size: int = 64,
) -> dict[str, float]:
    """MIG: ``discrete_mig`` in [0, 1]."""
    utils.factor_sizes(ground_truth_data)
    num_train = utils.check_positive_int(num_train, "num_train", minimum=2)
    num_bins = utils.check_positive_int(num_bins, "num_bins")
    batch_size = utils.check_positive_int(batch_size, "batch_size")
    random_state = utils.make_random_state(seed)
    codes, factors = utils.sample_codes_and_factors(
        ground_truth_data, representation_fn, num_train, random_state, batch_size
    )
    utils.require_at_least(codes.shape[1], 2, "codes", "MIG")
    info = utils.discrete_mutual_info(utils.histogram_discretize(codes, num_bins), factors)
    entropy = utils.discrete_entropy(factors)
    if np.any(entropy <= 0):
        raise ValueError(
            f"MIG needs every factor to vary in the sample, entropies were {entropy.tolist()}; "
            "increase num_train"
        )
    return {"discrete_mig": mutual_information_gap(info, entropy)}


def mutual_information_gap(info: np.ndarray, entropy: np.ndarray) -> float:
    """Mean over factors of (top - second I(code; factor)) / H(factor); ``info`` is (D, K)."""
    top_two = np.sort(info, axis=0)[::-1][:2]
    return float(np.mean((top_two[0] - top_two[1]) / entropy))


def arguments(counts: SampleCounts) -> dict[str, int]:
    """``compute_all``'s shared counts as this metric's keyword arguments (draws in encoder batches)."""
    return dict(num_train=counts.num_train, batch_size=counts.encode_batch_size)


METRIC = MetricSpec(name="mig", compute=compute_mig, arguments=arguments,
                    scores={"discrete_mig": Score(chance=zero)}, headline=("discrete_mig",))
