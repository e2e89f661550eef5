"""Tests for sdn.metrics.disentanglement on tiny synthetic ground truth built here.

Observations are the factor indices themselves stored as uint8 "images" (1, 1, K); the
representations decode them, so every score has a known ideal or chance value.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdn.metrics.disentanglement import (
    METRIC_NAMES,
    compute_all,
    compute_beta_vae,
    compute_dci,
    compute_factor_vae,
    compute_mig,
    compute_sap,
)
from sdn.metrics.disentanglement import beta_vae, dci, factor_vae, mig, sap, utils

SIZES = [3, 5, 4, 8]  # factor sizes of the main synthetic data
NUM_TRAIN, NUM_EVAL, BATCH = 400, 200, 32  # small counts keep the whole file fast
PERMUTATION = [2, 0, 3, 1]  # code j holds factor PERMUTATION[j]

# BetaVAE's LogisticRegression keeps the library's defaults (max_iter=100) on unscaled features.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


class TinyFactors:
    """GroundTruthData whose observation is the factor vector itself, as uint8 (1, 1, K)."""

    def __init__(self, sizes):
        self._sizes = list(sizes)

    @property
    def factor_names(self):
        return [f"f{k}" for k in range(len(self._sizes))]

    @property
    def factors_num_values(self):
        return self._sizes

    @property
    def observation_shape(self):
        return (1, 1, len(self._sizes))

    def sample_factors(self, num, random_state):
        return np.stack([random_state.randint(n, size=num) for n in self._sizes], axis=1).astype(
            np.int64
        )

    def sample_observations_from_factors(self, factors, random_state):
        return factors.astype(np.uint8)[:, None, None, :]


def decode(images: np.ndarray) -> np.ndarray:
    """The factor values carried by TinyFactors observations, as float64 (N, K)."""
    return images[:, 0, 0, :].astype(np.float64)


# Monotone per-factor transforms, mild enough that distinct values never share one of 20 bins.
TRANSFORMS = [
    lambda v: 3.0 * v + 1.0,
    lambda v: v + 0.05 * v**2,
    lambda v: -2.0 * np.sqrt(v + 1.0),
    lambda v: 100.0 * np.exp(v / 10.0),
]


def perfect_representation(images: np.ndarray) -> np.ndarray:
    """Each code is one factor, permuted, rescaled and monotonically transformed."""
    values = decode(images)
    return np.stack([TRANSFORMS[j](values[:, k]) for j, k in enumerate(PERMUTATION)], axis=1)


def standardised(values: np.ndarray, sizes) -> np.ndarray:
    """Factor values scaled to zero mean, unit variance under the uniform factor distribution."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return (values - (sizes - 1) / 2) / np.sqrt((sizes**2 - 1) / 12)


def mixed_representation(images: np.ndarray) -> np.ndarray:
    """Factors 0 and 1 rotated by 45 degrees into codes 0 and 1; factors 2, 3 kept as codes."""
    z = standardised(decode(images), SIZES)
    return np.stack([z[:, 0] + z[:, 1], z[:, 0] - z[:, 1], z[:, 2], z[:, 3]], axis=1) / np.sqrt(2)


def make_noise_representation(seed: int = 123, dim: int = 4):
    """Codes of i.i.d. Gaussian noise, independent of the images (fresh stream per call)."""
    rng = np.random.RandomState(seed)
    return lambda images: rng.randn(images.shape[0], dim)


def run_all(representation_fn, sizes=SIZES, seed=0, **kwargs) -> dict[str, float]:
    with pytest.warns(UserWarning, match="reduced sample counts"):
        return compute_all(
            TinyFactors(sizes), representation_fn, seed,
            num_train=kwargs.pop("num_train", NUM_TRAIN), num_eval=kwargs.pop("num_eval", NUM_EVAL),
            batch_size=kwargs.pop("batch_size", BATCH), **kwargs,
        )


@pytest.fixture(scope="module")
def perfect_scores():
    return run_all(perfect_representation)


@pytest.fixture(scope="module")
def noise_scores():
    return run_all(make_noise_representation())


@pytest.fixture(scope="module")
def mixed_scores():
    return run_all(mixed_representation)


# ---------------------------------------------------------------- end-to-end behaviour


def test_perfect_representation_scores_near_one(perfect_scores):
    assert perfect_scores["beta_vae.eval_accuracy"] >= 0.95
    assert perfect_scores["factor_vae.eval_accuracy"] >= 0.95
    assert perfect_scores["factor_vae.num_active_dims"] == 4
    assert perfect_scores["dci.disentanglement"] >= 0.95
    assert perfect_scores["dci.completeness"] >= 0.95
    assert perfect_scores["dci.informativeness_test"] >= 0.95
    assert perfect_scores["mig.discrete_mig"] >= 0.9


def test_perfect_representation_sap():
    data = TinyFactors(SIZES)
    continuous = compute_sap(data, perfect_representation, 0, NUM_TRAIN, NUM_EVAL, BATCH,
                             continuous_factors=True)
    assert continuous["SAP_score"] >= 0.9
    # Discrete SAP (the library default) cannot reach 1: the best other code still scores chance
    # accuracy 1/n, and 1-D one-vs-rest SVMs only separate factors of <= 4 values. On such
    # factors, with enough samples for C=0.01, a perfect code reaches >= 90% of the ceiling
    # mean(1 - 1/n).
    small = [3, 4, 3, 4]
    ceiling = np.mean([1 - 1 / n for n in small])
    discrete = compute_sap(TinyFactors(small), lambda x: 2.0 * decode(x)[:, ::-1] - 1, 0,
                           num_train=3000, num_test=500, batch_size=500)
    assert 0.9 * ceiling <= discrete["SAP_score"] <= ceiling + 0.05


def test_noise_representation_scores_near_chance(noise_scores):
    num_factors = len(SIZES)
    # BetaVAE / FactorVAE: a classifier of which factor was fixed -> chance is 1/num_factors.
    assert abs(noise_scores["beta_vae.eval_accuracy"] - 1 / num_factors) < 0.12
    assert abs(noise_scores["factor_vae.eval_accuracy"] - 1 / num_factors) < 0.12
    # MIG and SAP: no code is more informative than another -> gaps near 0.
    assert noise_scores["mig.discrete_mig"] < 0.05
    assert noise_scores["sap.SAP_score"] < 0.05
    # DCI: importance spread evenly over factors -> disentanglement near 0; test accuracy is
    # the mean chance accuracy 1/n of the factors.
    assert noise_scores["dci.disentanglement"] < 0.15
    assert abs(noise_scores["dci.informativeness_test"] - np.mean([1 / n for n in SIZES])) < 0.08


def test_mixing_two_factors_lowers_scores(perfect_scores, mixed_scores):
    for key in ["mig.discrete_mig", "dci.disentanglement", "factor_vae.eval_accuracy"]:
        assert mixed_scores[key] < perfect_scores[key] - 0.15, key
    # Mixing is invertible, so the information itself is still there.
    assert mixed_scores["dci.informativeness_test"] >= 0.9


def test_same_seed_same_scores_and_n_jobs_does_not_matter():
    sizes = [3, 3, 4]
    rep = lambda x: decode(x)[:, ::-1] * [1.0, -2.0, 0.5]  # noqa: E731
    first = run_all(rep, sizes=sizes, seed=7)
    second = run_all(rep, sizes=sizes, seed=7)
    assert first == second
    other_seed = run_all(rep, sizes=sizes, seed=8, metrics=["mig"])
    assert other_seed["mig.discrete_mig"] != first["mig.discrete_mig"]
    serial = compute_dci(TinyFactors(sizes), rep, 7, NUM_TRAIN, NUM_EVAL, BATCH, n_jobs=1)
    assert all(serial[key] == first[f"dci.{key}"] for key in serial)


def test_compute_all_keys_and_agreement_with_single_metrics():
    data = TinyFactors([3, 4])
    rep = lambda x: decode(x) * [1.0, -2.0]  # noqa: E731
    scores = run_all(rep, sizes=[3, 4], metrics=["mig", "beta_vae"])
    assert scores["mig.discrete_mig"] == compute_mig(data, rep, 0, NUM_TRAIN, batch_size=BATCH)[
        "discrete_mig"
    ]
    assert scores["beta_vae.eval_accuracy"] == compute_beta_vae(
        data, rep, 0, BATCH, NUM_TRAIN, NUM_EVAL
    )["eval_accuracy"]
    assert scores["settings.num_train"] == NUM_TRAIN and scores["settings.num_eval"] == NUM_EVAL
    assert set(METRIC_NAMES) == {"beta_vae", "factor_vae", "mig", "dci", "sap"}


# ---------------------------------------------------------------- core statistics


def test_histogram_discretize_matches_numpy_digitize():
    rng = np.random.RandomState(0)
    codes = np.stack([rng.randn(300), rng.exponential(size=300), np.full(300, 2.5),
                      rng.randint(0, 7, size=300).astype(float)], axis=1)
    got = utils.histogram_discretize(codes, 20)
    for d in range(codes.shape[1]):
        expected = np.digitize(codes[:, d], np.histogram(codes[:, d], 20)[1][:-1])
        np.testing.assert_array_equal(got[:, d], expected)
    # Hand example: 0..19 in 20 bins of width 0.95 -> value v lands in bin v + 1.
    np.testing.assert_array_equal(
        utils.histogram_discretize(np.arange(20.0)[:, None], 20)[:, 0], np.arange(1, 21)
    )


def test_mutual_information_matches_contingency_table():
    rng = np.random.RandomState(1)
    factors = rng.randint(0, 4, size=(500, 2))
    codes = np.stack([factors[:, 0] + rng.randint(0, 2, size=500), rng.randint(0, 5, size=500)], 1)
    info = utils.discrete_mutual_info(codes, factors)
    for d in range(2):
        for k in range(2):
            table = np.zeros((codes[:, d].max() + 1, factors[:, k].max() + 1))
            np.add.at(table, (codes[:, d], factors[:, k]), 1)
            joint = table / table.sum()
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
            nz = joint > 0
            assert info[d, k] == pytest.approx(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
    for k in range(2):
        p = np.bincount(factors[:, k]) / 500
        assert utils.discrete_entropy(factors)[k] == pytest.approx(-np.sum(p * np.log(p)))


def test_mutual_information_gap_by_hand():
    info = np.array([[0.9, 0.1, 0.3], [0.2, 0.5, 0.3], [0.4, 0.45, 0.0]])
    entropy = np.array([1.0, 2.0, 0.6])
    expected = np.mean([(0.9 - 0.4) / 1.0, (0.5 - 0.45) / 2.0, (0.3 - 0.3) / 0.6])
    assert mig.mutual_information_gap(info, entropy) == pytest.approx(expected)


def test_dci_disentanglement_and_completeness_by_hand():
    importance = np.array([[0.6, 0.2], [0.0, 0.4], [0.1, 0.1]])  # 3 codes x 2 factors

    def one_minus_entropy(p, base):
        p = np.asarray(p, dtype=float) / np.sum(p)
        nz = p > 0
        return 1 + np.sum(p[nz] * np.log(p[nz])) / np.log(base)

    row_weights = np.array([0.8, 0.4, 0.2]) / 1.4
    expected_d = sum(w * one_minus_entropy(r, 2) for w, r in zip(row_weights, importance))
    col_weights = np.array([0.7, 0.7]) / 1.4
    expected_c = sum(w * one_minus_entropy(c, 3) for w, c in zip(col_weights, importance.T))
    assert dci.disentanglement(importance) == pytest.approx(expected_d, abs=1e-8)
    assert dci.completeness(importance) == pytest.approx(expected_c, abs=1e-8)
    # Closed forms: a permutation matrix is perfect, a constant matrix scores 0.
    assert dci.disentanglement(np.eye(3)[[2, 0, 1]]) == pytest.approx(1.0, abs=1e-8)
    assert dci.completeness(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-8)


def test_dci_importances_are_normalised_and_thread_count_invariant():
    rng = np.random.RandomState(2)
    factors = rng.randint(0, 3, size=(200, 2))
    codes = np.concatenate([factors + 0.1 * rng.randn(200, 2), rng.randn(200, 1)], axis=1)
    one = dci.gbt_importance_matrix(codes[:150], factors[:150], codes[150:], factors[150:], 0, 1)
    two = dci.gbt_importance_matrix(codes[:150], factors[:150], codes[150:], factors[150:], 0, 2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_allclose(one[0].sum(axis=0), 1.0)
    assert np.argmax(one[0], axis=0).tolist() == [0, 1]


def test_sap_gap_and_score_matrices_by_hand():
    matrix = np.array([[0.9, 0.2], [0.3, 0.8], [0.1, 0.75]])
    assert sap.top_two_gap(matrix) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.75)) / 2)
    rng = np.random.RandomState(3)
    factors = rng.randint(0, 4, size=(300, 2))
    codes = np.stack([factors[:, 1] ** 2 + rng.randn(300), rng.randn(300)], axis=1)
    expected = np.array([[np.corrcoef(codes[:, d], factors[:, k])[0, 1] ** 2 for k in range(2)]
                         for d in range(2)])
    np.testing.assert_allclose(sap.squared_correlation_matrix(codes, factors), expected)
    accuracy = sap.svm_accuracy_matrix(codes[:200], factors[:200], codes[200:], factors[200:], 0)
    baseline = np.max(np.bincount(factors[200:, 1])) / 100
    assert accuracy[0, 1] > baseline + 0.2  # code 0 predicts factor 1 well above majority rate


def test_factor_vae_majority_vote_by_hand():
    votes = np.array([[5, 0, 1, 0], [2, 3, 0, 2], [2, 1, 4, 2]])  # 3 factors x 4 codes
    classifier = factor_vae.majority_vote_classifier(votes)
    assert classifier.tolist() == [0, 1, 2, 1]  # code 3 ties factors 1 and 2 -> lower index
    assert factor_vae.vote_accuracy(votes, classifier) == pytest.approx((5 + 3 + 4 + 2) / 22)


def test_beta_vae_features_match_closed_form():
    # For the identity code the fixed factor's feature is 0 and factor k's is E|a - b| for
    # independent uniform a, b on n values, (n^2 - 1) / (3 n).
    sizes = [3, 6]
    x, y = beta_vae._generate_points(TinyFactors(sizes), decode, 2, 64, 400,
                                     np.random.RandomState(0))
    for k, n in enumerate(sizes):
        assert np.all(x[y == k, k] == 0)
        assert x[y != k, k].mean() == pytest.approx((n * n - 1) / (3 * n), rel=0.05)


def test_points_encoded_in_chunks_equal_a_per_point_reference():
    """BetaVAE features and FactorVAE votes from chunked encoding equal a naive loop that encodes
    each point's observations on their own, drawing from the random stream in the same order."""
    data, sizes, batch, num = TinyFactors(SIZES), SIZES, 5, utils.POINTS_PER_ENCODE * 2 + 7
    rs = np.random.RandomState(4)
    want_x, want_y = [], []
    for _ in range(num):
        index = rs.randint(len(sizes))
        f1, f2 = data.sample_factors(batch, rs), data.sample_factors(batch, rs)
        f2[:, index] = f1[:, index]
        c1 = mixed_representation(data.sample_observations_from_factors(f1, rs))
        c2 = mixed_representation(data.sample_observations_from_factors(f2, rs))
        want_x.append(np.mean(np.abs(c1 - c2), axis=0))
        want_y.append(index)
    x, y = beta_vae._generate_points(data, mixed_representation, len(sizes), batch, num, np.random.RandomState(4), 7)
    np.testing.assert_allclose(x, np.stack(want_x), rtol=1e-12)
    assert y.tolist() == want_y

    variances, active = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0, 1, 3])
    rs = np.random.RandomState(6)
    want = np.zeros((len(sizes), 4), dtype=np.int64)
    for _ in range(num):
        index = rs.randint(len(sizes))
        f = data.sample_factors(batch, rs)
        f[:, index] = f[0, index]
        local = np.var(mixed_representation(data.sample_observations_from_factors(f, rs)), axis=0, ddof=1)
        want[index, active[np.argmin(local[active] / variances[active])]] += 1
    votes = factor_vae._generate_votes(data, mixed_representation, len(sizes), batch, np.random.RandomState(6),
                                       variances, active, 7, num_points=num)
    np.testing.assert_array_equal(votes, want)


def test_factor_vae_prunes_collapsed_codes():
    rep = lambda x: np.concatenate([decode(x), np.zeros((len(x), 1))], axis=1)  # noqa: E731
    scores = compute_factor_vae(TinyFactors([3, 4]), rep, 0, BATCH, 200, 100, 200)
    assert scores["num_active_dims"] == 2 and scores["eval_accuracy"] == 1.0
    dead = compute_factor_vae(TinyFactors([3, 4]), lambda x: np.zeros((len(x), 2)), 0, BATCH,
                              200, 100, 200)
    assert dead == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: compute_mig(TinyFactors([3, 4]), decode, -1), "seed"),
        (lambda: compute_mig(TinyFactors([3, 4]), decode, 0, num_train=0), "num_train"),
        (lambda: compute_mig(TinyFactors([3, 1]), decode, 0), "factors_num_values"),
        (lambda: compute_mig(object(), decode, 0), "GroundTruthData"),
        (lambda: compute_mig(TinyFactors([3, 4]), lambda x: decode(x)[:, 0], 0, 50), r"\(N, D\)"),
        (lambda: compute_mig(TinyFactors([3, 4]), lambda x: decode(x)[:, :1], 0, 50), "codes"),
        (lambda: compute_sap(TinyFactors([3, 4]), lambda x: decode(x) * np.nan, 0, 50),
         "non-finite"),
        (lambda: compute_factor_vae(TinyFactors([3, 4]), decode, 0, batch_size=1), "batch_size"),
        (lambda: compute_beta_vae(TinyFactors([3]), decode, 0), "factors"),
        (lambda: compute_all(TinyFactors([3, 4]), decode, 0, metrics=["fid"]), "metrics"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
