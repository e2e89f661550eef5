"""Separated Attribute Predictability (Kumar et al., 2018), following disentanglement_lib.

A score matrix (D, K) rates how well each single code predicts each factor: test accuracy of a
1-D LinearSVC(C=0.01, class_weight="balanced") for discrete factors (the reference's default), or
the squared correlation for continuous ones. SAP is the mean over factors of the gap between the
two best codes. LinearSVC keeps sklearn's current ``dual="auto"`` (primal for N > 1 features),
which solves the same squared-hinge problem as the reference's dual solver, and converges.
"""

from __future__ import annotations

import numpy as np
from sklearn.svm import LinearSVC
from tqdm import tqdm

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement import utils
from sdn.metrics.disentanglement.registry import MetricSpec, SampleCounts, Score, zero


def compute_sap(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    num_train: int = 10000,
    num_test: int = 5000,
    batch_size: int = 64,
    continuous_factors: bool = False,
) -> dict[str, float]:
    """SAP: ``SAP_score``.

    With discrete factors a perfect code's gap is at most 1 - (accuracy of an unrelated code,
    about 1/num_values), and 1-D one-vs-rest SVMs cannot separate the middle values of factors
    with more than about four values, so perfect representations score well below 1.
    """
    utils.factor_sizes(ground_truth_data)
    codes, factors, codes_test, factors_test = utils.sample_train_test(
        ground_truth_data, representation_fn, num_train, num_test, seed, batch_size, "SAP"
    )
    if continuous_factors:
        matrix = squared_correlation_matrix(codes, factors)
    else:
        matrix = svm_accuracy_matrix(codes, factors, codes_test, factors_test, int(seed))
    return {"SAP_score": top_two_gap(matrix)}


def svm_accuracy_matrix(
    codes: np.ndarray,
    factors: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    seed: int,
) -> np.ndarray:
    """(D, K) test accuracy of a LinearSVC trained on code d alone to predict factor k."""
    matrix = np.zeros((codes.shape[1], factors.shape[1]))
    for d in tqdm(range(codes.shape[1]), desc="SAP codes", leave=False, disable=None):
        for k in range(factors.shape[1]):
            if np.unique(factors[:, k]).size < 2:
                raise ValueError(
                    f"SAP needs factor {k} to take >= 2 values in the training sample; "
                    "increase num_train"
                )
            svm = LinearSVC(C=0.01, class_weight="balanced", random_state=seed)
            svm.fit(codes[:, d : d + 1], factors[:, k])
            predicted = svm.predict(codes_test[:, d : d + 1])
            matrix[d, k] = float(np.mean(predicted == factors_test[:, k]))
    return matrix


def squared_correlation_matrix(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(D, K) squared Pearson correlation of code d and factor k (0 for a constant code)."""
    matrix = np.zeros((codes.shape[1], factors.shape[1]))
    for d in range(codes.shape[1]):
        for k in range(factors.shape[1]):
            cov = np.cov(codes[:, d], factors[:, k], ddof=1)
            if cov[0, 0] > 1e-12 and cov[1, 1] > 0:
                matrix[d, k] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1])
    return matrix


def top_two_gap(matrix: np.ndarray) -> float:
    """Mean over factors (columns) of the best minus the second-best code score."""
    ordered = np.sort(matrix, axis=0)
    return float(np.mean(ordered[-1] - ordered[-2]))


def arguments(counts: SampleCounts) -> dict[str, int]:
    """``compute_all``'s shared counts as this metric's keyword arguments (draws in encoder batches)."""
    return dict(num_train=counts.num_train, num_test=counts.num_eval, batch_size=counts.encode_batch_size)


METRIC = MetricSpec(name="sap", compute=compute_sap, arguments=arguments,
                    scores={"SAP_score": Score(chance=zero)}, headline=("SAP_score",))
