"""FID and KID of model samples against cached reference statistics, through torch-fidelity's FID Inception-v3.

The network, its TF1-compatible bilinear resize to 299x299 and the 2048-d pool3 features are
torch-fidelity's (``FeatureExtractorInceptionV3``, registered as ``inception-v3-compat``); weights are
only ever read from a local file here (the caller fetches and verifies it; ``sdn.data.download``
can, with the file's sha256 prefix). The Frechet distance follows pytorch-fid's
conventions (float64, ``scipy.linalg.sqrtm``, ``eps * I`` offset for singular products). KID is
torch-fidelity's ``kid_features_to_metric`` (unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``,
averaged over random subsets) on the same features: all generated samples against the reference
file's seeded subset of training-image features. Sampling is shared out over the ranks of an
initialised process group (sample batch j is seeded by (seed, j), whoever draws it) and the features
merged, so the numbers do not depend on the number of ranks; Inception runs with TF32 off
(``sdn.metrics.fid_stats.tf32_disabled``), like the reference statistics.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from tqdm.auto import tqdm

from sdn.collectives import merge_disjoint, rank_and_world
from sdn.distributed import derive_seed
from sdn.images import save_image_grid
from sdn.metrics import fid_stats
from sdn.metrics.fid_stats import (
    FEATURE_DIM,
    ReferenceStatistics,
    ReferenceStatisticsUnavailable,
    RunningMoments,
    load_reference_statistics,
)

logger = logging.getLogger(__name__)

IMPLEMENTATION = "torch-fidelity"
VERSION = torch_fidelity.__version__
FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
RESIZE = "torch-fidelity TF1-compatible bilinear resize to 299x299"
NO_WEIGHTS_REASON = "no Inception weights: set fid.weights_path"
# Weights file torch-fidelity would download (identical content to pytorch-fid's pt_inception file).
WEIGHTS_FILE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = URL_INCEPTION_V3  # torch-fidelity's release URL of the first name
# The "-6726825d" suffix follows torch.hub's naming convention ``<name>-<hash>.<ext>``, where <hash> is
# the first 8+ hex digits of the file's SHA-256 (torch.hub.load_state_dict_from_url(check_hash=True)
# and download_url_to_file compare it with hashlib.sha256; torch-fidelity's CLIP weights use the same
# convention with check_hash=True). It is a sha256 prefix, not an md5 one.
WEIGHTS_SHA256_PREFIX = "6726825d"
KID_KERNEL = "polynomial (x.y / d + 1)^3"
KID_ESTIMATOR = "unbiased MMD^2, mean and std over random subsets (torch-fidelity kid_features_to_metric)"

SampleFn = Callable[[int, int], torch.Tensor]  # (global sample batch j, num) -> uint8 (num, C, H, W)


class InceptionWeightsUnavailable(RuntimeError):
    """No local Inception weights file was given or it does not exist (FID is then reported n/a)."""


class InvalidInceptionWeights(ValueError):
    """The weights file exists but is not a state dict of torch-fidelity's FID Inception-v3."""


def load_inception(
    weights_path: str | os.PathLike | None, device: str | torch.device = "cpu"
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's FID Inception-v3 (2048-d pool3 output) with weights read from a local file.

    The path is checked here before torch-fidelity sees it, so torch-fidelity's download branch
    (taken only for ``None``) is unreachable. Raises :class:`InceptionWeightsUnavailable` for a
    missing path and :class:`InvalidInceptionWeights` (naming the file) for a corrupt or wrong file.
    """
    if weights_path is None or str(weights_path).strip() == "":
        raise InceptionWeightsUnavailable(NO_WEIGHTS_REASON)
    path = Path(weights_path).expanduser()
    if not path.exists():
        raise InceptionWeightsUnavailable(
            f"no network: {path} not found (the FID Inception weights are not downloaded here: fetch them "
            "where there is network, or copy the file to this path)"
        )
    if not path.is_file():
        raise InvalidInceptionWeights(f"{path}: Inception weights path is not a file")
    try:
        # Safe load first: rejects corrupt files and arbitrary pickles before torch-fidelity's own
        # torch.load(weights_only=False) runs.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidInceptionWeights(f"{path}: not a readable PyTorch state dict ({err})") from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        kind = type(state_dict).__name__
        raise InvalidInceptionWeights(f"{path}: expected a state dict (name -> tensor), got {kind}")
    del state_dict
    try:
        extractor = FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or size mismatches
        raise InvalidInceptionWeights(
            f"{path}: not a state dict of torch-fidelity's FID Inception-v3 ({err})"
        ) from err
    return extractor.to(device)


def _sqrtm_trace(product: np.ndarray) -> float:
    """Trace of the principal square root of a covariance product; raises on large imaginary parts."""
    covmean = scipy.linalg.sqrtm(product)
    if not np.isfinite(covmean).all():
        raise FloatingPointError("sqrtm produced non-finite values")
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm of the covariance product has a large imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _is_singular(sigma: np.ndarray) -> bool:
    """Numerical rank test (numpy's default tolerance) for a symmetric covariance."""
    return int(np.linalg.matrix_rank(sigma, hermitian=True)) < sigma.shape[0]


def frechet_distance_with_info(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> tuple[float, bool]:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), and whether ``eps * I`` was added.

    ``d = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64. As in
    pytorch-fid, ``eps * I`` is added to both covariances when their product is singular (here
    tested by numerical rank; e.g. fewer samples than feature dimensions) or sqrtm is not finite.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"expected mu1, mu2 of shape (D,) and sigma1, sigma2 of shape (D, D); got {mu1.shape}, "
            f"{mu2.shape}, {sigma1.shape}, {sigma2.shape}"
        )
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")

    diff = mu1 - mu2
    offset_used = _is_singular(sigma1) or _is_singular(sigma2)
    tr_covmean = None
    if not offset_used:
        try:
            tr_covmean = _sqrtm_trace(sigma1 @ sigma2)
        except FloatingPointError:
            offset_used = True
    if offset_used:
        logger.warning("FID: singular covariance product; adding %g * I to both covariances", eps)
        offset = np.eye(dim) * eps
        tr_covmean = _sqrtm_trace((sigma1 + offset) @ (sigma2 + offset))
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return value, offset_used


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between two Gaussians (see :func:`frechet_distance_with_info`)."""
    return frechet_distance_with_info(mu1, sigma1, mu2, sigma2, eps)[0]


def kid_from_features(
    features_1: np.ndarray, features_2: np.ndarray, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """(mean, std) of KID over ``subsets`` random subsets of ``subset_size`` rows of each feature set,
    by torch-fidelity's ``kid_features_to_metric`` (its default polynomial kernel, seeded subset draws)."""
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"KID subsets must be an int >= 1, got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"KID subset_size must be an int >= 2, got {subset_size!r}")
    for name, feats in (("features_1", features_1), ("features_2", features_2)):
        if feats.ndim != 2 or len(feats) < subset_size:
            raise ValueError(f"KID: {name} must be (N >= subset_size={subset_size}, D), got {feats.shape}")
    if features_1.shape[1] != features_2.shape[1]:
        raise ValueError(f"KID: feature dimensions differ: {features_1.shape[1]} vs {features_2.shape[1]}")
    out = kid_features_to_metric(
        torch.from_numpy(np.ascontiguousarray(features_1)), torch.from_numpy(np.ascontiguousarray(features_2)),
        kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


@dataclass
class FIDResult:
    """One FID value (``None`` when unavailable) and the KID of the same features, with everything
    needed to interpret them."""

    value: float | None
    available: bool
    reason: str | None
    implementation: str = IMPLEMENTATION
    version: str = VERSION
    feature_layer: str = FEATURE_LAYER
    resize: str = RESIZE
    num_samples: int = 0
    reference: str | None = None
    temperature: float | None = None
    eps_offset_used: bool | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_available: bool = False
    kid_reason: str | None = None
    kid_subsets: int | None = None
    kid_subset_size: int | None = None  # used: the requested size capped by both feature counts
    kid_subset_size_requested: int | None = None
    kid_seed: int | None = None
    kid_reference: str | None = None  # the reference features' split, count and subset seed
    kid_kernel: str = KID_KERNEL
    kid_estimator: str = KID_ESTIMATOR

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/MLflow logging."""
        return asdict(self)


def model_sample_fn(model: torch.nn.Module, temperature: float = 1.0, seed: int = 0) -> SampleFn:
    """Wrap ``model.sample(num, temperature, generator)`` as ``sample_fn(j, num) -> uint8`` (on the CPU):
    global sample batch j is drawn in eval mode with a generator on the model's device seeded by
    ``derive_seed(seed, j)``, so it depends on (seed, j) only, not on which rank draws it."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def sample_fn(index: int, num: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, index))
        was_training = model.training
        model.eval()
        try:
            return model.sample(num, temperature=temperature, generator=generator).cpu()
        finally:
            model.train(was_training)

    return sample_fn


def sample_batches(num_samples: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, int]]:
    """(j, start, num) of the global sample batches that ``rank`` of ``world`` draws: batch j holds
    samples ``[j * batch_size, min((j + 1) * batch_size, num_samples))``; rank r takes every j with
    ``j % world == r`` (so batch 0, and its image shape, is always rank 0's)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample batch_size must be a positive int, got {batch_size!r}")
    count = -(-num_samples // batch_size)
    return [(j, j * batch_size, min(batch_size, num_samples - j * batch_size)) for j in range(rank, count, world)]


def iterate_samples(sample_fn: SampleFn, num_samples: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, batch) of the sample batches of ``rank`` (:func:`sample_batches`), each checked to be
    uint8 (n, C, H, W) with C in {1, 3}."""
    for index, start, num in sample_batches(num_samples, batch_size, rank, world):
        batch = sample_fn(index, num)
        if (
            not isinstance(batch, torch.Tensor)
            or batch.dtype != torch.uint8
            or batch.ndim != 4
            or batch.shape[0] != num
            or batch.shape[1] not in (1, 3)
        ):
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"sample_fn({index}, {num}) must return torch.uint8 ({num}, C, H, W) with C in {{1, 3}}, "
                             f"got {got}")
        yield start, batch


def sample_features(
    sample_fn: SampleFn,
    extractor: torch.nn.Module,
    *,
    num_samples: int,
    sample_batch_size: int,
    batch_size: int,
    device: str | torch.device,
    progress: bool = True,
    grid_size: int = 0,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Inception features (num_samples, 2048) float32 of every sample in index order, and the first
    ``grid_size`` samples (uint8, None when 0), the same on every rank.

    Under a process group of several ranks each rank draws its sample batches of
    ``sample_batch_size`` (:func:`sample_batches`), runs them through ``extractor`` in batches of at
    most ``batch_size`` and the results are merged exactly (``sdn.collectives.merge_disjoint``),
    so the features equal one rank's up to float round-off. Every rank must call this.
    """
    rank, world = rank_and_world()
    features = torch.zeros(num_samples, FEATURE_DIM, dtype=torch.float32)
    grid: torch.Tensor | None = None
    shape = torch.zeros(1, 4, dtype=torch.int64)  # the samples' (N, C, H, W), known from batch 0 (rank 0's)
    with tqdm(total=num_samples, desc="FID samples", unit="img", disable=not progress or rank != 0) as bar:
        for start, batch in iterate_samples(sample_fn, num_samples, sample_batch_size, rank, world):
            if grid_size and start == 0:
                shape[0] = torch.tensor([min(grid_size, num_samples), *batch.shape[1:]])
            if grid_size and start < grid_size:
                if grid is None:
                    grid = torch.zeros(min(grid_size, num_samples), *batch.shape[1:], dtype=torch.uint8)
                grid[start:start + batch.shape[0]] = batch[: grid.shape[0] - start]
            rgb = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
            for offset in range(0, rgb.shape[0], batch_size):
                part = rgb[offset:offset + batch_size]
                begin = start + offset
                rows = fid_stats.inception_features(extractor, part, device)
                features[begin:begin + part.shape[0]] = torch.from_numpy(rows)
            bar.update(batch.shape[0])
    features = merge_disjoint(features)
    if not grid_size:
        return features.numpy(), None
    shape = merge_disjoint(shape)
    if grid is None:
        grid = torch.zeros(*shape[0].tolist(), dtype=torch.uint8)
    return features.numpy(), merge_disjoint(grid)


def _unavailable(reason: str, num_samples: int, reference: str | None, temperature: float | None) -> FIDResult:
    logger.warning("FID and KID not computed: %s", reason)
    return FIDResult(None, False, reason, num_samples=num_samples, reference=reference, temperature=temperature,
                     kid_reason=reason)


def compute_fid(
    sample_fn: SampleFn,
    reference: ReferenceStatistics | str | os.PathLike,
    weights_path: str | os.PathLike | None,
    *,
    num_samples: int = 50_000,
    batch_size: int = 50,
    sample_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    temperature: float | None = None,
    required: bool = False,
    grid_path: str | os.PathLike | None = None,
    grid_size: int = 64,
    eps: float = 1e-6,
    progress: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> FIDResult:
    """FID and KID of ``num_samples`` images from ``sample_fn`` against reference statistics (object or ``.npz``).

    ``sample_fn(j, num)`` draws global sample batch j (``sample_batch_size`` images, default
    ``batch_size``); ``batch_size`` is the Inception batch. Under a process group of several ranks
    every rank must call this: the sample batches are shared out and the features merged
    (:func:`sample_features`), every rank computes the same result and rank 0 writes the grid.

    Without usable weights (or with a reference file that records none) the result is n/a
    (``value=None``, ``available=False``) unless ``required``, in which case the error is raised.
    KID uses every generated feature and the reference's stored feature subset, with subsets of
    ``min(kid_subset_size, num_samples, reference features)`` rows (recorded); it is n/a, with the
    reason, when the reference has no features.
    ``temperature`` is only recorded: ``sample_fn`` must already sample at it (see :func:`model_sample_fn`).
    A PNG grid of the first ``grid_size`` samples is written to ``grid_path`` if given.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if sample_batch_size is not None and (not isinstance(sample_batch_size, int) or sample_batch_size < 1):
        raise ValueError(f"sample_batch_size must be a positive int or None, got {sample_batch_size!r}")
    if not isinstance(kid_subsets, int) or kid_subsets < 1:
        raise ValueError(f"kid_subsets must be an int >= 1, got {kid_subsets!r}")
    if not isinstance(kid_subset_size, int) or kid_subset_size < 2:
        raise ValueError(f"kid_subset_size must be an int >= 2, got {kid_subset_size!r}")
    try:
        extractor = load_inception(weights_path, device)
        if not isinstance(reference, ReferenceStatistics):
            reference = load_reference_statistics(reference)
    except (InceptionWeightsUnavailable, ReferenceStatisticsUnavailable) as err:
        if required:
            raise
        ref_name = None if isinstance(reference, (str, os.PathLike)) else reference.describe()
        return _unavailable(str(err), num_samples, ref_name, temperature)
    if reference.implementation != IMPLEMENTATION or reference.feature_layer != FEATURE_LAYER:
        raise ValueError(
            f"reference statistics were computed with {reference.implementation} layer {reference.feature_layer}, "
            f"expected {IMPLEMENTATION} layer {FEATURE_LAYER}"
        )
    if reference.mu.shape != (FEATURE_DIM,) or reference.sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(
            f"reference statistics must be {FEATURE_DIM}-d, got mu {reference.mu.shape}, sigma {reference.sigma.shape}"
        )
    if reference.version != VERSION:
        logger.warning("reference statistics from %s %s, samples from %s", IMPLEMENTATION, reference.version, VERSION)

    features, grid = sample_features(
        sample_fn, extractor, num_samples=num_samples, sample_batch_size=sample_batch_size or batch_size,
        batch_size=batch_size, device=device, progress=progress, grid_size=grid_size if grid_path is not None else 0,
    )
    if grid is not None and rank_and_world()[0] == 0:
        save_image_grid(grid, grid_path, nrow=8, padding=2)
    moments = RunningMoments(FEATURE_DIM)
    for start in range(0, num_samples, batch_size):  # the same merge order on every rank and world size
        moments.update(features[start:start + batch_size])
    mu, sigma, count = moments.mean, moments.covariance(), moments.count
    value, offset_used = frechet_distance_with_info(mu, sigma, reference.mu, reference.sigma, eps)
    kid: dict[str, Any] = {"kid_subsets": kid_subsets, "kid_subset_size_requested": kid_subset_size,
                           "kid_seed": kid_seed, "kid_reference": reference.describe_features()}
    if reference.features is None:
        kid["kid_reason"] = "the reference statistics file has no KID features (recompute it with num_features > 0)"
    else:
        size = min(kid_subset_size, count, len(reference.features))
        if size < 2:
            kid["kid_reason"] = f"KID needs at least 2 features on each side, got {count} and {len(reference.features)}"
        else:
            mean, std = kid_from_features(features, reference.features, kid_subsets, size, kid_seed)
            kid.update(kid_mean=mean, kid_std=std, kid_available=True, kid_subset_size=size)
    if not kid.get("kid_available"):
        logger.warning("KID not computed: %s", kid["kid_reason"])
    return FIDResult(
        value=value,
        available=True,
        reason=None,
        num_samples=count,
        reference=reference.describe(),
        temperature=temperature,
        eps_offset_used=offset_used,
        **kid,
    )


def compute_model_fid(
    model: torch.nn.Module,
    reference: ReferenceStatistics | str | os.PathLike,
    weights_path: str | os.PathLike | None,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    **kwargs: Any,
) -> FIDResult:
    """FID of a model's samples (``model.sample(num, temperature, generator)``, seeded) — see :func:`compute_fid`."""
    sample_fn = model_sample_fn(model, temperature, seed)
    return compute_fid(sample_fn, reference, weights_path, temperature=temperature, **kwargs)
