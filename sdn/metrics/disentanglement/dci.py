"""DCI: Disentanglement, Completeness, Informativeness (Eastwood & Williams, 2018).

Follows disentanglement_lib.

One sklearn ``GradientBoostingClassifier()`` (library defaults: 100 stages, depth 3, learning rate
0.1) per factor predicts the factor from all codes; its feature importances form column k of the
(D, K) importance matrix. Disentanglement and completeness are importance-weighted
1 - normalised entropies of the matrix's rows and columns; informativeness is the classifiers'
mean accuracy on the training and the test sample.

Speed: the exact gradient-boosted trees dominate the cost. The classifiers are independent, so
they are fitted in parallel threads (sklearn's tree builder releases the GIL), largest factor
first, by default one thread per factor: a K-class factor costs K trees per stage, so with fewer
threads than factors one thread ends up with the two largest (dSprites on 2 cores: 100 s with 5
threads, 115 s with 2). Every classifier gets ``random_state=seed``, so results do not depend on
``n_jobs``.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from joblib import Parallel, delayed
from sklearn.ensemble import GradientBoostingClassifier

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement import utils
from sdn.metrics.disentanglement.registry import MetricSpec, SampleCounts, Score, zero


def compute_dci(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    num_train: int = 10000,
    num_test: int = 5000,
    batch_size: int = 64,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """DCI scores: disentanglement, completeness, informativeness_train / _test.

    Informativeness is reported as accuracy (higher is better), as the reference does.
    """
    sizes = utils.factor_sizes(ground_truth_data)
    utils.require_at_least(len(sizes), 2, "factors", "DCI")
    codes, factors, codes_test, factors_test = utils.sample_train_test(
        ground_truth_data, representation_fn, num_train, num_test, seed, batch_size, "DCI"
    )
    importance, train_acc, test_acc = gbt_importance_matrix(
        codes, factors, codes_test, factors_test, int(seed), n_jobs
    )
    return {
        "disentanglement": disentanglement(importance),
        "completeness": completeness(importance),
        "informativeness_train": train_acc,
        "informativeness_test": test_acc,
    }


def _fit_one(
    codes: np.ndarray,
    labels: np.ndarray,
    codes_test: np.ndarray,
    labels_test: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, float, float]:
    """Fit library-default boosted trees for one factor: importances, train and test accuracy."""
    if np.unique(labels).size < 2:
        raise ValueError(
            "DCI needs every factor to take >= 2 values in the training sample; increase num_train"
        )
    model = GradientBoostingClassifier(random_state=seed)
    model.fit(codes, labels)
    return (
        np.abs(model.feature_importances_),
        float(np.mean(model.predict(codes) == labels)),
        float(np.mean(model.predict(codes_test) == labels_test)),
    )


def gbt_importance_matrix(
    codes: np.ndarray,
    factors: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    seed: int,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """(D, K) importance matrix and mean train / test accuracy of per-factor boosted trees
    (``n_jobs`` threads; None: one per factor)."""
    num_factors = factors.shape[1]
    n_jobs = num_factors if n_jobs is None else n_jobs
    # Most classes first: a K-class factor costs K trees per stage, so this balances the threads.
    order = sorted(range(num_factors), key=lambda k: -np.unique(factors[:, k]).size)
    results = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(_fit_one)(codes, factors[:, k], codes_test, factors_test[:, k], seed) for k in order
    )
    importance = np.zeros((codes.shape[1], num_factors))
    train_acc, test_acc = np.zeros(num_factors), np.zeros(num_factors)
    for k, (column, acc_train, acc_test) in zip(order, results):
        importance[:, k], train_acc[k], test_acc[k] = column, acc_train, acc_test
    return importance, float(np.mean(train_acc)), float(np.mean(test_acc))


def disentanglement_per_code(importance: np.ndarray) -> np.ndarray:
    """1 - entropy (base K) of each code's importance distribution over the K factors."""
    return 1.0 - scipy.stats.entropy(importance.T + 1e-11, base=importance.shape[1])


def disentanglement(importance: np.ndarray) -> float:
    """Per-code disentanglement weighted by each code's share of the total importance."""
    per_code = disentanglement_per_code(importance)
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    return float(np.sum(per_code * weights.sum(axis=1) / weights.sum()))


def completeness_per_factor(importance: np.ndarray) -> np.ndarray:
    """1 - entropy (base D) of each factor's importance distribution over the D codes."""
    return 1.0 - scipy.stats.entropy(importance + 1e-11, base=importance.shape[0])


def completeness(importance: np.ndarray) -> float:
    """Per-factor completeness weighted by each factor's share of the total importance."""
    per_factor = completeness_per_factor(importance)
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    return float(np.sum(per_factor * weights.sum(axis=0) / weights.sum()))


def arguments(counts: SampleCounts) -> dict[str, int]:
    """``compute_all``'s shared counts as this metric's keyword arguments (draws in encoder batches)."""
    return dict(num_train=counts.num_train, num_test=counts.num_eval, batch_size=counts.encode_batch_size)


METRIC = MetricSpec(
    name="dci", compute=compute_dci, arguments=arguments,
    scores={"disentanglement": Score(chance=zero), "completeness": Score(chance=zero),
            "informativeness_train": Score(), "informativeness_test": Score()},
    headline=("disentanglement", "completeness", "informativeness_test"),
)
