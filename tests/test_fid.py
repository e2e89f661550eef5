"""FID: Frechet distance vs independent formulas, streaming statistics, the real torch-fidelity
Inception loading path (randomly initialised weights saved by the test), end-to-end FID, n/a path."""

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
from fid_weights import save_random_fid_inception
from PIL import Image
from torch_fidelity.metric_fid import fid_statistics_to_metric

from sdn.metrics import fid_stats
from sdn.metrics.fid import (
    NO_WEIGHTS_REASON,
    FIDResult,
    InceptionWeightsUnavailable,
    InvalidInceptionWeights,
    compute_fid,
    compute_model_fid,
    frechet_distance,
    frechet_distance_with_info,
    iterate_samples,
    load_inception,
    model_sample_fn,
)
from sdn.metrics.fid_stats import (
    ReferenceStatistics,
    ReferenceStatisticsUnavailable,
    RunningMoments,
    compute_reference_statistics,
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


# ---------------------------------------------------------------- sampling helpers
class _ToyModel(torch.nn.Module):
    """Records its calls; samples uniform uint8 noise from the given generator."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, num, temperature=1.0, generator=None):
        self.calls.append((num, temperature, self.training))
        return torch.randint(0, 256, (num, 1, 8, 8), dtype=torch.uint8, generator=generator)


def test_model_sample_fn_is_seeded_and_passes_temperature():
    model = _ToyModel().train()
    a = model_sample_fn(model, temperature=0.7, seed=3)
    b = model_sample_fn(model, temperature=0.7, seed=3)
    first = a(4)
    assert torch.equal(first, b(4)) and not torch.equal(first, a(4))
    assert model.calls[0] == (4, 0.7, False) and model.training  # sampled in eval mode, mode restored
    batches = list(iterate_samples(a, 10, 4))
    assert [x.shape[0] for x in batches] == [4, 4, 2]
    with pytest.raises(ValueError, match="uint8"):
        list(iterate_samples(lambda n: torch.zeros(n, 3, 4, 4), 3, 2))
    with pytest.raises(ValueError, match=r"\(2, C, H, W\)"):
        list(iterate_samples(lambda n: torch.zeros(n + 1, 3, 4, 4, dtype=torch.uint8), 2, 2))


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
    """Reference statistics of the tiny dataset, plus the features they were computed from."""
    dataset = _TinyDataset()
    captured: list[np.ndarray] = []
    with mock.patch.object(fid_stats, "inception_features", _recording(captured)):
        mu, sigma = compute_reference_statistics(dataset, extractor, batch_size=BATCH, progress=False)
    version = torch_fidelity.__version__
    stats = ReferenceStatistics(mu, sigma, "tiny", "train", NUM_IMAGES, "torch-fidelity", version, "2048")
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


@pytest.mark.slow  # Inception-v3 forward passes at 299x299 and a 2048x2048 sqrtm
def test_fid_of_dataset_against_itself_is_zero(reference, weights_file):
    dataset, stats, _ = reference
    position = [0]

    def replay(num):  # a "model" whose samples are the reference images, in order
        out = dataset.images[position[0] : position[0] + num]
        position[0] += num
        return out

    result = compute_fid(replay, stats, weights_file, num_samples=NUM_IMAGES, batch_size=BATCH, eps=EPS,
                         progress=False)
    assert result.available and result.reason is None and result.eps_offset_used  # N < 2048: singular
    # pytorch-fid's offset enters only the sqrtm term: exactly 0 becomes -2 * 2048 * eps
    assert result.value == pytest.approx(-2 * 2048 * EPS, abs=1e-7)
    record = result.to_dict()
    assert record["implementation"] == "torch-fidelity" and record["version"] == torch_fidelity.__version__
    assert record["feature_layer"] == "2048" and "299" in record["resize"]
    assert record["num_samples"] == NUM_IMAGES and record["reference"] == f"tiny/train ({NUM_IMAGES} images)"


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
    with Image.open(tmp_path / "grid.png") as grid:  # make_grid: 8 per row, padding 2
        assert grid.size == (NUM_IMAGES * (8 + 2) + 2, 8 + 2 + 2)


def test_fid_offline_is_not_available(tmp_path, weights_file):
    def never(num):
        raise AssertionError("no samples should be drawn without weights")

    ref = save_reference_statistics(tmp_path / "ref.npz", _stats(2048, mu=np.zeros(2048), sigma=np.eye(2048)))
    result = compute_fid(never, ref, None, num_samples=10)
    assert (result.value, result.available, result.reason) == (None, False, NO_WEIGHTS_REASON)
    assert result.to_dict()["num_samples"] == 10 and isinstance(result, FIDResult)
    result = compute_fid(never, ref, tmp_path / "absent.pth", num_samples=10)
    assert not result.available and result.reason.startswith(NO_WEIGHTS_REASON)
    with pytest.raises(InceptionWeightsUnavailable):
        compute_fid(never, ref, None, num_samples=10, required=True)
    marker = save_unavailable_reference(tmp_path / "na.npz", "tiny", "train", NO_WEIGHTS_REASON)
    result = compute_fid(never, marker, weights_file, num_samples=10)
    assert not result.available and result.reason == NO_WEIGHTS_REASON


def test_compute_fid_rejects_bad_arguments_and_mismatched_reference(weights_file):
    def never(num):
        raise AssertionError("no samples should be drawn")

    with pytest.raises(ValueError, match="num_samples"):
        compute_fid(never, _stats(2048), weights_file, num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        compute_fid(never, _stats(2048), weights_file, batch_size=0)
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
