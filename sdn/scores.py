"""ELBO and importance-weighted negative log-likelihood in bits per dimension.

For a density model with ``log_weights(images, K) -> (K, B)`` (log w_k = log p(x|z_k) + log p(z_k)
- log q(z_k|x), z_k ~ q(z|x)):

* ELBO NLL     = -mean_k log w_k            (the paper's ELBO uses one sample)
* IW NLL (K)   = -(logsumexp_k log w_k - log K)   (the paper uses K = 1024)

Both are returned as *positive* NLLs (the official evaluation printed the IW log-likelihood without
its minus sign under a "negative log-likelihood" label; this module does not). bpd = nats /
(C * H * W * ln 2). For data quantized to ``bits`` < 8 the likelihood is over 2**bits levels per
dimension, so bpd values are on that scale (as in the official code; a uniform model scores
``bits`` bpd).

Samples are processed in chunks of at most ``chunk_size`` repeated images per forward pass (the
batch is repeated along the batch dim), so K = 1024 needs K * B / chunk_size passes rather than K,
and memory is bounded by the chunk size. The log-sum-exp is accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from sdn.likelihoods import nats_to_bpd


def _images_of(batch) -> torch.Tensor:
    """DataLoader batches are ``(images, factors)`` per the data contract; accept bare tensors too."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 image batches (B, C, H, W), got {getattr(images, 'dtype', type(images))}")
    return images


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def image_nll(model: nn.Module, images: torch.Tensor, num_samples: int, chunk_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-image ELBO NLL and IW NLL in nats, float64 tensors (B,), from ``num_samples`` posterior samples."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _images_of(images)
    elbo, iw = [], []
    for part in images.split(chunk_size):
        per_pass = max(1, chunk_size // part.shape[0])
        lse = torch.full((part.shape[0],), -math.inf, dtype=torch.float64)
        total = torch.zeros(part.shape[0], dtype=torch.float64)
        done = 0
        while done < num_samples:
            k = min(per_pass, num_samples - done)
            log_w = model.log_weights(part, k).to(device="cpu", dtype=torch.float64)
            if log_w.shape != (k, part.shape[0]):
                raise ValueError(f"log_weights returned shape {tuple(log_w.shape)}, expected {(k, part.shape[0])}")
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
            total += log_w.sum(dim=0)
            done += k
        elbo.append(-total / num_samples)
        iw.append(-(lse - math.log(num_samples)))
    return {"elbo": torch.cat(elbo), "iw": torch.cat(iw)}


@torch.no_grad()
def evaluate_bpd(
    model: nn.Module,
    loader: Iterable,
    num_samples: int = 1,
    chunk_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Dataset-average ELBO and IW NLL in bpd (positive) over ``loader``, seeded and in eval mode.

    Returns ``{"elbo_bpd", "iw_bpd", "num_images", "num_samples"}``; ``iw_bpd`` equals ``elbo_bpd``
    up to sampling noise when ``num_samples`` is 1.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    elbo_sum = iw_sum = 0.0
    count, num_dims = 0, None
    try:
        cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_ids):
            batches = iter(loader)  # before seeding: creating a DataLoader iterator draws from the global RNG
            torch.manual_seed(seed)
            for batch in tqdm(batches, desc=f"bpd (K={num_samples})", disable=not progress, total=_length(loader)):
                images = _images_of(batch).to(device)
                dims = int(images[0].numel())
                if num_dims is not None and dims != num_dims:
                    raise ValueError(f"all images must have the same size, got {dims} and {num_dims} dims")
                num_dims = dims
                nll = image_nll(model, images, num_samples, chunk_size)
                elbo_sum += float(nll["elbo"].sum())
                iw_sum += float(nll["iw"].sum())
                count += images.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the loader yielded no images")
    return {
        "elbo_bpd": nats_to_bpd(elbo_sum / count, num_dims),
        "iw_bpd": nats_to_bpd(iw_sum / count, num_dims),
        "num_images": count,
        "num_samples": num_samples,
    }
