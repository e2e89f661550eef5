"""FID of model samples against cached reference statistics, through torch-fidelity's FID Inception-v3.

The network, its TF1-compatible bilinear resize to 299x299 and the 2048-d pool3 features are
torch-fidelity's (``FeatureExtractorInceptionV3``, registered as ``inception-v3-compat``); weights are
only ever read from a local file, never downloaded. The Frechet distance follows pytorch-fid's
conventions (float64, ``scipy.linalg.sqrtm``, ``eps * I`` offset for singular products).
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
import torchvision.utils
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from sdn.metrics.fid_stats import (
    FEATURE_DIM,
    ReferenceStatistics,
    ReferenceStatisticsUnavailable,
    accumulate_statistics,
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

SampleFn = Callable[[int], torch.Tensor]


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
        raise InceptionWeightsUnavailable(f"{NO_WEIGHTS_REASON} (file not found: {path})")
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


@dataclass
class FIDResult:
    """One FID value (``None`` when unavailable) with everything needed to interpret it."""

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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/MLflow logging."""
        return asdict(self)


def model_sample_fn(model: torch.nn.Module, temperature: float = 1.0, seed: int = 0) -> SampleFn:
    """Wrap ``model.sample(num, temperature, generator)`` as a seeded ``sample_fn(num) -> uint8``."""
    generator = torch.Generator()
    generator.manual_seed(seed)

    @torch.no_grad()
    def sample_fn(num: int) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model.sample(num, temperature=temperature, generator=generator).cpu()
        finally:
            model.train(was_training)

    return sample_fn


def iterate_samples(sample_fn: SampleFn, num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Draw ``num_samples`` images in batches, checking each batch is uint8 (n, C, H, W) with C in {1, 3}."""
    drawn = 0
    while drawn < num_samples:
        num = min(batch_size, num_samples - drawn)
        batch = sample_fn(num)
        if (
            not isinstance(batch, torch.Tensor)
            or batch.dtype != torch.uint8
            or batch.ndim != 4
            or batch.shape[0] != num
            or batch.shape[1] not in (1, 3)
        ):
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"sample_fn({num}) must return torch.uint8 ({num}, C, H, W) with C in {{1, 3}}, got {got}")
        drawn += num
        yield batch


def save_sample_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save uint8 images (N, C, H, W) as one PNG grid via torchvision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(images.float() / 255.0, path, nrow=nrow, padding=2)
    return path


def _unavailable(reason: str, num_samples: int, reference: str | None, temperature: float | None) -> FIDResult:
    logger.warning("FID not computed: %s", reason)
    return FIDResult(None, False, reason, num_samples=num_samples, reference=reference, temperature=temperature)


def compute_fid(
    sample_fn: SampleFn,
    reference: ReferenceStatistics | str | os.PathLike,
    weights_path: str | os.PathLike | None,
    *,
    num_samples: int = 50_000,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    temperature: float | None = None,
    required: bool = False,
    grid_path: str | os.PathLike | None = None,
    grid_size: int = 64,
    eps: float = 1e-6,
    progress: bool = True,
) -> FIDResult:
    """FID of ``num_samples`` images from ``sample_fn`` against reference statistics (object or ``.npz``).

    Without usable weights (or with a reference file that records none) the result is n/a
    (``value=None``, ``available=False``) unless ``required``, in which case the error is raised.
    ``temperature`` is only recorded: ``sample_fn`` must already sample at it (see :func:`model_sample_fn`).
    A PNG grid of the first ``grid_size`` samples is written to ``grid_path`` if given.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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

    grid: list[torch.Tensor] = []

    def batches() -> Iterator[torch.Tensor]:
        kept = 0
        for batch in iterate_samples(sample_fn, num_samples, batch_size):
            if grid_path is not None and kept < grid_size:
                grid.append(batch[: grid_size - kept].clone())
                kept += grid[-1].shape[0]
            yield batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch

    mu, sigma, count = accumulate_statistics(batches(), extractor, device, num_samples, "FID samples", progress)
    if grid_path is not None:
        save_sample_grid(torch.cat(grid), grid_path)
    value, offset_used = frechet_distance_with_info(mu, sigma, reference.mu, reference.sigma, eps)
    return FIDResult(
        value=value,
        available=True,
        reason=None,
        num_samples=count,
        reference=reference.describe(),
        temperature=temperature,
        eps_offset_used=offset_used,
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
