"""BetaVAE disentanglement score (Higgins et al., 2017), following disentanglement_lib.

Each training point fixes one random factor across ``batch_size`` pairs of observations; its
feature is the mean absolute code difference over the pairs, its label the fixed factor. A
logistic regression predicts the label; the score is its accuracy. The regression uses today's
sklearn defaults (lbfgs, multinomial); the reference ran sklearn <= 0.21 (liblinear, one-vs-rest).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement import utils
from sdn.metrics.disentanglement.registry import MetricSpec, SampleCounts, Score, uniform_guess


def compute_beta_vae(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    encode_batch_size: int = 128,
) -> dict[str, float]:
    """BetaVAE score: ``train_accuracy`` and ``eval_accuracy`` of the fixed-factor classifier.

    ``encode_batch_size`` is how many observations go through ``representation_fn`` at once (it
    changes no draw and no score)."""
    sizes = utils.factor_sizes(ground_truth_data)
    utils.require_at_least(len(sizes), 2, "factors", "BetaVAE score")
    batch_size = utils.check_positive_int(batch_size, "batch_size")
    num_train = utils.check_positive_int(num_train, "num_train")
    num_eval = utils.check_positive_int(num_eval, "num_eval")
    encode_batch_size = utils.check_positive_int(encode_batch_size, "encode_batch_size")
    random_state = utils.make_random_state(seed)

    train_x, train_y = _generate_points(
        ground_truth_data, representation_fn, len(sizes), batch_size, num_train, random_state, encode_batch_size
    )
    model = LogisticRegression(random_state=int(seed))
    model.fit(train_x, train_y)
    train_accuracy = float(np.mean(model.predict(train_x) == train_y))
    eval_x, eval_y = _generate_points(
        ground_truth_data, representation_fn, len(sizes), batch_size, num_eval, random_state, encode_batch_size
    )
    eval_accuracy = float(np.mean(model.predict(eval_x) == eval_y))
    return {"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy}


def _generate_points(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    num_factors: int,
    batch_size: int,
    num_points: int,
    random_state: np.random.RandomState,
    encode_batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_points`` (feature, fixed-factor label) pairs; random draws in the reference's order,
    observations encoded ``utils.POINTS_PER_ENCODE`` points at a time."""
    features, labels = [], np.zeros(num_points, dtype=np.int64)
    groups: list[np.ndarray] = []

    def flush() -> None:
        for codes in utils.encode_groups(representation_fn, groups, encode_batch_size):
            features.append(np.mean(np.abs(codes[:batch_size] - codes[batch_size:]), axis=0))
        groups.clear()

    for i in tqdm(range(num_points), desc="BetaVAE points", leave=False, disable=None):
        index = random_state.randint(num_factors)
        factors1 = ground_truth_data.sample_factors(batch_size, random_state)
        factors2 = ground_truth_data.sample_factors(batch_size, random_state)
        factors2[:, index] = factors1[:, index]
        groups.append(np.concatenate([
            ground_truth_data.sample_observations_from_factors(factors1, random_state),
            ground_truth_data.sample_observations_from_factors(factors2, random_state),
        ]))
        labels[i] = index
        if len(groups) == utils.POINTS_PER_ENCODE:
            flush()
    if groups:
        flush()
    return np.stack(features), labels


def arguments(counts: SampleCounts) -> dict[str, int]:
    """``compute_all``'s shared counts as this metric's keyword arguments."""
    return dict(batch_size=counts.batch_size, num_train=counts.num_train, num_eval=counts.num_eval,
                encode_batch_size=counts.encode_batch_size)


METRIC = MetricSpec(
    name="beta_vae", compute=compute_beta_vae, arguments=arguments,
    scores={"train_accuracy": Score(chance=uniform_guess), "eval_accuracy": Score(chance=uniform_guess)},
    headline=("eval_accuracy",),
)
