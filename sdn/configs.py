"""Named configurations of the density model (the paper's three and a small CPU "embedded" one),
and ``build_model`` which turns a config and a registered model name into an ``nn.Module``.

Paper values follow the hyper-parameter table of the official scripts (paper Appendix; djordjemila/sdn).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HVAEConfig:
    """Architecture, likelihood and optimisation settings of one density-model run.

    ``batch_size`` is per device and ``num_devices`` the data-parallel width of the paper's run;
    ``hflip`` tells the data side to apply random horizontal flips (the model never flips).
    """

    name: str
    image_size: int
    channels: int = 3
    bits: int = 8
    depth: int = 15
    ds_list: tuple[int, ...] = (5, 10)
    h_size: int = 200
    z_size: int = 4
    iaf_context: int = 100
    free_bits: float = 0.01
    mixtures: int = 5
    sdn_min_scale: int = 0
    sdn_max_scale: int = 32
    sdn_nfeat_0: int = 360
    sdn_nfeat_diff: int = 128
    sdn_num_dirs: int = 2
    sdn_nfeat_floor: int = 50
    lr: float = 0.002
    lr_decay: float = 0.999
    ema: float = 0.999
    batch_size: int = 32
    num_devices: int = 8
    sampling_temperature: float = 0.85
    seed: int = 1234
    hflip: bool = True

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HVAEConfig.{name} must be a positive int, got {value!r}")

        for name in ("image_size", "depth", "h_size", "z_size", "iaf_context", "mixtures", "batch_size", "num_devices"):
            positive(name)
        if self.channels not in (1, 3):
            raise ValueError(f"HVAEConfig.channels must be 1 or 3, got {self.channels!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"HVAEConfig.bits must be an int in 1..8, got {self.bits!r}")
        object.__setattr__(self, "ds_list", tuple(self.ds_list))
        if any(not isinstance(i, int) or not 0 <= i < self.depth for i in self.ds_list):
            raise ValueError(f"HVAEConfig.ds_list must hold layer indices in 0..{self.depth - 1}, got {self.ds_list!r}")
        if self.image_size % (2 ** len(self.ds_list)) != 0:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**len(ds_list) = {2 ** len(self.ds_list)}")
        if self.sdn_num_dirs not in (0, 1, 2, 3, 4):
            raise ValueError(f"HVAEConfig.sdn_num_dirs must be in 0..4, got {self.sdn_num_dirs!r}")
        if self.free_bits < 0:
            raise ValueError(f"HVAEConfig.free_bits must be >= 0, got {self.free_bits!r}")

    @property
    def num_dims(self) -> int:
        """C * H * W, the dimensionality used for bits per dim."""
        return self.channels * self.image_size * self.image_size

    def replace(self, **changes) -> "HVAEConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown HVAEConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


# The paper's configs follow the official scripts (djordjemila/sdn) at the revisions named below;
# earlier revisions differ (docs/pipeline.md, "Which official revision").
CONFIGS: dict[str, HVAEConfig] = {
    # train_cifar.sh at e70fddd2810df924ec2aa4cfbda1a373d031422d (SDN line; the CNN line: sdn_max_scale 0)
    "cifar10": HVAEConfig(
        name="cifar10", image_size=32, bits=8, depth=15, ds_list=(5, 10), h_size=200, z_size=4,
        sdn_max_scale=32, sdn_nfeat_0=360, sdn_nfeat_diff=128, sdn_num_dirs=2, mixtures=5,
        lr=0.002, lr_decay=0.999, ema=0.999, batch_size=32, num_devices=8,
        sampling_temperature=0.85, seed=1234, hflip=True,
    ),
    # train_imagenet.sh at 4e0d8685ac130d1b8c72f316c882d81dea2a5c83
    "imagenet32": HVAEConfig(
        name="imagenet32", image_size=32, bits=8, depth=16, ds_list=(3, 7, 11), h_size=200, z_size=4,
        sdn_max_scale=32, sdn_nfeat_0=424, sdn_nfeat_diff=0, sdn_num_dirs=3, mixtures=10,
        lr=0.002, lr_decay=1.0, ema=0.9995, batch_size=32, num_devices=8,
        sampling_temperature=1.0, seed=13, hflip=False,
    ),
    # train_celeb.sh at e70fddd2810df924ec2aa4cfbda1a373d031422d
    "celebahq256": HVAEConfig(
        name="celebahq256", image_size=256, bits=5, depth=17, ds_list=(4, 7, 9, 11, 13, 15), h_size=200,
        z_size=8, sdn_max_scale=64, sdn_nfeat_0=400, sdn_nfeat_diff=80, sdn_num_dirs=2, mixtures=30,
        lr=0.001, lr_decay=0.999, ema=0.999, batch_size=4, num_devices=8,
        sampling_temperature=0.85, seed=1234, hflip=True,
    ),
    # The miniature of the embedded study (CPU): 16x16 patches, a two-rung ladder (latents at 8x8
    # and 4x4), SDN at 8x8 and below, everything narrow. Chosen on the validation split of
    # patches32 (docs/tuning.md): small enough that cosine-scheduled runs flatten within the
    # two-core budget; lr / EMA / batch are the study's training defaults.
    "embedded": HVAEConfig(
        name="embedded", image_size=16, bits=8, depth=2, ds_list=(0, 1), h_size=16, z_size=4,
        iaf_context=16, sdn_max_scale=8, sdn_nfeat_0=16, sdn_nfeat_diff=0, sdn_num_dirs=2, mixtures=5,
        lr=0.01, lr_decay=1.0, ema=0.99, batch_size=32, num_devices=1,
        sampling_temperature=0.85, seed=1234, hflip=True,
    ),
    # For unit tests and smoke runs: 8x8 images, every piece present (SDN, resampling, IAF, DML).
    "tiny": HVAEConfig(
        name="tiny", image_size=8, bits=8, depth=3, ds_list=(1,), h_size=8, z_size=2, iaf_context=4,
        sdn_max_scale=8, sdn_nfeat_0=8, sdn_nfeat_diff=0, sdn_num_dirs=2, mixtures=2,
        lr=0.002, lr_decay=1.0, ema=0.999, batch_size=4, num_devices=1,
        sampling_temperature=1.0, seed=0, hflip=False,
    ),
}


def get_config(name: str, **overrides) -> HVAEConfig:
    """The named config, optionally with some fields replaced."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; expected one of {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]


def build_model(config: HVAEConfig, model_name: str, device: torch.device | str | None = None) -> nn.Module:
    """Build the HVAE with the top-down blocks of the registered baseline ``model_name``.

    ``device="meta"`` builds without allocating memory (for parameter counts).
    """
    from baselines import get_block_factory
    from sdn.models.hvae import HierarchicalVAE

    if not isinstance(config, HVAEConfig):
        raise ValueError(f"config must be an HVAEConfig, got {type(config).__name__}")
    make_factory = get_block_factory(model_name)
    with torch.device(device) if device is not None else nullcontext():
        return HierarchicalVAE(config, make_factory(config))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements; works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

