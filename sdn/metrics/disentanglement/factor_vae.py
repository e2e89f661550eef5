"""FactorVAE disentanglement score (Kim & Mnih, 2018), following disentanglement_lib.

Codes are normalised by their global standard deviation (collapsed codes with std < threshold are
pruned). Each training point fixes one random factor across ``batch_size`` observations and votes
for the active code of least normalised variance. A majority-vote classifier maps each code to
the factor it most often won for; the score is its accuracy.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement import utils
from sdn.metrics.disentanglement.registry import MetricSpec, SampleCounts, Score, uniform_guess


def compute_factor_vae(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    num_variance_estimate: int = 10000,
    prune_threshold: float = 0.05,
    encode_batch_size: int = 128,
) -> dict[str, float]:
    """FactorVAE score: ``train_accuracy``, ``eval_accuracy`` and ``num_active_dims``.

    ``num_active_dims`` is the number of codes kept (std >= ``prune_threshold``); the reference
    reports the length of its boolean mask there (all codes), which we consider a bug.
    ``encode_batch_size`` is how many observations go through ``representation_fn`` at once (it
    changes no draw and no score).
    """
    sizes = utils.factor_sizes(ground_truth_data)
    batch_size = utils.check_positive_int(batch_size, "batch_size", minimum=2)
    num_train = utils.check_positive_int(num_train, "num_train")
    num_eval = utils.check_positive_int(num_eval, "num_eval")
    num_variance_estimate = utils.check_positive_int(
        num_variance_estimate, "num_variance_estimate", minimum=2
    )
    if not np.isfinite(prune_threshold) or prune_threshold < 0:
        raise ValueError(f"prune_threshold must be a finite float >= 0, got {prune_threshold!r}")
    encode_batch_size = utils.check_positive_int(encode_batch_size, "encode_batch_size")
    random_state = utils.make_random_state(seed)

    factors = ground_truth_data.sample_factors(num_variance_estimate, random_state)
    observations = ground_truth_data.sample_observations_from_factors(factors, random_state)
    global_variances = np.var(
        utils.represent(representation_fn, observations, encode_batch_size), axis=0, ddof=1
    )
    active = np.flatnonzero(np.sqrt(global_variances) >= prune_threshold)
    if active.size == 0:
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}

    args = (ground_truth_data, representation_fn, len(sizes), batch_size, random_state,
            global_variances, active, encode_batch_size)
    train_votes = _generate_votes(*args, num_points=num_train)
    classifier = majority_vote_classifier(train_votes)
    eval_votes = _generate_votes(*args, num_points=num_eval)
    return {
        "train_accuracy": vote_accuracy(train_votes, classifier),
        "eval_accuracy": vote_accuracy(eval_votes, classifier),
        "num_active_dims": float(active.size),
    }


def majority_vote_classifier(votes: np.ndarray) -> np.ndarray:
    """For each code (column of ``votes``, (K, D)), the factor with most votes (lowest on ties)."""
    return np.argmax(votes, axis=0)


def vote_accuracy(votes: np.ndarray, classifier: np.ndarray) -> float:
    """Fraction of votes whose factor is the one ``classifier`` assigns to the voted code."""
    return float(votes[classifier, np.arange(votes.shape[1])].sum() / votes.sum())


def _generate_votes(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    num_factors: int,
    batch_size: int,
    random_state: np.random.RandomState,
    global_variances: np.ndarray,
    active: np.ndarray,
    encode_batch_size: int,
    num_points: int,
) -> np.ndarray:
    """Vote table (K, D): entry (k, d) counts points with factor k fixed whose argmin code was d.

    Random draws in the reference's order; observations encoded ``utils.POINTS_PER_ENCODE`` points at a time."""
    votes = np.zeros((num_factors, global_variances.shape[0]), dtype=np.int64)
    groups: list[np.ndarray] = []
    indices: list[int] = []

    def flush() -> None:
        for index, codes in zip(indices, utils.encode_groups(representation_fn, groups, encode_batch_size)):
            local_variances = np.var(codes, axis=0, ddof=1)
            argmin = np.argmin(local_variances[active] / global_variances[active])
            votes[index, active[argmin]] += 1
        groups.clear()
        indices.clear()

    for _ in tqdm(range(num_points), desc="FactorVAE votes", leave=False, disable=None):
        index = random_state.randint(num_factors)
        factors = ground_truth_data.sample_factors(batch_size, random_state)
        factors[:, index] = factors[0, index]
        groups.append(ground_truth_data.sample_observations_from_factors(factors, random_state))
        indices.append(index)
        if len(groups) == utils.POINTS_PER_ENCODE:
            flush()
    if groups:
        flush()
    return votes


def arguments(counts: SampleCounts) -> dict[str, int]:
    """``compute_all``'s shared counts as this metric's keyword arguments (the training sample size also
    sets the global variance estimate)."""
    return dict(batch_size=counts.batch_size, num_train=counts.num_train, num_eval=counts.num_eval,
                num_variance_estimate=counts.num_train, encode_batch_size=counts.encode_batch_size)


METRIC = MetricSpec(
    name="factor_vae", compute=compute_factor_vae, arguments=arguments,
    scores={"train_accuracy": Score(chance=uniform_guess), "eval_accuracy": Score(chance=uniform_guess),
            "num_active_dims": Score()},
    headline=("eval_accuracy",),
)
