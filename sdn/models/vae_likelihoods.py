"""Single-component pixel likelihoods for the vanilla VAE: discretized logistic and Bernoulli.

Both map decoder outputs (one parameter per pixel channel) and uint8 images to per-image
log-likelihoods in nats, and can sample / take the mode. The discretized *mixture* of logistics
used by the density model lives in ``sdn/likelihoods.py``, which also holds the bin maths both use
(``discretized_logistic_bins``); this module is deliberately single-component.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sdn.likelihoods import discretized_logistic_bins

NUM_BINS = 256  # 8-bit pixels


def uint8_to_centered(images: torch.Tensor, num_bins: int = NUM_BINS) -> torch.Tensor:
    """Map bin indices 0..num_bins-1 to bin centres k/(num_bins-1) - 0.5 in [-0.5, 0.5]."""
    return images.to(torch.float32) / (num_bins - 1) - 0.5


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_bins: int = NUM_BINS
) -> torch.Tensor:
    """Elementwise log P(x) of a logistic(mean, exp(log_scale)) discretized into ``num_bins`` bins.

    ``x`` holds bin centres in [-0.5, 0.5] (spacing 1/(num_bins-1)). Bin k covers
    [x_k - h, x_k + h] with h = 1/(2(num_bins-1)); the first bin takes the whole lower tail and the
    last bin the whole upper tail, so the probabilities of all bins sum to exactly one
    (``sdn.likelihoods.discretized_logistic_bins``).
    """
    half_bin = 0.5 / (num_bins - 1)
    return discretized_logistic_bins(x - mean, torch.exp(-log_scale), half_bin,
                                     x < -0.5 + half_bin, x > 0.5 - half_bin)


def _check_images(images: torch.Tensor, params: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"expected a torch.uint8 image tensor, got {getattr(images, 'dtype', type(images))}")
    if images.shape != params.shape:
        raise ValueError(
            f"expected images of shape {tuple(params.shape)} (matching decoder params), got {tuple(images.shape)}"
        )


class DiscretizedLogistic(nn.Module):
    """Discretized logistic over 256 bins with one learned global log-scale; one mean per pixel channel.

    Data are scaled to [-0.5, 0.5] as in the paper's disentanglement model; the decoder output is
    the (unconstrained) mean; mass outside the data range goes to the edge bins.
    """

    params_per_channel = 1

    def __init__(self, init_log_scale: float = 0.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))

    def log_prob(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Log-likelihood (B,) in nats of uint8 ``images`` (B, C, H, W) given means ``params`` (B, C, H, W)."""
        _check_images(images, params)
        lp = discretized_logistic_log_prob(uint8_to_centered(images), params, self.log_scale)
        return lp.flatten(1).sum(1)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """Most probable bin per pixel, uint8.

        Among interior bins the one nearest the mean wins (symmetric unimodal density), but the edge
        bins carry the tails, so the nearest bin is compared with both edge bins.
        """
        params = params.detach()
        nearest = _centered_to_uint8(params)
        candidates = torch.stack([nearest, torch.zeros_like(nearest), torch.full_like(nearest, NUM_BINS - 1)])
        with torch.no_grad():
            lp = discretized_logistic_log_prob(uint8_to_centered(candidates), params, self.log_scale.detach())
        best = lp.argmax(dim=0, keepdim=True)
        return candidates.gather(0, best).squeeze(0)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The bin nearest the logistic mean per pixel, uint8: the picture of the decoder output."""
        return _centered_to_uint8(params)

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Exact sample: draw a continuous logistic value, then take the bin it falls in (tails clamp)."""
        u = torch.rand(params.shape, generator=generator, dtype=params.dtype, device=params.device)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        x = params + torch.exp(self.log_scale) * (torch.log(u) - torch.log1p(-u))
        return _centered_to_uint8(x)


def _centered_to_uint8(x: torch.Tensor, num_bins: int = NUM_BINS) -> torch.Tensor:
    """Bin index of continuous values in [-0.5, 0.5] space (values beyond the range clamp to edge bins)."""
    k = torch.round((x.detach() + 0.5) * (num_bins - 1))
    return k.clamp(0, num_bins - 1).to(torch.uint8)


class BernoulliLikelihood(nn.Module):
    """Independent Bernoulli per pixel channel for binary images stored as 0/255; params are logits."""

    params_per_channel = 1

    def log_prob(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Log-likelihood (B,) in nats of binary uint8 ``images`` (values 0 or 255) given logits ``params``."""
        _check_images(images, params)
        if not bool(((images == 0) | (images == 255)).all()):
            raise ValueError("Bernoulli likelihood expects binary images with values in {0, 255}")
        target = (images == 255).to(params.dtype)
        lp = -F.binary_cross_entropy_with_logits(params, target, reduction="none")
        return lp.flatten(1).sum(1)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """255 where the logit is positive (p > 0.5), else 0; uint8."""
        return ((params.detach() > 0).to(torch.uint8)) * 255

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The pixel probabilities sigmoid(logit) as grey levels round(255 p), uint8: unlike the
        mode, a blurry early decoder still shows where its shapes are."""
        return torch.round(torch.sigmoid(params.detach().float()) * 255.0).to(torch.uint8)

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Independent Bernoulli draws, returned as 0/255 uint8."""
        bits = torch.bernoulli(torch.sigmoid(params.detach()), generator=generator)
        return bits.to(torch.uint8) * 255


def build_likelihood(name: str) -> nn.Module:
    """``"logistic"`` -> :class:`DiscretizedLogistic`, ``"bernoulli"`` -> :class:`BernoulliLikelihood`."""
    if name == "logistic":
        return DiscretizedLogistic()
    if name == "bernoulli":
        return BernoulliLikelihood()
    raise ValueError(f"likelihood must be 'logistic' or 'bernoulli', got {name!r}")
