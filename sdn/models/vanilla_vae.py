"""The vanilla (beta-)VAE of the SDN paper's disentanglement study, with a CNN or an SDN decoder.

Encoder: four Conv(k4 s2 p1)+ReLU (C->32->32->64->64) -> Linear(1024 -> 2z), diagonal Gaussian
posterior, N(0, I) prior. Decoder: Linear(z->256)+ReLU -> Linear(256->1024)+ReLU -> 64x4x4 -> four
ConvTranspose(k4 s2 p1) blocks to 8, 16, 32, 64 (64->64->32->32->params). The ``sdn`` decoder
swaps the blocks at ``sdn_scales`` (default: the 32x32 one) for an upsampling ``SDNLayer``.

Differences from the official code, on purpose: the KL is the closed form (not a one-sample Monte
Carlo estimate), and the discretized logistic gives the edge bins the CDF tails (see
``vae_likelihoods``), so the likelihood is normalised over the 256 pixel values.
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import torch
from pydantic import Field
from torch import nn

from sdn._config import ConfigBase, FiniteFloat, NonNegInt, OneOf, PositiveInt, config_dataclass
from sdn.models.vae_likelihoods import build_likelihood

IMAGE_SIZE = 64
_DIRECTIONS = ("left_right", "right_left", "top_down", "bottom_up")
# (in_channels, out_channels, output scale) of the four decoder up-blocks; None = likelihood params.
_DECODER_BLOCKS = ((64, 64, 8), (64, 32, 16), (32, 32, 32), (32, None, 64))
_TOP_CHANNELS, _TOP_SIZE = 64, 4


@config_dataclass
class VAEConfig(ConfigBase):
    """Architecture and objective of the VAE, and the seed of its initial weights (optimisation
    settings are the trainer's, ``sdn.training.TrainConfig``)."""

    channels: PositiveInt = 3
    z_dim: PositiveInt = 10
    likelihood: Annotated[str, OneOf("logistic", "bernoulli")] = "logistic"  # RGB 256 bins | binary 0/255 data
    beta: Annotated[FiniteFloat, Field(ge=0)] = 1.0
    beta_anneal_steps: NonNegInt = 0  # 0: constant beta; N > 0: beta * min(1, step / N)
    # decoder block output scales replaced by SDN (sdn decoder only); a list becomes a tuple
    sdn_scales: Annotated[tuple[Annotated[int, OneOf(*(b[2] for b in _DECODER_BLOCKS))], ...], Field(strict=False)] = (32,)
    sdn_directions: Annotated[tuple[Annotated[str, OneOf(*_DIRECTIONS)], ...], Field(strict=False, min_length=1)] = (
        "left_right",
    )
    sdn_features: PositiveInt = 200
    seed: NonNegInt = 1234


PRESETS: dict[str, VAEConfig] = {
    # Paper setting (3DShapes, 64x64 RGB): z=10, beta=1, seed 1234 (Adamax lr 1e-3, batch 128: the
    # train section of params-paper.yaml).
    "shapes3d": VAEConfig(),
    # CPU-sized setting for the embedded procedural dSprites (1 channel, binary): a narrower SDN.
    "embedded": VAEConfig(channels=1, likelihood="bernoulli", sdn_features=32),
}


def get_config(name: str, **overrides) -> VAEConfig:
    """The preset ``name`` (``"shapes3d"`` or ``"embedded"``), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown VAE config {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _encoder(channels: int, z_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = (channels, 32, 32, 64, 64)
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(_TOP_CHANNELS * _TOP_SIZE * _TOP_SIZE, 2 * z_dim)]
    return nn.Sequential(*layers)


def _decoder(config: VAEConfig, use_sdn: bool, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Linear(config.z_dim, 256),
        nn.ReLU(),
        nn.Linear(256, _TOP_CHANNELS * _TOP_SIZE * _TOP_SIZE),
        nn.ReLU(),
        nn.Unflatten(1, (_TOP_CHANNELS, _TOP_SIZE, _TOP_SIZE)),
    ]
    for cin, cout, scale in _DECODER_BLOCKS:
        last = cout is None
        cout = out_channels if last else cout
        if use_sdn and scale in config.sdn_scales:
            from sdn.layers import SDNLayer  # only the sdn decoder needs the layer

            layers.append(
                SDNLayer(cin, cout, config.sdn_features, list(config.sdn_directions),
                         kernel_size=4, stride=2, padding=1, upsample=True)
            )
        else:
            layers.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VanillaVAE(nn.Module):
    """A beta-VAE on 64x64 uint8 images; ``forward`` returns the loss dict of docs/architecture.md."""

    def __init__(self, config: VAEConfig, decoder: str = "cnn") -> None:
        super().__init__()
        if decoder not in ("cnn", "sdn"):
            raise ValueError(f"decoder must be 'cnn' or 'sdn', got {decoder!r}")
        self.config = config
        self.decoder_kind = decoder
        self.likelihood = build_likelihood(config.likelihood)
        self.encoder = _encoder(config.channels, config.z_dim)
        self.decoder = _decoder(config, decoder == "sdn", config.channels * self.likelihood.params_per_channel)
        official_init(self)
        # Training steps taken; drives beta annealing and is saved in the state_dict for exact resume.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._dims = config.channels * IMAGE_SIZE * IMAGE_SIZE

    # -- helpers -------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.config.channels, IMAGE_SIZE, IMAGE_SIZE)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError(f"expected a torch.uint8 image batch, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (B>0, {shape}), got {tuple(images.shape)}")

    def current_beta(self) -> float:
        """beta, linearly annealed from 0 over ``beta_anneal_steps`` training steps when that is > 0."""
        n = self.config.beta_anneal_steps
        if n == 0:
            return float(self.config.beta)
        return float(self.config.beta) * min(1.0, int(self.step) / n)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, z_dim), of uint8 images (B, C, 64, 64)."""
        self._check_images(images)
        x = images.to(self.step.device, torch.float32) / 255.0 - 0.5
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (B, C, 64, 64) for latents (B, z_dim)."""
        return self.decoder(z)

    @staticmethod
    def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Closed-form KL(N(mean, exp(logvar)) || N(0, I)) per row, summed over latent dims."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)

    # -- contract ------------------------------------------------------------------------------
    @property
    def posterior_noise_size(self) -> int:
        """Standard normal values one posterior sample uses (the latent size)."""
        return self.config.z_dim

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean loss (recon NLL + beta*KL, nats/image) plus recon, kl, elbo, bpd and beta; the
        posterior sample of image b uses ``noise[b]`` (B, z_dim) when given, else the global RNG."""
        if self.training:
            self.step += 1
        mean, logvar = self.encode(images)
        # The objective is computed in float32 even under bf16 autocast (sums over 12k pixels).
        mean, logvar = mean.float(), logvar.float()
        if noise is None:
            noise = torch.randn_like(mean)
        elif noise.shape != mean.shape:
            raise ValueError(f"posterior noise must be {tuple(mean.shape)}, got {tuple(noise.shape)}")
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        recon = -self.likelihood.log_prob(self.decode(z).float(), images.to(mean.device))
        kl = self.kl_to_standard_normal(mean, logvar)
        beta = self.current_beta()
        elbo = -(recon + kl)
        # Only "loss" carries the graph; the rest are detached values for logging.
        return {
            "loss": (recon + beta * kl).mean(),
            "recon": recon.detach().mean(),
            "kl": kl.detach().mean(),
            "elbo": elbo.detach().mean(),
            "bpd": -elbo.detach().mean() / (self._dims * math.log(2.0)),
            "beta": torch.tensor(beta, device=mean.device),
        }

    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used by the disentanglement metrics: the posterior mean (B, z_dim)."""
        return self.encode(images)[0].float()

    @torch.no_grad()
    def sample(
        self,
        num: int,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
        pixels: str = "mean",
    ) -> torch.Tensor:
        """``num`` images, uint8 (num, C, 64, 64), decoded from z ~ N(0, temperature^2 I).

        ``pixels`` says what each image shows of p(x|z): ``"mean"`` (default; pixel probabilities
        as grey levels for Bernoulli, the nearest bin to the mean for the logistic), ``"mode"`` (the
        most probable image, as the official code shows samples) or ``"sample"`` (pixels drawn).
        """
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        device = self.step.device
        gen_device = generator.device if generator is not None else device
        z = torch.randn((num, self.config.z_dim), generator=generator, device=gen_device).to(device)
        return self._pixels(self.decode(z * temperature), pixels, generator)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pixels: str = "mean") -> torch.Tensor:
        """Decoded posterior means of uint8 ``images``, uint8 of the same shape (``pixels`` as in
        :meth:`sample`): what the latent code keeps of each input."""
        return self._pixels(self.decode(self.encode_mean(images)), pixels, None)

    def _pixels(self, params: torch.Tensor, pixels: str, generator: Optional[torch.Generator]) -> torch.Tensor:
        if pixels == "mean":
            return self.likelihood.mean_image(params)
        if pixels == "mode":
            return self.likelihood.mode(params)
        if pixels == "sample":
            gen_device = generator.device if generator is not None else params.device
            return self.likelihood.sample(params.to(gen_device), generator=generator).to(params.device)
        raise ValueError(f"pixels must be 'mean', 'mode' or 'sample', got {pixels!r}")


def official_init(module: nn.Module) -> None:
    """The official code's ``weights_init``: orthogonal Conv2d/ConvTranspose2d weights, N(0, 0.02)
    Linear weights, zero biases (the SDN layer's own GRU cell keeps its initialisation)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.orthogonal_(layer.weight)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        else:
            continue
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def build_vanilla_vae(config: VAEConfig, decoder: str = "cnn") -> VanillaVAE:
    """A :class:`VanillaVAE` whose initial weights depend only on ``config.seed`` (global RNG untouched)."""
    if not isinstance(config, VAEConfig):
        raise ValueError(f"config must be a VAEConfig, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return VanillaVAE(config, decoder)

