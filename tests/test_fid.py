"""FID and KID: Frechet distance and KID vs independent formulas, streaming statistics and the KID
reference subset, the real torch-fidelity Inception loading path (randomly initialised weights saved
by the test, also fetched from a local HTTP server), end-to-end FID/KID, n/a paths."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from eval_ddp_worker import FakeInception
from fid_weights import save_random_fid_inception
from PIL import Image
from torch_fidelity.metric_fid import fid_statistics_to_metric

from sdn.distributed import derive_seed
from sdn.metrics import fid_stats
from sdn.metrics.fid import (
    NO_WEIGHTS_REASON,
    WEIGHTS_SHA256_PREFIX,
    WEIGHTS_URL,
    FIDResult,
    InceptionWeightsUnavailable,
    InvalidInceptionWeights,
    compute_fid,
    compute_model_fid,
    frechet_distance,
    frechet_distance_with_info,
    iterate_samples,
    kid_from_features,
    load_inception,
    model_sample_fn,
    sample_batches,
    sample_features,
)
from sdn.metrics.fid_stats import (
    FeatureKeeper,
    ReferenceStatistics,
    ReferenceStatisticsUnavailable,
    RunningMoments,
    choose_feature_indices,
    compute_reference,
    iterate_image_batches,
    load_reference_statistics,
    save_reference_statistics,
    save_unavailable_reference,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- independent reference formulas
def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (clipping round-off negatives)."""
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def fid_symmetric(mu1, s1, mu2, s2) -> float:
    """FID with Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a similarity-invariant PSD form."""
    r1 = psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr)


def fid_scipy_direct(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy.linalg.sqrtm on the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1 + s2 - 2 * covmean))


def fid_from_features_nuclear(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact FID from feature rows: Tr((S1 S2)^1/2) is the nuclear norm of A B^T with S = A^T A."""
    a = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    tr = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + np.sum(a * a) + np.sum(b * b) - 2 * tr)


def naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair (float64)."""
    m, d = len(x), x.shape[1]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


def random_gaussian(rng: np.random.Generator, dim: int, rank: int | None = None):
    rank = dim if rank is None else rank
    a = rng.normal(size=(dim, rank))
    sigma = a @ a.T / rank + (0.1 * np.eye(dim) if rank == dim else 0.0)
    return rng.normal(size=dim), sigma


# ---------------------------------------------------------------- Frechet distance
def test_frechet_matches_direct_scipy_and_torch_fidelity():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 32):
        mu1, s1 = random_gaussian(rng, dim)
        mu2, s2 = random_gaussian(rng, dim)
        value, offset = frechet_distance_with_info(mu1, s1, mu2, s2)
        assert not offset
        assert value == pytest.approx(fid_scipy_direct(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert value == pytest.approx(fid_symmetric(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
        tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
        assert value == pytest.approx(tf["frechet_inception_distance"], rel=1e-8, abs=1e-9)


def test_frechet_closed_form_diagonal():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # 1-d scalars are accepted and give the same closed form
    assert frechet_distance(mu1[:1], a[:1, None], mu2[:1], b[:1, None]) == pytest.approx(
        (mu1[0] - mu2[0]) ** 2 + (np.sqrt(a[0]) - np.sqrt(b[0])) ** 2, rel=1e-12
    )


def test_frechet_zero_symmetric_nonnegative_deterministic():
    rng = np.random.default_rng(2)
    for _ in range(5):
        mu1, s1 = random_gaussian(rng, 12)
        mu2, s2 = random_gaussian(rng, 12)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
        ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
        assert ab == pytest.approx(ba, rel=1e-9)
        assert ab > 0
        assert frechet_distance(mu1, s1, mu2, s2) == ab  # bit-identical on a repeat call


def test_frechet_singular_covariances_use_eps_offset():
    rng = np.random.default_rng(3)
    dim, n = 48, 10  # fewer samples than dimensions: rank-deficient covariances
    f1, f2 = rng.normal(size=(n, dim)), rng.normal(1.0, 2.0, size=(n, dim))
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    assert np.linalg.matrix_rank(s1) < dim
    eps = 1e-6
    value, offset = frechet_distance_with_info(mu1, s1, mu2, s2, eps=eps)
    assert offset and np.isfinite(value)
    off = eps * np.eye(dim)
    # pytorch-fid convention: the offset enters only the square-root term, not Tr(S1) + Tr(S2)
    assert value == pytest.approx(fid_symmetric(mu1, s1 + off, mu2, s2 + off) - 2 * dim * eps, rel=1e-8)
    # the offset perturbs the exact (offset-free) value only slightly
    assert value == pytest.approx(fid_from_features_nuclear(f1, f2), rel=1e-3)
    self_value, self_offset = frechet_distance_with_info(mu1, s1, mu1, s1, eps=eps)
    assert self_offset and abs(self_value) < 1e-4
    # degenerate: a zero covariance (all samples equal) still gives a finite, exact-ish value
    zero = np.zeros((dim, dim))
    expected = np.sum((mu1 - mu2) ** 2) - 2 * dim * eps  # Tr((eps I)^2)^1/2 = dim * eps
    assert frechet_distance(mu1, zero, mu2, zero, eps=eps) == pytest.approx(expected, rel=1e-12)


def test_frechet_rejects_bad_input():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, np.eye(2), mu, s)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, np.full((3, 3), np.nan), mu, s)
    with pytest.raises(ValueError, match="imaginary"):  # not a covariance: sqrt of -1 on the diagonal
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- KID
def test_kid_matches_naive_unbiased_mmd_with_cubic_kernel():
    rng = np.random.default_rng(20)
    for m, d in ((7, 3), (12, 16)):
        x, y = rng.normal(size=(m, d)), rng.normal(0.3, 1.5, size=(m, d))
        mean, std = kid_from_features(x, y, subsets=1, subset_size=m, seed=0)  # one subset: the whole set
        assert mean == pytest.approx(naive_kid(x, y), rel=1e-10, abs=1e-12) and std == 0.0
        # every subset of the whole set is a permutation of it: same value, zero spread
        mean5, std5 = kid_from_features(x, y, subsets=5, subset_size=m, seed=3)
        assert mean5 == pytest.approx(mean, rel=1e-10) and std5 == pytest.approx(0.0, abs=1e-10)
    assert kid_from_features(x, x, 1, len(x), 0)[0] != 0.0  # unbiased: XY includes i == j pairs


def test_kid_subsets_are_seeded_and_averaged():
    rng = np.random.default_rng(21)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(25, 4))
    mean, std = kid_from_features(x, y, subsets=4, subset_size=10, seed=7)
    assert (mean, std) == kid_from_features(x, y, subsets=4, subset_size=10, seed=7)
    assert mean != kid_from_features(x, y, subsets=4, subset_size=10, seed=8)[0]
    draw = np.random.RandomState(7)  # torch-fidelity's draws: x subset then y subset, per subset
    values = []
    for _ in range(4):
        xi, yi = draw.choice(30, 10, replace=False), draw.choice(25, 10, replace=False)
        values.append(naive_kid(x[xi], y[yi]))
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_rejects_bad_arguments():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(x, x, 1, 1, 0)
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(x, x, 0, 2, 0)
    with pytest.raises(ValueError, match="features_2"):
        kid_from_features(x, np.zeros((3, 3)), 1, 4, 0)
    with pytest.raises(ValueError, match="dimensions"):
        kid_from_features(x, np.zeros((5, 2)), 1, 4, 0)


def test_feature_keeper_and_seeded_subset():
    rows = np.arange(40, dtype=np.float64).reshape(10, 4)
    indices = choose_feature_indices(10, 4, seed=5)
    expected = np.sort(np.random.default_rng(5).choice(10, size=4, replace=False))
    assert np.array_equal(indices, expected)
    keep = FeatureKeeper(indices)
    for start, stop in ((0, 3), (3, 3), (3, 9), (9, 10)):
        keep.add(rows[start:stop])
    assert np.array_equal(keep.features(), rows[indices].astype(np.float32))
    everything = FeatureKeeper()
    everything.add(rows[:6])
    everything.add(rows[6:])
    assert np.array_equal(everything.features(), rows.astype(np.float32))
    assert len(choose_feature_indices(3, 10, 0)) == 3  # capped by the images there are
    short = FeatureKeeper(np.array([1, 8]))
    short.add(rows[:5])
    with pytest.raises(ValueError, match="2 chosen images"):
        short.features()


# ---------------------------------------------------------------- statistics and their file
def test_running_moments_match_numpy_cov():
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(37, 5)) * [1, 2, 3, 4, 5] + 1e4  # large offset: needs a stable update
    moments = RunningMoments(5)
    for start, stop in ((0, 1), (1, 8), (8, 8), (8, 30), (30, 37)):
        moments.update(rows[start:stop])
    assert moments.count == 37
    np.testing.assert_allclose(moments.mean, rows.mean(0), rtol=1e-13)
    np.testing.assert_allclose(moments.covariance(), np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        moments.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        RunningMoments(3).covariance()


def test_image_batches_accept_tensor_dataset_iterable_and_grayscale():
    gen = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=gen)
    batches, total = iterate_image_batches(gray, batch_size=2)
    out = torch.cat(list(batches))
    assert total == 5 and out.shape == (5, 3, 4, 4)
    for c in range(3):
        assert torch.equal(out[:, c], gray[:, 0])
    dataset = torch.utils.data.TensorDataset(gray, torch.zeros(5, 0, dtype=torch.int64))
    batches, total = iterate_image_batches(dataset, batch_size=2, max_images=3)
    assert total == 3 and torch.equal(torch.cat(list(batches)), out[:3])
    batches, total = iterate_image_batches(iter([gray[:3], gray[3:]]), batch_size=2, max_images=4)
    assert total is None and torch.equal(torch.cat(list(batches)), out[:4])
    with pytest.raises(ValueError, match="uint8"):
        list(iterate_image_batches(gray.float(), batch_size=2)[0])
    with pytest.raises(ValueError, match="batch_size"):
        iterate_image_batches(gray, batch_size=0)


def _stats(dim: int, mu=None, sigma=None) -> ReferenceStatistics:
    rng = np.random.default_rng(5)
    mu = rng.normal(size=dim) if mu is None else mu
    sigma = np.cov(rng.normal(size=(dim + 3, dim)), rowvar=False) if sigma is None else sigma
    return ReferenceStatistics(mu, sigma, "toy", "train", 7, "torch-fidelity", "0.4.0", "2048")


def test_reference_statistics_roundtrip_and_rejections(tmp_path):
    stats = _stats(6)
    path = save_reference_statistics(tmp_path / "ref.npz", stats)
    assert path == tmp_path / "ref.npz" and path.is_file()
    loaded = load_reference_statistics(path, expected_dim=6)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert (loaded.dataset, loaded.split, loaded.num_images) == ("toy", "train", 7)
    assert (loaded.implementation, loaded.version, loaded.feature_layer) == ("torch-fidelity", "0.4.0", "2048")
    assert loaded.describe() == "toy/train (7 images)"

    with pytest.raises(ValueError, match="2048-d"):  # default expects Inception pool3 statistics
        load_reference_statistics(path)
    bad = tmp_path / "bad_shape.npz"
    with open(bad, "wb") as handle:  # hand-written file with inconsistent shapes
        np.savez(handle, mu=np.zeros(4), sigma=np.eye(3), dataset="t", split="s", num_images=1,
                 implementation="torch-fidelity", version="0.4.0", feature_layer="2048")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*shape"):
        load_reference_statistics(bad, expected_dim=None)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(6).bytes(256))
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        load_reference_statistics(junk)
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(tmp_path / "missing.npz")
    marker = save_unavailable_reference(tmp_path / "na.npz", "toy", "train", NO_WEIGHTS_REASON)
    with pytest.raises(ReferenceStatisticsUnavailable, match="fid.weights_path"):
        load_reference_statistics(marker)


def test_reference_kid_features_roundtrip_and_rejections(tmp_path):
    rng = np.random.default_rng(8)
    base = _stats(6)
    features, indices = rng.normal(size=(3, 6)).astype(np.float32), np.array([0, 4, 6])
    stats = ReferenceStatistics(base.mu, base.sigma, "toy", "train", 7, "torch-fidelity", "0.4.0", "2048",
                                features, indices, 3)
    loaded = load_reference_statistics(save_reference_statistics(tmp_path / "ref.npz", stats), expected_dim=6)
    assert np.array_equal(loaded.features, features) and loaded.features.dtype == np.float32
    assert np.array_equal(loaded.feature_indices, indices) and loaded.features_seed == 3
    assert loaded.describe_features() == "toy/train (3 of 7 images, seed 3)"
    assert load_reference_statistics(save_reference_statistics(tmp_path / "old.npz", base), 6).features is None
    for bad_features, bad_indices, match in ((features[:, :5], indices, "KID features"),
                                             (features, np.array([0, 4, 7]), "indices"),
                                             (features, np.array([4, 0, 6]), "sorted"),
                                             (np.full((3, 6), np.nan, np.float32), indices, "NaN")):
        bad = ReferenceStatistics(base.mu, base.sigma, "toy", "train", 7, "torch-fidelity", "0.4.0", "2048",
                                  bad_features, bad_indices, 0)
        with pytest.raises(ValueError, match=match):
            save_reference_statistics(tmp_path / "bad.npz", bad)


# ---------------------------------------------------------------- sampling helpers
class _ToyModel(torch.nn.Module):
    """Records its calls; samples uniform uint8 noise from the given generator."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, num, temperature=1.0, generator=None):
        self.calls.append((num, temperature, self.training))
        return torch.randint(0, 256, (num, 1, 8, 8), dtype=torch.uint8, generator=generator)


def test_model_sample_fn_seeds_each_batch_by_its_index_and_passes_temperature():
    model = _ToyModel().train()
    a = model_sample_fn(model, temperature=0.7, seed=3)
    second = a(1, 4)
    assert model.calls[0] == (4, 0.7, False) and model.training  # sampled in eval mode, mode restored
    first = model_sample_fn(model, temperature=0.7, seed=3)(0, 4)
    assert torch.equal(a(1, 4), second) and not torch.equal(first, second)  # batch j: (seed, j) only
    want = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(derive_seed(3, 1)))
    assert torch.equal(second, want)
    assert not torch.equal(model_sample_fn(model, temperature=0.7, seed=4)(1, 4), second)
    batches = list(iterate_samples(a, 10, 4))
    assert [(start, x.shape[0]) for start, x in batches] == [(0, 4), (4, 4), (8, 2)]
    assert torch.equal(batches[1][1], second)
    with pytest.raises(ValueError, match="uint8"):
        list(iterate_samples(lambda j, n: torch.zeros(n, 3, 4, 4), 3, 2))
    with pytest.raises(ValueError, match=r"\(2, C, H, W\)"):
        list(iterate_samples(lambda j, n: torch.zeros(n + 1, 3, 4, 4, dtype=torch.uint8), 2, 2))


@pytest.mark.parametrize("num,batch", [(10, 4), (7, 1), (3, 5), (12, 3)])
def test_sample_batches_of_the_ranks_cover_every_sample_once(num, batch):
    whole = sample_batches(num, batch)
    assert [j for j, _, _ in whole] == list(range(len(whole)))
    assert [i for _, start, n in whole for i in range(start, start + n)] == list(range(num))
    for world in (1, 2, 3, 4):
        shares = [sample_batches(num, batch, rank, world) for rank in range(world)]
        assert sorted(b for share in shares for b in share) == whole  # disjoint, complete, same batches
        assert all(j % world == rank for rank, share in enumerate(shares) for j, _, _ in share)


def _toy_batches(index, num):
    """Sample batch j of a toy sampler: grayscale 8x8 noise seeded by j."""
    return torch.randint(0, 256, (num, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))


def test_sample_features_are_the_extractors_features_in_sample_order():
    extractor = FakeInception()
    features, grid = sample_features(_toy_batches, extractor, num_samples=7, sample_batch_size=3, batch_size=2,
                                     device="cpu", progress=False, grid_size=5)
    samples = torch.cat([_toy_batches(j, n) for j, _, n in sample_batches(7, 3)])
    (direct,) = extractor(samples.expand(-1, 3, -1, -1))  # all at once, grayscale as RGB
    assert features.dtype == np.float32 and features.shape == (7, 2048)
    np.testing.assert_allclose(features, direct.numpy(), rtol=1e-5, atol=1e-5)  # other matmul batching
    assert torch.equal(grid, samples[:5])
    assert len(extractor.settings) == 5 + 1  # sample batches 3, 3, 1 in Inception batches of <= 2; the direct call
    assert sample_features(_toy_batches, extractor, num_samples=2, sample_batch_size=2, batch_size=2,
                           device="cpu", progress=False)[1] is None  # no grid asked


@pytest.fixture
def tf32_settings():
    """Puts torch's TF32 switches back as they were after the test."""
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [switch.fp32_precision for switch in switches]
    yield
    for switch, value in zip(switches, saved):
        switch.fp32_precision = value


@pytest.mark.parametrize("api", ["current", "legacy"])
def test_inception_runs_with_tf32_off_and_the_settings_are_restored(tf32_settings, api):
    """Whatever the caller enabled (torch's current fp32_precision switches or the legacy allow_tf32
    flags), reference statistics and sample features are extracted in full float32 and the caller's
    settings are back afterwards."""
    if api == "current":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    extractor = FakeInception()
    compute_reference(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), extractor, batch_size=2, progress=False)
    sample_features(_toy_batches, extractor, num_samples=3, sample_batch_size=2, batch_size=2, device="cpu",
                    progress=False)
    assert extractor.settings == [("ieee", "ieee")] * 4  # 2 reference batches, 2 sample batches
    if api == "current":
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    else:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="inside"):
        with fid_stats.tf32_disabled():
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored after an error too


# ---------------------------------------------------------------- the real Inception loading path
@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt by torch-fidelity to fetch weights fails the test (there is no network)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download Inception weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A randomly initialised torch-fidelity FID-Inception saved as a state dict (built offline)."""
    return save_random_fid_inception(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def extractor(weights_file):
    return load_inception(weights_file, "cpu")


def test_load_inception_accepts_saved_weights(weights_file, extractor):
    saved = torch.load(weights_file, weights_only=True)
    loaded = extractor.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert not extractor.training and extractor.features_list == ["2048"]


def test_load_inception_rejects_bad_files(tmp_path, weights_file):
    with pytest.raises(InceptionWeightsUnavailable, match="fid.weights_path"):
        load_inception(None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(InceptionWeightsUnavailable, match=re.escape(str(missing))):
        load_inception(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(InvalidInceptionWeights, match=re.escape(str(corrupt))):
        load_inception(corrupt)
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong)
    with pytest.raises(InvalidInceptionWeights, match=f"(?s){re.escape(str(wrong))}.*size mismatch"):
        load_inception(wrong)


# ---------------------------------------------------------------- end to end
NUM_IMAGES, BATCH = 6, 3  # Inception at 299x299 costs ~0.5 s per image on these CPUs
EPS = 1e-6


class _TinyDataset(torch.utils.data.Dataset):
    """Six smooth RGB 32x32 images, items (image uint8 (3, H, W), empty factors) as in the data contract."""

    def __init__(self):
        gen = torch.Generator().manual_seed(11)
        base = torch.randint(0, 256, (NUM_IMAGES, 3, 4, 4), generator=gen).float()
        self.images = torch.nn.functional.interpolate(base, size=32, mode="bilinear").round().to(torch.uint8)

    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, i):
        return self.images[i], torch.zeros(0, dtype=torch.int64)


def _recording(captured: list, real=fid_stats.inception_features):
    """A stand-in for ``inception_features`` that records every feature batch the library computes."""

    def spy(extractor, batch, device):
        features = real(extractor, batch, device)
        captured.append(features)
        return features

    return spy


@pytest.fixture
def feature_spy(monkeypatch):
    captured: list[np.ndarray] = []
    monkeypatch.setattr(fid_stats, "inception_features", _recording(captured))
    return captured


@pytest.fixture(scope="module")
def reference(extractor):
    """Reference statistics (and every image's KID features) of the tiny dataset, plus the features
    they were computed from."""
    dataset = _TinyDataset()
    captured: list[np.ndarray] = []
    with mock.patch.object(fid_stats, "inception_features", _recording(captured)):
        mu, sigma, features, indices = compute_reference(dataset, extractor, batch_size=BATCH, progress=False,
                                                         num_features=NUM_IMAGES, seed=0)
    version = torch_fidelity.__version__
    stats = ReferenceStatistics(mu, sigma, "tiny", "train", NUM_IMAGES, "torch-fidelity", version, "2048",
                                features, indices, 0)
    return dataset, stats, np.concatenate(captured)


@pytest.mark.slow  # Inception-v3 forward passes at 299x299 and a 2048x2048 sqrtm
def test_reference_statistics_match_direct_features(reference, extractor):
    dataset, stats, features = reference
    assert features.shape == (NUM_IMAGES, 2048) and features.std() > 1e-3  # random net: varied features
    with torch.inference_mode():
        (direct,) = extractor(dataset.images[:2])  # straight through torch-fidelity, no library code
    np.testing.assert_allclose(features[:2], direct.double().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-15)
    assert np.array_equal(stats.features, features.astype(np.float32))  # every image kept, in order
    assert np.array_equal(stats.feature_indices, np.arange(NUM_IMAGES))


@pytest.mark.slow  # Inception-v3 forward passes at 299x299
def test_reference_kid_subset_is_the_seeded_images_features(reference, extractor):
    dataset, stats, features = reference
    mu, sigma, subset, indices = compute_reference(dataset, extractor, batch_size=4, progress=False,
                                                   num_features=4, seed=9)
    assert np.array_equal(indices, np.sort(np.random.default_rng(9).choice(NUM_IMAGES, 4, replace=False)))
    np.testing.assert_allclose(subset, features[indices], rtol=1e-5, atol=1e-6)  # other batching, same images
    np.testing.assert_allclose(mu, stats.mu, rtol=1e-5, atol=1e-6)
    mu_only, sigma_only, none, no_indices = compute_reference(dataset, extractor, batch_size=4, progress=False)
    assert none is None and no_indices is None  # num_features=0: statistics only
    assert np.array_equal(mu_only, mu) and np.array_equal(sigma_only, sigma)  # same pass without features


@pytest.mark.slow  # Inception-v3 forward passes at 299x299 and a 2048x2048 sqrtm
def test_fid_of_dataset_against_itself_is_zero(reference, weights_file):
    dataset, stats, _ = reference
    def replay(index, num):  # a "model" whose sample batch j is reference images [2j, 2j + num)
        return dataset.images[2 * index : 2 * index + num]

    result = compute_fid(replay, stats, weights_file, num_samples=NUM_IMAGES, batch_size=BATCH, sample_batch_size=2,
                         eps=EPS, progress=False)
    assert result.available and result.reason is None and result.eps_offset_used  # N < 2048: singular
    # pytorch-fid's offset enters only the sqrtm term: exactly 0 becomes -2 * 2048 * eps
    assert result.value == pytest.approx(-2 * 2048 * EPS, abs=1e-7)
    record = result.to_dict()
    assert record["implementation"] == "torch-fidelity" and record["version"] == torch_fidelity.__version__
    assert record["feature_layer"] == "2048" and "299" in record["resize"]
    assert record["num_samples"] == NUM_IMAGES and record["reference"] == f"tiny/train ({NUM_IMAGES} images)"
    # KID of the dataset against itself: the unbiased estimator of identical sets (subsets capped at 6)
    assert result.kid_available and result.kid_subset_size == NUM_IMAGES and result.kid_subset_size_requested == 1000
    assert result.kid_mean == pytest.approx(naive_kid(stats.features, stats.features), rel=1e-4, abs=1e-7)
    assert record["kid_reference"] == f"tiny/train ({NUM_IMAGES} of {NUM_IMAGES} images, seed 0)"


@pytest.mark.slow  # Inception-v3 forward passes at 299x299 and a 2048x2048 sqrtm
def test_fid_of_random_model_equals_direct_formula(reference, weights_file, tmp_path, feature_spy):
    _, stats, ref_features = reference
    model = _ToyModel()  # grayscale 8x8 noise: also exercises the 1 -> 3 channel path
    result = compute_model_fid(model, stats, weights_file, temperature=0.5, seed=0, num_samples=NUM_IMAGES,
                               batch_size=BATCH, grid_path=tmp_path / "grid.png", eps=EPS, progress=False)
    feats = np.concatenate(feature_spy)
    assert feats.shape == (NUM_IMAGES, 2048) and result.temperature == 0.5
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    off = EPS * np.eye(2048)
    expected = fid_symmetric(mu, sigma + off, stats.mu, stats.sigma + off) - 2 * 2048 * EPS  # offset convention
    assert result.eps_offset_used and result.value == pytest.approx(expected, rel=1e-7)
    exact = fid_from_features_nuclear(feats, ref_features)  # no offset at all
    assert result.value == pytest.approx(exact, rel=0.05) and exact > 0.1 * np.trace(stats.sigma)
    # KID: every subset is the whole set (6 of 6), so it equals the naive estimate on all features
    expected_kid = naive_kid(feats, ref_features)
    assert result.kid_available and result.kid_subsets == 100 and result.kid_seed == 0
    assert result.kid_mean == pytest.approx(expected_kid, rel=1e-4) and result.kid_std < 1e-4 * abs(expected_kid) + 1e-9
    assert expected_kid > 0
    with Image.open(tmp_path / "grid.png") as grid:  # make_grid: 8 per row, padding 2
        assert grid.size == (NUM_IMAGES * (8 + 2) + 2, 8 + 2 + 2)


def test_fid_offline_is_not_available(tmp_path, weights_file):
    def never(index, num):
        raise AssertionError("no samples should be drawn without weights")

    ref = save_reference_statistics(tmp_path / "ref.npz", _stats(2048, mu=np.zeros(2048), sigma=np.eye(2048)))
    result = compute_fid(never, ref, None, num_samples=10)
    assert (result.value, result.available, result.reason) == (None, False, NO_WEIGHTS_REASON)
    assert result.to_dict()["num_samples"] == 10 and isinstance(result, FIDResult)
    absent = tmp_path / "absent.pth"
    result = compute_fid(never, ref, absent, num_samples=10)
    assert not result.available and result.reason.startswith(f"no network: {absent} not found")
    assert not result.kid_available and result.kid_reason == result.reason and result.kid_mean is None
    with pytest.raises(InceptionWeightsUnavailable):
        compute_fid(never, ref, None, num_samples=10, required=True)
    marker = save_unavailable_reference(tmp_path / "na.npz", "tiny", "train", NO_WEIGHTS_REASON)
    result = compute_fid(never, marker, weights_file, num_samples=10)
    assert not result.available and result.reason == NO_WEIGHTS_REASON


def test_compute_fid_rejects_bad_arguments_and_mismatched_reference(weights_file):
    def never(index, num):
        raise AssertionError("no samples should be drawn")

    with pytest.raises(ValueError, match="num_samples"):
        compute_fid(never, _stats(2048), weights_file, num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        compute_fid(never, _stats(2048), weights_file, batch_size=0)
    with pytest.raises(ValueError, match="sample_batch_size"):
        compute_fid(never, _stats(2048), weights_file, sample_batch_size=0)
    with pytest.raises(ValueError, match="2048-d"):
        compute_fid(never, _stats(6), weights_file, num_samples=4)
    other = ReferenceStatistics(np.zeros(2048), np.eye(2048), "toy", "train", 7, "clean-fid", "0.1", "2048")
    with pytest.raises(ValueError, match="clean-fid"):
        compute_fid(never, other, weights_file, num_samples=4)


def test_fid_stats_pipeline_offline_writes_marker(tmp_path):
    namespace = runpy.run_path(str(REPO / "pipelines" / "fid_stats.py"), run_name="fid_stats_test")
    out = tmp_path / "stats" / "ref.npz"
    namespace["main"](["--dataset", "tiny", "--split", "train", "--out", str(out), "--weights-path", ""])
    with pytest.raises(ReferenceStatisticsUnavailable, match="fid.weights_path"):
        load_reference_statistics(out)
    missing = tmp_path / "data/raw/fid/weights-inception-2015-12-05-6726825d.pth"  # the embedded study's case
    namespace["main"](["--dataset", "tiny", "--split", "train", "--out", str(out), "--weights-path", str(missing)])
    with pytest.raises(ReferenceStatisticsUnavailable, match=f"^no network: {re.escape(str(missing))} not found"):
        load_reference_statistics(out)


@pytest.mark.slow  # Inception-v3 forward passes at 299x299
def test_kid_is_na_with_a_reference_without_features(reference, weights_file):
    dataset, stats, _ = reference
    old = ReferenceStatistics(stats.mu, stats.sigma, "tiny", "train", NUM_IMAGES, "torch-fidelity",
                              stats.version, "2048")  # a format-1 file: no KID features
    result = compute_fid(lambda j, n: dataset.images[:n], old, weights_file, num_samples=2, batch_size=2, progress=False)
    assert result.available and not result.kid_available and result.kid_mean is None
    assert "no KID features" in result.kid_reason


def test_weights_constants_are_torch_fidelitys_and_follow_torch_hub_naming():
    """The URL is the one torch-fidelity downloads; its '-6726825d' suffix is what torch.hub's
    check_hash would compare with the file's sha256 (torch.hub.HASH_REGEX)."""
    from torch.hub import HASH_REGEX

    assert WEIGHTS_URL == tf_inception.URL_INCEPTION_V3
    assert HASH_REGEX.search(WEIGHTS_URL.rsplit("/", 1)[1]).group(1) == WEIGHTS_SHA256_PREFIX
    import yaml

    for name in ("params.yaml", "params-paper.yaml"):
        fid = yaml.safe_load((REPO / name).read_text())["fid"]
        assert fid["weights"]["url"] == WEIGHTS_URL and fid["weights"]["sha256_prefix"] == WEIGHTS_SHA256_PREFIX
        assert Path(fid["weights_path"]).name == WEIGHTS_URL.rsplit("/", 1)[1]


def test_downloaded_weights_load(weights_file, tmp_path, monkeypatch):
    """The download stage fetches a torch.hub-named file from a local server, checks its sha256
    prefix, and the result is what the FID stages load."""
    import hashlib
    import shutil

    import yaml
    from fixtures_data import serve, url

    from pipelines.download import main

    prefix = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:8]
    www = tmp_path / "www"
    www.mkdir()
    name = f"weights-inception-2015-12-05-{prefix}.pth"
    shutil.copy(weights_file, www / name)
    dest = tmp_path / "data/raw/fid" / name
    with serve(www) as server:
        params = {"fid": {"weights_path": str(dest), "weights": {"url": url(server, "ok", name),
                                                                 "sha256_prefix": prefix, "sha256": None}}}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
        assert main(["--fid-weights", "--params", str(tmp_path / "p.yaml"), "--quiet"]) == 0
    loaded = load_inception(dest).state_dict()
    saved = torch.load(weights_file, weights_only=True)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


# ---------------------------------------------------------------- the weights stage in the DVC pipeline
@pytest.mark.slow  # two `dvc` resolutions of the whole pipeline
@pytest.mark.parametrize("profile", ["params.yaml", "params-paper.yaml"])
def test_download_fid_weights_stage_only_in_the_paper_profile(tmp_path, profile):
    """Paper: download_fid_weights@inception outputs fid.weights_path and every fid_stats stage runs
    after it. Embedded: no such stage (no network), and fid_stats still resolves."""
    import shutil
    import subprocess

    import yaml

    dvc = Path(shutil.which("dvc") or REPO / ".venv" / "bin" / "dvc")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / profile, tmp_path / "params.yaml")
    env = {"DVC_NO_ANALYTICS": "1", "PATH": f"{dvc.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True, env=env)
    out = subprocess.run([str(dvc), "stage", "list"], cwd=tmp_path, check=True, env=env,
                         capture_output=True, text=True).stdout
    stages = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    params = yaml.safe_load((REPO / profile).read_text())
    downloads = {f"download_fid_weights@{x}" for x in params["study"]["fid_downloads"]}
    assert {name for name in stages if name.startswith("download_fid_weights")} == downloads
    fid_stats = {f"fid_stats@{d}" for d in params["study"]["density"]["datasets"]}
    assert fid_stats <= set(stages)
    if profile == "params-paper.yaml":
        assert downloads == {"download_fid_weights@inception"}
        assert params["fid"]["weights_path"] in stages["download_fid_weights@inception"]
        dag = subprocess.run([str(dvc), "dag", "--dot"], cwd=tmp_path, check=True, env=env,
                             capture_output=True, text=True).stdout
        for stage in fid_stats:
            assert f'"download_fid_weights@inception" -> "{stage}"' in dag
    else:
        assert not downloads and params["fid"]["weights_path"]  # a path that is used when present


def _study_error(edit) -> str:
    import copy

    import yaml

    from pipelines.study import StudyError, validate

    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    edit(params)
    with pytest.raises(StudyError) as info:
        validate(params)
    return str(info.value)


def test_fid_params_are_validated_naming_the_key():
    assert "missing key fid.kid.seed" in _study_error(lambda p: p["fid"]["kid"].pop("seed"))
    assert "fid.weights.sha256_prefix" in _study_error(lambda p: p["fid"]["weights"].update(sha256_prefix="xyz"))
    assert "fid.weights.sha256" in _study_error(lambda p: p["fid"]["weights"].update(sha256="ab" * 10))
    assert "fid.weights.url" in _study_error(lambda p: p["fid"]["weights"].update(url="ftp://x/y.pth"))
    assert "fid.kid.subset_size" in _study_error(lambda p: p["fid"]["kid"].update(subset_size=1))
    assert "study.fid_downloads" in _study_error(lambda p: p["study"].update(fid_downloads=["vgg"]))
    msg = _study_error(lambda p: p["study"].update(fid_downloads=["inception"]))  # embedded's dep is the script
    assert "fid.weights.dvc_dep" in msg

    def elsewhere(p):
        p["study"]["fid_downloads"] = ["inception"]
        p["fid"].update(weights_path="/tmp/w.pth")
        p["fid"]["weights"]["dvc_dep"] = "/tmp/w.pth"

    assert "data/raw/fid/" in _study_error(elsewhere)

    def unpinned(p):
        p["study"]["fid_downloads"] = ["inception"]
        p["fid"]["weights"].update(sha256_prefix=None, sha256=None, dvc_dep=p["fid"]["weights_path"])

    assert "sha256_prefix" in _study_error(unpinned)


def test_report_fid_table_has_kid_and_reasons_instead_of_zero_seeds():
    from pipelines.reporting.density import fid_rows as _fid_rows

    def rec(model, seed, fid):
        return {"family": "density", "dataset": "d", "model": model, "seed": seed, "fid": fid}

    ok = {"available": True, "value": 10.0, "kid_available": True, "kid_mean": 0.002, "kid_std": 0.0001,
          "implementation": "torch-fidelity", "version": "0.4.0", "num_samples": 8, "reference": "d/train (16 images)",
          "kid_subsets": 100, "kid_subset_size": 8, "kid_reference": "d/train (16 of 16 images, seed 0)"}
    na = {"available": False, "value": None, "reason": "no network: w.pth not found", "kid_available": False,
          "kid_reason": "no network: w.pth not found", "implementation": "torch-fidelity", "version": "0.4.0"}
    records = [rec("a", 0, ok), rec("a", 1, {**ok, "value": 12.0, "kid_mean": 0.004}),
               rec("b", 0, na), rec("b", 1, na), rec("c", 0, ok), rec("c", 1, na)]
    rows = {r["model"]: r for r in _fid_rows(records)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a["fid_mean"] == pytest.approx(11.0) and a["kid_mean"] == pytest.approx(0.003) and a["seeds_shown"] == "2"
    assert a["kid_x1000"].startswith("3.000 ± 1.414") and a["kid_subsets"] == "100 x 8"
    assert a["kid_reference"] == "d/train (16 of 16 images, seed 0)" and a["reason"] is None
    assert b["seeds"] == 0 and b["seeds_shown"] == "n/a (no network: w.pth not found)"  # never "0"
    assert b["fid"] == "n/a" and b["kid_x1000"] == "n/a" and b["reason"] == "no network: w.pth not found"
    assert c["seeds_shown"] == "1 of 2 (n/a (no network: w.pth not found))"
