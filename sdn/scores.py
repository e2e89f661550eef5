"""ELBO and importance-weighted negative log-likelihood in bits per dimension, sharded over ranks.

For a density model with log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x):

* ELBO NLL     = -mean_k log w_k            (the paper's ELBO uses one sample)
* IW NLL (K)   = -(logsumexp_k log w_k - log K)   (the paper uses K = 1024)

Both are returned as *positive* NLLs (the official evaluation printed the IW log-likelihood without
its minus sign under a "negative log-likelihood" label; this module does not). bpd = nats /
(C * H * W * ln 2). For data quantized to ``bits`` < 8 the likelihood is over 2**bits levels per
dimension, so bpd values are on that scale (as in the official code; a uniform model scores
``bits`` bpd).

The model provides the evaluation pass in two halves (``sdn.models.hvae.HierarchicalVAE``):
``posterior_features(images) -> list of tensors (B, ...)`` (the bottom-up pass, run once per image),
``log_weights_from_features(features, rows (P,), noise (P, D)) -> float64 (P,)`` (the top-down pass
of P posterior samples, sample p of image ``rows[p]``) and ``posterior_noise_size`` (D).

Noise: the k-th posterior sample of the image with index i in the dataset uses the k-th
``torch.randn(D)`` drawn from a generator on the model's device seeded by
``sdn.distributed.derive_seed(seed, i)``. Every image's numbers therefore depend only on (seed, i):
not on the batch size, the chunk size or the number of ranks. At most ``chunk_size`` (image x
sample) pairs go through one forward pass (the bottom-up pass runs on at most ``chunk_size``
images at a time). The log-sum-exp is taken over a float64 table of the K log-weights per image.

Under an initialised process group of several ranks the dataset's indices are split into contiguous
shares (``sdn.collectives.shard``) and the per-image results merged exactly, so every rank returns
the same numbers, equal to one rank's up to float round-off in the model's forward passes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sdn.collectives import merge_disjoint, rank_and_world, shard
from sdn.likelihoods import nats_to_bpd
from sdn.seeding import image_generators


def _image_of(item: Any, index: int) -> torch.Tensor:
    """A dataset item's image: items are ``(image, factors)`` per the data contract; bare tensors too."""
    image = item[0] if isinstance(item, (list, tuple)) else item
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"dataset item {index}: expected a uint8 image (C, H, W), got {got}")
    return image


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def image_log_weights(model: nn.Module, images: torch.Tensor, indices: Sequence[int], num_samples: int,
                      chunk_size: int, seed: int) -> torch.Tensor:
    """The (B, K) float64 table (on the CPU) of log-weights of the B ``images`` (uint8, dataset
    indices ``indices``) for K = ``num_samples`` posterior samples each, noise seeded per image.

    The bottom-up pass runs once per image (in slices of at most ``chunk_size`` images); the
    top-down pass runs on chunks of at most ``chunk_size`` (image, sample) pairs, image-major, so
    each image's samples are drawn in order from its own generator.
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("chunk_size", chunk_size)
    if len(indices) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(indices)} indices")
    device = _model_device(model)
    noise_size = int(model.posterior_noise_size)
    slices = [model.posterior_features(images[s:s + chunk_size].to(device))
              for s in range(0, images.shape[0], chunk_size)]
    features = slices[0] if len(slices) == 1 else [torch.cat(parts) for parts in zip(*slices)]
    del slices
    generators = image_generators(indices, device, seed)
    table = torch.empty(images.shape[0] * num_samples, dtype=torch.float64, device=device)
    for start in range(0, table.numel(), chunk_size):
        pairs = range(start, min(start + chunk_size, table.numel()))
        rows = torch.arange(pairs.start, pairs.stop, device=device) // num_samples
        noise = torch.stack([torch.randn(noise_size, generator=generators[p // num_samples], device=device)
                             for p in pairs])
        log_w = model.log_weights_from_features(features, rows, noise)
        if log_w.shape != (len(pairs),):
            raise ValueError(f"log_weights_from_features returned shape {tuple(log_w.shape)}, expected ({len(pairs)},)")
        table[pairs.start:pairs.stop] = log_w
    return table.view(images.shape[0], num_samples).cpu()


@torch.no_grad()
def evaluate_bpd(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    num_samples: int = 1,
    chunk_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Dataset-average ELBO and IW NLL in bpd (positive) over a map-style ``dataset``, in eval mode.

    ``batch_size`` images are loaded and encoded at a time (their posterior features stay alive
    while their samples run); ``chunk_size`` bounds the (image x sample) pairs per forward pass.
    ``device`` must be the model's (default); the global RNG is not touched. Returns
    ``{"elbo_bpd", "iw_bpd", "num_images", "num_samples"}``, the same on every rank; ``iw_bpd``
    equals ``elbo_bpd`` when ``num_samples`` is 1.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("chunk_size", chunk_size)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(f"evaluate_bpd takes a map-style dataset (len and [i]), got {type(dataset).__name__}")
    if isinstance(model, DistributedDataParallel):
        model = model.module
    where = _model_device(model)
    if device is not None and (torch.device(device).type != where.type
                               or torch.device(device).index not in (None, where.index)):
        raise ValueError(f"device {device} is not the model's device {where}")
    total = len(dataset)
    if total == 0:
        raise ValueError("the dataset has no images")
    shape = _image_of(dataset[0], 0).shape
    rank, world = rank_and_world()
    mine = shard(total, rank, world)
    per_image = torch.zeros(total, 2, dtype=torch.float64)  # (-ELBO, IW NLL) in nats, own rows only
    was_training = model.training
    model.eval()
    try:
        starts = range(mine.start, mine.stop, batch_size)
        for start in tqdm(starts, desc=f"bpd (K={num_samples})", disable=not progress or rank != 0):
            indices = range(start, min(start + batch_size, mine.stop))
            images = [_image_of(dataset[i], i) for i in indices]
            for i, image in zip(indices, images):
                if image.shape != shape:
                    raise ValueError(f"all images must have the same size: item {i} is {tuple(image.shape)}, "
                                     f"item 0 {tuple(shape)}")
            images = torch.stack(images)
            table = image_log_weights(model, images, indices, num_samples, chunk_size, seed)
            per_image[start:indices.stop, 0] = -table.mean(dim=1)
            per_image[start:indices.stop, 1] = -(torch.logsumexp(table, dim=1) - math.log(num_samples))
    finally:
        model.train(was_training)
    per_image = merge_disjoint(per_image)
    return {
        "elbo_bpd": nats_to_bpd(math.fsum(per_image[:, 0].tolist()) / total, shape.numel()),
        "iw_bpd": nats_to_bpd(math.fsum(per_image[:, 1].tolist()) / total, shape.numel()),
        "num_images": total,
        "num_samples": num_samples,
    }
