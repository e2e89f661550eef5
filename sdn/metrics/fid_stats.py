"""Inception feature statistics (mu, sigma) for FID: streaming extraction and the cached ``.npz``.

Features are the 2048-d pool3 activations of torch-fidelity's FID Inception-v3; the statistics
follow pytorch-fid / torch-fidelity conventions (mean, and ``np.cov`` with ``ddof=1``), computed in
float64 by merging per-batch moments (Chan et al.) so 50k samples never need to be held in memory.
For KID the file also keeps the features themselves of a fixed, seeded subset of the split's images
(``np.random.default_rng(seed).choice`` without replacement, stored sorted with their indices), as
float32: the dtype torch-fidelity's extractor produces, so storing them loses nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

FEATURE_DIM = 2048
# Keys of the reference-statistics file format (one .npz per dataset split).
_META_KEYS = ("dataset", "split", "num_images", "implementation", "version", "feature_layer")
# Version 2 adds the KID reference features: features (K, D) float32, feature_indices (K,), features_seed.
_FORMAT_VERSION = 2


class ReferenceStatisticsUnavailable(RuntimeError):
    """The statistics file records that no statistics could be computed (e.g. no Inception weights)."""


@dataclass(frozen=True)
class ReferenceStatistics:
    """Mean and covariance of Inception features of one dataset split, with their provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    dataset: str
    split: str
    num_images: int
    implementation: str
    version: str
    feature_layer: str
    features: np.ndarray | None = None  # (K, D) float32 features of a seeded subset, for KID; None: none kept
    feature_indices: np.ndarray | None = None  # (K,) sorted image indices of ``features`` in the split
    features_seed: int | None = None  # seed of the subset choice

    def describe(self) -> str:
        """Short provenance string recorded with every FID value, e.g. ``cifar10/train (50000 images)``."""
        return f"{self.dataset}/{self.split} ({self.num_images} images)"

    def describe_features(self) -> str | None:
        """Provenance of the KID reference features, e.g. ``cifar10/train (10000 of 50000 images, seed 0)``."""
        if self.features is None:
            return None
        return f"{self.dataset}/{self.split} ({len(self.features)} of {self.num_images} images, seed {self.features_seed})"


class FeatureKeeper:
    """Keeps the feature rows whose global index (order of arrival) is in ``indices``, as float32."""

    def __init__(self, indices: np.ndarray | None = None) -> None:
        self.indices = None if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        self._kept: list[np.ndarray] = []
        self._seen = 0

    def add(self, rows: np.ndarray) -> None:
        """Take the wanted rows of the next batch (all of them when no indices were given)."""
        start, self._seen = self._seen, self._seen + len(rows)
        if self.indices is None:
            self._kept.append(np.asarray(rows, dtype=np.float32))
            return
        lo, hi = np.searchsorted(self.indices, [start, self._seen])
        if hi > lo:
            self._kept.append(np.asarray(rows[self.indices[lo:hi] - start], dtype=np.float32))

    def features(self) -> np.ndarray:
        """The kept rows in index order, (K, D) float32 (raises if some wanted index never arrived)."""
        dim = self._kept[0].shape[1] if self._kept else FEATURE_DIM
        out = np.concatenate(self._kept) if self._kept else np.zeros((0, dim), np.float32)
        if self.indices is not None and len(out) != len(self.indices):
            raise ValueError(f"expected features of {len(self.indices)} chosen images, got {len(out)} "
                             f"(only {self._seen} images arrived)")
        return out


def choose_feature_indices(num_images: int, num_features: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``min(num_features, num_images)`` of ``num_images`` images."""
    if not isinstance(num_features, int) or num_features < 0:
        raise ValueError(f"num_features must be an int >= 0, got {num_features!r}")
    size = min(num_features, num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, size=size, replace=False))


class RunningMoments:
    """Numerically stable streaming mean and covariance (``ddof=1``) of row vectors, in float64."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self._m2 = np.zeros((dim, dim), dtype=np.float64)  # sum of outer products of deviations

    def update(self, rows: np.ndarray) -> None:
        """Merge a batch (B, dim) into the running moments (Chan, Golub & LeVeque pairwise update)."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {rows.shape}")
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0)
        centred = rows - mean_b
        m2_b = centred.T @ centred
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (``np.cov(rows, rowvar=False)``); needs at least 2 rows."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        return self._m2 / (self.count - 1)


def _as_image_batch(batch: Any) -> torch.Tensor:
    """Validate one batch of images: uint8 (B, C, H, W) with C in {1, 3}; grayscale becomes RGB."""
    if isinstance(batch, (tuple, list)):  # (image, factors) items collated by a DataLoader
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"expected a torch.uint8 tensor (N, C, H, W), got {type(batch).__name__}")
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(
            "expected images as torch.uint8 (N, C, H, W) with C in {1, 3}, "
            f"got dtype {batch.dtype} and shape {tuple(batch.shape)}"
        )
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch


def iterate_image_batches(
    images: torch.Tensor | Dataset | Iterable[Any], batch_size: int, max_images: int | None = None
) -> tuple[Iterator[torch.Tensor], int | None]:
    """Turn a uint8 tensor, a ``Dataset`` of ``(image, factors)`` items, or an iterable of batches
    into an iterator of validated RGB uint8 batches; also returns the image count when known."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")

    if isinstance(images, torch.Tensor):
        total = images.shape[0] if max_images is None else min(images.shape[0], max_images)
        source: Iterable[Any] = (images[i : i + batch_size] for i in range(0, total, batch_size))
    elif isinstance(images, Dataset) and hasattr(images, "__len__"):
        total = len(images) if max_images is None else min(len(images), max_images)
        subset = images if total == len(images) else torch.utils.data.Subset(images, range(total))
        source = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
    else:
        total = None
        source = images

    def _gen() -> Iterator[torch.Tensor]:
        seen = 0
        for raw in source:
            batch = _as_image_batch(raw)
            if max_images is not None and seen + batch.shape[0] > max_images:
                batch = batch[: max_images - seen]
            if batch.shape[0] == 0:
                break
            seen += batch.shape[0]
            yield batch
            if max_images is not None and seen >= max_images:
                break

    return _gen(), total


# The switches of TF32 in float32 matmuls and convolutions (torch >= 2.9 API; the legacy
# ``allow_tf32`` flags are views of them, and torch refuses to read those once both APIs were used).
_TF32_SWITCHES = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


@contextmanager
def tf32_disabled() -> Iterator[None]:
    """Full float32 precision in CUDA matmuls and cuDNN convolutions inside (TF32 off), the previous
    settings restored after. Inception features on the GPU then match the CPU's to float round-off,
    whatever the caller (a trainer, a user) enabled, so reference and sample features share numerics."""
    if all(hasattr(switch, "fp32_precision") for switch in _TF32_SWITCHES):
        saved = [switch.fp32_precision for switch in _TF32_SWITCHES]
        try:
            for switch in _TF32_SWITCHES:
                switch.fp32_precision = "ieee"
            yield
        finally:
            for switch, value in zip(_TF32_SWITCHES, saved):
                switch.fp32_precision = value
        return
    legacy = (torch.backends.cuda.matmul, torch.backends.cudnn)  # torch < 2.9
    saved = [switch.allow_tf32 for switch in legacy]
    try:
        for switch in legacy:
            switch.allow_tf32 = False
        yield
    finally:
        for switch, value in zip(legacy, saved):
            switch.allow_tf32 = value


@torch.inference_mode()
def inception_features(extractor: torch.nn.Module, batch: torch.Tensor, device: str | torch.device) -> np.ndarray:
    """2048-d pool3 features (float64, (B, 2048)) of one validated RGB uint8 batch, TF32 off."""
    with tf32_disabled():
        (features,) = extractor(batch.to(device))
    return features.detach().to("cpu", torch.float64).numpy()


def accumulate_statistics(
    batches: Iterable[torch.Tensor],
    extractor: torch.nn.Module,
    device: str | torch.device,
    total: int | None = None,
    desc: str = "Inception features",
    progress: bool = True,
    keep: FeatureKeeper | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Run batches through the extractor and return (mu, sigma, count) of their features
    (the rows ``keep`` asks for are also handed to it)."""
    moments = RunningMoments(FEATURE_DIM)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            features = inception_features(extractor, batch, device)
            moments.update(features)
            if keep is not None:
                keep.add(features)
            bar.update(batch.shape[0])
    return moments.mean, moments.covariance(), moments.count


def compute_reference(
    images: torch.Tensor | Dataset | Iterable[Any],
    extractor: torch.nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    progress: bool = True,
    num_features: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(mu, sigma, features, indices): statistics of the split and the float32 features of a seeded
    subset of ``num_features`` of its images for KID (``None, None`` when ``num_features`` is 0)."""
    batches, total = iterate_image_batches(images, batch_size, max_images)
    keep = None
    if num_features:
        if total is None:
            raise ValueError("KID reference features need images of known count (a tensor or a sized Dataset)")
        keep = FeatureKeeper(choose_feature_indices(total, num_features, seed))
    mu, sigma, _ = accumulate_statistics(batches, extractor, device, total, "reference statistics", progress, keep)
    if keep is None:
        return mu, sigma, None, None
    return mu, sigma, keep.features(), keep.indices


def _check_shapes(mu: np.ndarray, sigma: np.ndarray, where: str, expected_dim: int | None) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{where}: expected mu of shape (D,) and sigma of shape (D, D), got {mu.shape} and {sigma.shape}"
        )
    if expected_dim is not None and mu.shape[0] != expected_dim:
        raise ValueError(f"{where}: expected {expected_dim}-d statistics, got {mu.shape[0]}-d")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: statistics contain NaN or inf")


def save_reference_statistics(path: str | os.PathLike, stats: ReferenceStatistics) -> Path:
    """Write statistics and their provenance to one ``.npz`` (no pickles)."""
    path = Path(path)
    _check_shapes(np.asarray(stats.mu), np.asarray(stats.sigma), str(path), None)
    extra: dict[str, np.ndarray] = {}
    if stats.features is not None:
        features = np.asarray(stats.features, dtype=np.float32)
        indices = np.asarray(stats.feature_indices, dtype=np.int64)
        _check_features(features, indices, str(path), len(stats.mu), stats.num_images)
        extra = {"features": features, "feature_indices": indices, "features_seed": np.array(int(stats.features_seed))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file handle stops numpy appending ".npz" to the name
        np.savez(
            handle,
            available=np.array(True),
            format_version=np.array(_FORMAT_VERSION),
            mu=np.asarray(stats.mu, dtype=np.float64),
            sigma=np.asarray(stats.sigma, dtype=np.float64),
            **{key: np.array(getattr(stats, key)) for key in _META_KEYS},
            **extra,
        )
    return path


def _check_features(features: np.ndarray, indices: np.ndarray, where: str, dim: int, num_images: int) -> None:
    """KID reference features must be (K, dim) finite rows with K distinct sorted indices in the split."""
    if features.ndim != 2 or features.shape[1] != dim or indices.shape != (features.shape[0],):
        raise ValueError(f"{where}: expected KID features (K, {dim}) and indices (K,), got {features.shape} "
                         f"and {indices.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{where}: KID features contain NaN or inf")
    if len(indices) and (indices[0] < 0 or indices[-1] >= num_images or np.any(np.diff(indices) <= 0)):
        raise ValueError(f"{where}: KID feature indices must be sorted, distinct and in [0, {num_images})")


def save_unavailable_reference(path: str | os.PathLike, dataset: str, split: str, reason: str) -> Path:
    """Write a statistics file that records why none could be computed, so a pipeline can go on offline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(
            handle,
            available=np.array(False),
            format_version=np.array(_FORMAT_VERSION),
            reason=np.array(reason),
            dataset=np.array(dataset),
            split=np.array(split),
        )
    return path


def load_reference_statistics(path: str | os.PathLike, expected_dim: int | None = FEATURE_DIM) -> ReferenceStatistics:
    """Read a file written by :func:`save_reference_statistics`, checking keys and shapes.

    Raises ``FileNotFoundError`` if missing, ``ValueError`` naming the file if malformed, and
    :class:`ReferenceStatisticsUnavailable` if the file records that no statistics exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as err:  # zipfile/pickle/format errors all mean "not our file"
        raise ValueError(f"{path}: not a readable reference-statistics .npz ({err})") from err
    if "available" in contents and not bool(contents["available"]):
        raise ReferenceStatisticsUnavailable(str(contents.get("reason", "reference statistics unavailable")))
    missing = [key for key in ("mu", "sigma", *_META_KEYS) if key not in contents]
    if missing:
        raise ValueError(f"{path}: reference-statistics file lacks keys {missing}")
    mu = np.asarray(contents["mu"], dtype=np.float64)
    sigma = np.asarray(contents["sigma"], dtype=np.float64)
    _check_shapes(mu, sigma, str(path), expected_dim)
    features = indices = seed = None
    if "features" in contents:  # format 2: KID reference features
        if "feature_indices" not in contents or "features_seed" not in contents:
            raise ValueError(f"{path}: KID features stored without feature_indices / features_seed")
        features, indices = contents["features"], np.asarray(contents["feature_indices"], dtype=np.int64)
        _check_features(features, indices, str(path), mu.shape[0], int(contents["num_images"]))
        seed = int(contents["features_seed"])
    return ReferenceStatistics(
        mu=mu,
        sigma=sigma,
        dataset=str(contents["dataset"]),
        split=str(contents["split"]),
        num_images=int(contents["num_images"]),
        implementation=str(contents["implementation"]),
        version=str(contents["version"]),
        feature_layer=str(contents["feature_layer"]),
        features=features,
        feature_indices=indices,
        features_seed=seed,
    )
