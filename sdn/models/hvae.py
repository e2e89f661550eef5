"""The density model of the SDN paper: an IAF-VAE-style bidirectional ladder VAE (section 2 of the
reference notes) whose top-down blocks come from a pluggable block factory (``sdn/models/blocks.py``),
its architecture config ``HVAEConfig`` with the named ``PRESETS``, and ``build_hvae``.

Contract (docs/architecture.md): ``forward(uint8 images) -> {"loss", "bpd", "kl", "recon"}``,
``sample(num, temperature, generator) -> uint8``, ``log_weights(images, K) -> float64 (K, B)``, and for
``sdn.scores`` the split evaluation pass: ``posterior_features`` (bottom-up, once per image) and
``log_weights_from_features`` (top-down, per posterior sample with given noise).
Departures from the official code, on purpose: free bits are ``max(batch-mean KL, free_bits)`` per
layer (the official code divides the correction by the batch size); the DML is normalised exactly
(see ``sdn/likelihoods.py``); the IAF mask is applied functionally (the official code edits the weights).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sdn._config import ConfigBase, FiniteFloat, NonNegInt, OneOf, PositiveInt, config_dataclass
from sdn.likelihoods import DiscretizedMixtureLogistics, gaussian_log_prob, nats_to_bpd, preprocess, unit_interval_to_uint8
from sdn.models.blocks import BlockFactory, block_builder, conv_geometry
from sdn.models.iaf import IAFStep, context_channels


@config_dataclass
class HVAEConfig(ConfigBase):
    """Architecture and likelihood of one density model, and the seed of its initial weights.

    ``hflip`` tells the data side to apply random horizontal flips (the model never flips).
    Optimisation settings (lr, decay, EMA, batch) are the trainer's (``sdn.training.TrainConfig``).
    """

    name: str
    image_size: PositiveInt
    channels: Annotated[int, OneOf(1, 3)] = 3
    bits: Annotated[int, Field(ge=1, le=8)] = 8
    depth: PositiveInt = 15
    ds_list: Annotated[tuple[NonNegInt, ...], Field(strict=False)] = (5, 10)  # a list becomes a tuple
    h_size: PositiveInt = 200
    z_size: PositiveInt = 4
    iaf_context: PositiveInt = 100
    # Free bits act on each layer's KL mean over the micro-batch of one rank (the official per-GPU batch),
    # the one term of the objective that depends on how a global batch is split; 0: no clamp (plain ELBO).
    free_bits: Annotated[FiniteFloat, Field(ge=0)] = 0.01
    mixtures: PositiveInt = 5
    sdn_min_scale: NonNegInt = 0
    sdn_max_scale: NonNegInt = 32
    sdn_nfeat_0: NonNegInt = 360
    sdn_nfeat_diff: NonNegInt = 128
    sdn_num_dirs: Annotated[int, Field(ge=0, le=4)] = 2
    sdn_nfeat_floor: PositiveInt = 50
    seed: NonNegInt = 1234
    hflip: bool = True

    @model_validator(mode="after")
    def _check_ladder(self) -> HVAEConfig:
        if any(i >= self.depth for i in self.ds_list):
            raise ValueError(f"HVAEConfig.ds_list must hold layer indices in 0..{self.depth - 1}, got {self.ds_list!r}")
        if self.image_size % (2 ** len(self.ds_list)) != 0:
            raise ValueError(f"HVAEConfig.image_size {self.image_size} must be divisible by "
                             f"2**len(ds_list) = {2 ** len(self.ds_list)}")
        return self

    @property
    def num_dims(self) -> int:
        """C * H * W, the dimensionality used for bits per dim."""
        return self.channels * self.image_size * self.image_size


# The paper's configs follow the official scripts (djordjemila/sdn) at the revisions named below;
# earlier revisions differ (docs/pipeline.md, "Which official revision"). Their optimisation
# settings (lr, lr decay, EMA, GPUs x per-GPU batch) are in params-paper.yaml's train sections.
PRESETS: dict[str, HVAEConfig] = {
    # train_cifar.sh at e70fddd2810df924ec2aa4cfbda1a373d031422d (SDN line; the CNN line: sdn_max_scale 0)
    "cifar10": HVAEConfig(
        name="cifar10", image_size=32, bits=8, depth=15, ds_list=(5, 10), h_size=200, z_size=4,
        sdn_max_scale=32, sdn_nfeat_0=360, sdn_nfeat_diff=128, sdn_num_dirs=2, mixtures=5, seed=1234, hflip=True,
    ),
    # train_imagenet.sh at 4e0d8685ac130d1b8c72f316c882d81dea2a5c83
    "imagenet32": HVAEConfig(
        name="imagenet32", image_size=32, bits=8, depth=16, ds_list=(3, 7, 11), h_size=200, z_size=4,
        sdn_max_scale=32, sdn_nfeat_0=424, sdn_nfeat_diff=0, sdn_num_dirs=3, mixtures=10, seed=13, hflip=False,
    ),
    # train_celeb.sh at e70fddd2810df924ec2aa4cfbda1a373d031422d
    "celebahq256": HVAEConfig(
        name="celebahq256", image_size=256, bits=5, depth=17, ds_list=(4, 7, 9, 11, 13, 15), h_size=200,
        z_size=8, sdn_max_scale=64, sdn_nfeat_0=400, sdn_nfeat_diff=80, sdn_num_dirs=2, mixtures=30,
        seed=1234, hflip=True,
    ),
    # The miniature of the embedded study (CPU): 16x16 patches, a two-rung ladder (latents at 8x8
    # and 4x4), SDN at 8x8 and below, everything narrow. Chosen on the validation split of
    # patches32 (docs/tuning.md): small enough that cosine-scheduled runs flatten within the
    # two-core budget.
    "embedded": HVAEConfig(
        name="embedded", image_size=16, bits=8, depth=2, ds_list=(0, 1), h_size=16, z_size=4,
        iaf_context=16, sdn_max_scale=8, sdn_nfeat_0=16, sdn_nfeat_diff=0, sdn_num_dirs=2, mixtures=5,
        seed=1234, hflip=True,
    ),
    # For unit tests and smoke runs: 8x8 images, every piece present (SDN, resampling, IAF, DML).
    "tiny": HVAEConfig(
        name="tiny", image_size=8, bits=8, depth=3, ds_list=(1,), h_size=8, z_size=2, iaf_context=4,
        sdn_max_scale=8, sdn_nfeat_0=8, sdn_nfeat_diff=0, sdn_num_dirs=2, mixtures=2, seed=0, hflip=False,
    ),
}


def get_config(name: str, **overrides) -> HVAEConfig:
    """The preset ``name``, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown HVAE config {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``; drawn from ``generator`` (on its device) when given."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _gated_residual(skip: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """(1 - sigma(g - 1)) * skip + sigma(g - 1) * h for (h, g) = update split in two.

    Under autocast ``update`` may be fp16/bf16 while ``skip`` is fp32: both are promoted to the wider
    type (lerp has no autocast rule), so the residual stream keeps its precision.
    """
    h, g = update.chunk(2, dim=1)
    dtype = torch.promote_types(skip.dtype, h.dtype)
    return torch.lerp(skip.to(dtype), h.to(dtype), torch.sigmoid(g - 1.0).to(dtype))


class LadderLayer(nn.Module):
    """One rung: a convolutional bottom-up step and a stochastic top-down step with an IAF posterior."""

    def __init__(
        self, h_size: int, z_size: int, context: int, downsample: bool, down_a: nn.Module, down_b: nn.Module, top: bool = False
    ) -> None:
        super().__init__()
        self.h_size, self.z_size, self.context = h_size, z_size, context
        self.q_size = 2 * z_size + context  # posterior mean, log-variance, IAF context
        self.downsample = downsample
        self.top = top
        k, s, p = conv_geometry(downsample)  # same 4/2/1 geometry, as a strided conv
        # The top layer's bottom-up features are never used (the top-down pass starts from the
        # learned h-vector), so it only computes posterior parameters; the official code kept the
        # dead weights, which would leave parameters without gradients under DDP.
        self.up_a = nn.Conv2d(h_size, (0 if top else h_size) + self.q_size, k, s, p)
        self.up_b = None if top else nn.Conv2d(h_size, 2 * h_size, 3, 1, 1)
        self.down_a = down_a  # h -> h + q_size + 2 z
        self.down_b = down_b  # z + h -> 2 h (upsampling when the layer resamples)
        self.iaf = IAFStep(z_size, context)

    def up(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Bottom-up step: returns (next features or None for the top layer, posterior parameters)."""
        if self.top:
            return None, self.up_a(F.elu(x))
        h, q_up = self.up_a(F.elu(x)).split([self.h_size, self.q_size], dim=1)
        skip = F.interpolate(x, scale_factor=0.5, mode="nearest") if self.downsample else x
        return _gated_residual(skip, self.up_b(F.elu(h))), q_up

    def down(
        self,
        x: torch.Tensor,
        q_up: torch.Tensor | None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-down step. With ``q_up`` z comes from the posterior and the per-image one-sample KL
        log q(z|x) - log p(z) (B,) is returned; without, z comes from the prior at ``temperature``.
        The posterior's standard normal noise is ``noise`` (B, z, H, W) when given, else drawn."""
        out = self.down_a(F.elu(x))
        h_det, q_down, p_params = out.split([self.h_size, self.q_size, 2 * self.z_size], dim=1)
        p_mean, p_logvar = p_params.chunk(2, dim=1)
        if q_up is None:
            z = p_mean + torch.exp(0.5 * p_logvar) * temperature * _randn(p_mean, generator)
            kl = None
        else:
            q_mean, q_logvar, context = (q_up + q_down).split([self.z_size, self.z_size, self.context], dim=1)
            eps = _randn(q_mean, generator) if noise is None else noise.to(q_mean.device, q_mean.dtype)
            z0 = q_mean + torch.exp(0.5 * q_logvar) * eps
            z, log_scale = self.iaf(z0, context)
            log_q = gaussian_log_prob(z0, q_mean, q_logvar) + log_scale
            log_p = gaussian_log_prob(z, p_mean, p_logvar)
            kl = (log_q - log_p).flatten(1).sum(dim=1)
        skip = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.downsample else x
        return _gated_residual(skip, self.down_b(F.elu(torch.cat([z, h_det], dim=1)))), kl


class HierarchicalVAE(nn.Module):
    """Bidirectional ladder VAE over uint8 images with a discretized-mixture-of-logistics likelihood."""

    def __init__(self, config: HVAEConfig, block_factory: BlockFactory) -> None:
        super().__init__()
        self.config = config
        c = config
        self.likelihood = DiscretizedMixtureLogistics(c.mixtures, c.channels, c.bits)
        context = context_channels(c.z_size, c.iaf_context)
        q_size = 2 * c.z_size + context
        self.first = nn.Conv2d(c.channels, c.h_size, 3, 1, 1)
        layers, scale = [], c.image_size
        for i in range(c.depth):
            downsample = i in c.ds_list and scale > 1
            down_a = block_factory("down_a", c.h_size, c.h_size + q_size + 2 * c.z_size, scale, False)
            down_b = block_factory("down_b", c.h_size + c.z_size, 2 * c.h_size, scale, downsample)
            layers.append(LadderLayer(c.h_size, c.z_size, context, downsample, down_a, down_b, top=i == c.depth - 1))
            scale = scale // 2 if downsample else scale
        self.layers = nn.ModuleList(layers)
        self.top_size = scale
        self.h_top = nn.Parameter(torch.zeros(c.h_size))
        self.output = block_factory("output", c.h_size, self.likelihood.num_params, c.image_size, False)
        _init_and_weight_norm(self)

    def _top_input(self, batch: int) -> torch.Tensor:
        """The learned h-vector broadcast over the top map: (batch, h, top, top)."""
        return self.h_top.view(1, -1, 1, 1).expand(batch, -1, self.top_size, self.top_size)

    # ----------------------------------------------------------------- inference
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 images of shape (B, {', '.join(map(str, expected))}), got "
                f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
            )

    def _bottom_up(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The deterministic encoder pass: (preprocessed images, each layer's posterior parameters,
        bottom layer first). Only the posterior parameters outlive the loop."""
        self._check_images(images)
        x = preprocess(images, self.config.bits, self.h_top.dtype).to(self.h_top.device)
        h = self.first(x)
        q_ups = []
        for layer in self.layers:
            h, q_up = layer.up(h)
            q_ups.append(q_up)
        return x, q_ups

    def _top_down(self, x: torch.Tensor, q_ups: list[torch.Tensor], rows: torch.Tensor | None = None,
                  generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(log p(x|z) per row, per-layer KL samples, top layer first) of the top-down pass.

        Row p is image ``rows[p]`` of the bottom-up outputs (every image once when ``rows`` is None).
        Each layer's posterior parameters are gathered for the rows just before its step, so only
        one layer's repeated copy is alive at a time. The posterior noise is ``noise`` (rows,
        ``posterior_noise_size``) when given, else drawn layer by layer (from ``generator``).
        """
        if rows is not None:
            x = x.index_select(0, rows)
        steps = self._split_noise(noise) if noise is not None else [None] * len(self.layers)
        h = self._top_input(x.shape[0])
        kls = []
        for layer, q_up, eps in zip(reversed(self.layers), reversed(q_ups), steps):
            h, kl = layer.down(h, q_up if rows is None else q_up.index_select(0, rows), generator=generator, noise=eps)
            kls.append(kl)
        params = self.output(F.elu(h))
        with torch.autocast(device_type=params.device.type, enabled=False):  # likelihood in float32 under AMP
            log_px = self.likelihood.log_prob(params.float(), x.float())
        return log_px, [kl.float() for kl in kls]

    def _elbo_terms(self, images: torch.Tensor, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(log p(x|z) per image (B,), list of per-layer KL samples, top layer first): one posterior
        sample per image, its noise ``noise`` (B, ``posterior_noise_size``) or drawn."""
        x, q_ups = self._bottom_up(images)
        return self._top_down(x, q_ups, generator=generator, noise=noise)

    @property
    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """(z, H, W) of the posterior noise of each top-down step, top layer first."""
        shapes, scale = [], self.top_size
        for layer in reversed(self.layers):
            shapes.append((self.config.z_size, scale, scale))
            scale = scale * 2 if layer.downsample else scale
        return shapes

    @property
    def posterior_noise_size(self) -> int:
        """Standard normal values one posterior sample uses (all layers, flattened top layer first)."""
        return sum(z * h * w for z, h, w in self.noise_shapes)

    def _split_noise(self, noise: torch.Tensor) -> list[torch.Tensor]:
        """Flat per-sample noise (P, posterior_noise_size) as one (P, z, H, W) view per top-down step."""
        if noise.dim() != 2 or noise.shape[1] != self.posterior_noise_size:
            raise ValueError(f"posterior noise must be (P, {self.posterior_noise_size}), got {tuple(noise.shape)}")
        sizes = [z * h * w for z, h, w in self.noise_shapes]
        return [part.view(-1, *shape) for part, shape in zip(noise.split(sizes, dim=1), self.noise_shapes)]

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean training objective (nats/image, free bits per layer) and ELBO diagnostics; the
        posterior sample of image b uses ``noise[b]`` (B, ``posterior_noise_size``) when given (the
        trainer draws it per image), else noise from the global RNG."""
        log_px, kls = self._elbo_terms(images, noise=noise)
        kl = torch.stack(kls).sum(dim=0)
        recon = -log_px.mean()
        if self.config.free_bits > 0:
            kl_objective = sum(torch.clamp(k.mean(), min=self.config.free_bits) for k in kls)
        else:  # the plain ELBO: a sum over images, so any split of a batch gives the same gradient
            kl_objective = kl.mean()
        return {
            "loss": recon + kl_objective,
            "bpd": nats_to_bpd((recon + kl.mean()).detach(), self.config.num_dims),
            "kl": kl.mean().detach(),
            "recon": recon.detach(),
        }

    @torch.no_grad()
    def posterior_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The bottom-up (encoder) pass of B images, to run once per image whatever the number of
        posterior samples: [preprocessed images, each layer's posterior parameters], each (B, ...)."""
        x, q_ups = self._bottom_up(images)
        return [x, *q_ups]

    @torch.no_grad()
    def log_weights_from_features(self, features: list[torch.Tensor], rows: torch.Tensor,
                                  noise: torch.Tensor) -> torch.Tensor:
        """log p(x|z) + log p(z) - log q(z|x), float64 (P,), of P posterior samples: sample p is of
        image ``rows[p]`` of ``features`` (:meth:`posterior_features`) with standard normal noise
        ``noise[p]`` (P, ``posterior_noise_size``). Only the top-down pass runs, on the P samples."""
        x, *q_ups = features
        if len(q_ups) != len(self.layers):
            raise ValueError(f"expected features of {len(self.layers)} layers, got {len(q_ups)}")
        if rows.dim() != 1 or noise.shape[0] != rows.shape[0]:
            raise ValueError(f"rows (P,) and noise (P, D) must agree, got {tuple(rows.shape)} and {tuple(noise.shape)}")
        log_px, kls = self._top_down(x, q_ups, rows=rows.to(x.device), noise=noise)
        return (log_px - torch.stack(kls).sum(dim=0)).double()

    @torch.no_grad()
    def log_weights(self, images: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(x|z_k) + log p(z_k) - log q(z_k|x) for k < num_samples, float64 (num_samples, B).

        The bottom-up pass runs once per image and the top-down pass once per sample, all in one
        batch of ``num_samples * B`` (sample-major rows, noise drawn layer by layer); chunking and
        per-image noise are ``sdn.scores``'s job.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        x, q_ups = self._bottom_up(images)
        batch = images.shape[0]
        rows = torch.arange(batch, device=x.device).repeat(num_samples) if num_samples > 1 else None
        log_px, kls = self._top_down(x, q_ups, rows=rows, generator=generator)
        log_w = log_px - torch.stack(kls).sum(dim=0)
        return log_w.double().view(num_samples, batch)

    @torch.no_grad()
    def sample(self, num: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral samples from the prior at ``temperature``; pixels are the argmax component's
        means (the official "most probable output"). Returns uint8 (num, C, H, W)."""
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        h = self._top_input(num)
        for layer in reversed(self.layers):
            h, _ = layer.down(h, None, temperature, generator)
        return unit_interval_to_uint8(self.likelihood.mode(self.output(F.elu(h))), self.config.bits)


def _init_and_weight_norm(model: nn.Module) -> None:
    """Orthogonal init of every conv weight (official), then weight norm on every conv.

    Uses ``torch.nn.utils.parametrizations.weight_norm`` (deepcopy/state_dict safe, so EMA copies
    work); conv-transposes are normalised over their output dim (dim=1). Meta tensors skip the init.
    """
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            if not module.weight.is_meta:
                nn.init.orthogonal_(module.weight)
            weight_norm(module, "weight", dim=1 if isinstance(module, nn.ConvTranspose2d) else 0)


def build_hvae(config: HVAEConfig, blocks: str, device: torch.device | str | None = None) -> HierarchicalVAE:
    """The HVAE with the top-down blocks registered as ``blocks`` (``sdn.models.blocks.register_blocks``).

    The initial weights depend only on ``config.seed``; torch's global RNG is left untouched.
    ``device="meta"`` builds without allocating memory (for parameter counts).
    """
    if not isinstance(config, HVAEConfig):
        raise ValueError(f"config must be an HVAEConfig, got {type(config).__name__}")
    make_factory = block_builder(blocks)
    where = torch.device(device) if device is not None else None
    forked = [where.index or 0] if where is not None and where.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(config.seed)
        factory = make_factory(config)
        with where if where is not None else nullcontext():
            return HierarchicalVAE(config, factory)
