"""Pluggable top-down blocks of the hierarchical VAE and the block factories that build them.

The HVAE asks a *block factory* for each top-down block, in a fixed order: for every ladder layer
from the bottom (image) up, ``down_a`` then ``down_b``; finally ``output``. A factory is a callable

    make_block(role, in_ch, out_ch, scale, upsample) -> nn.Module

with ``role`` in ``ROLES``; ``scale`` is the resolution of the ladder layer (its bottom-up input, i.e.
its top-down output; the image size for ``output``); ``upsample`` is True only for the ``down_b``
block of a layer that resamples (it must then map (B, in, s/2, s/2) -> (B, out, s, s)). Every other
block keeps the spatial size. Factories may keep state (the SDN factory cycles directions and shrinks
F), so one factory instance builds exactly one model. The SDN and conv factories live here because
the model itself is defined by them.

Decoder blocks are chosen by name: ``@register_blocks(name)`` registers a *builder*
``builder(config) -> BlockFactory`` (called once per model), ``block_builder(name)`` looks it up and
``registered_blocks()`` lists the names. The library registers nothing itself: the study's
variants register on ``import baselines`` (``docs/baselines.md``), any other code may register its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.nn.functional as F
from torch import nn

from sdn.layers import ResSDNLayer

ROLES: tuple[str, ...] = ("down_a", "down_b", "output")


class BlockFactory(Protocol):
    """Builds one top-down block; see the module docstring for the call order and shapes."""

    def __call__(self, role: str, in_ch: int, out_ch: int, scale: int, upsample: bool) -> nn.Module: ...


BlockBuilder = Callable[[Any], BlockFactory]
_REGISTRY: dict[str, BlockBuilder] = {}


def register_blocks(name: str) -> Callable[[BlockBuilder], BlockBuilder]:
    """Decorator: register ``builder(config) -> BlockFactory`` under ``name`` (names are unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"decoder-block name must be a non-empty string, got {name!r}")

    def decorate(builder: BlockBuilder) -> BlockBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"decoder blocks {name!r} are already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = builder
        return builder

    return decorate


def unregister_blocks(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive use); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def registered_blocks() -> list[str]:
    """Sorted names of all registered decoder blocks."""
    return sorted(_REGISTRY)


def block_builder(name: str) -> BlockBuilder:
    """The builder registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not _REGISTRY:
        raise ValueError(
            f"no decoder blocks are registered, so {name!r} is unknown: `import baselines` first (the study's "
            "variants register themselves on import), or register yours with "
            "@sdn.models.blocks.register_blocks(name) (docs/baselines.md)"
        )
    raise ValueError(
        f"unknown decoder blocks {name!r}; registered: {sorted(_REGISTRY)} (a new variant registers itself with "
        "@sdn.models.blocks.register_blocks(name) in a module that must be imported first, e.g. baselines/<name>.py)"
    )


def check_block_request(role: str, in_ch: int, out_ch: int, scale: int, upsample: bool) -> None:
    """Validate a factory call (shared by all factories so bad requests fail the same way)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("scale", scale)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if upsample and role != "down_b":
        raise ValueError(f"only role 'down_b' may upsample, got role {role!r} with upsample=True")


def conv_geometry(upsample: bool) -> tuple[int, int, int]:
    """(kernel, stride, padding): 4/2/1 conv-transpose when upsampling by 2, else 3/1/1."""
    return (4, 2, 1) if upsample else (3, 1, 1)


def plain_conv(in_ch: int, out_ch: int, upsample: bool = False) -> nn.Module:
    """Conv3x3 (same size) or ConvTranspose k4 s2 p1 (x2 upsampling)."""
    k, s, p = conv_geometry(upsample)
    return (nn.ConvTranspose2d if upsample else nn.Conv2d)(in_ch, out_ch, k, s, p)


class ConvBlockFactory:
    """The CNN baseline: every top-down block is a single (transposed) convolution."""

    def __call__(self, role: str, in_ch: int, out_ch: int, scale: int, upsample: bool) -> nn.Module:
        check_block_request(role, in_ch, out_ch, scale, upsample)
        return plain_conv(in_ch, out_ch, upsample)


class SDNBlockFactory:
    """The SDN-VAE: ResSDN blocks at scales in [sdn_min_scale, sdn_max_scale], convs elsewhere.

    Directions are handed out cyclically over the official indices 0..3, ``num_dirs`` per block
    (with 2: down_a gets [0, 1], down_b [2, 3]); F starts at ``nfeat_0`` and shrinks by
    ``nfeat_diff`` (floor ``nfeat_floor``) after each resampling SDN layer. The output block is a
    4-direction ResSDN with ``nfeat_0`` features when the image scale is within range, else a conv.
    """

    def __init__(
        self,
        min_scale: int,
        max_scale: int,
        nfeat_0: int,
        nfeat_diff: int,
        num_dirs: int,
        nfeat_floor: int = 50,
    ) -> None:
        if num_dirs not in (0, 1, 2, 3, 4):
            raise ValueError(f"num_dirs must be in 0..4, got {num_dirs!r}")
        if num_dirs > 0 and nfeat_0 < 1:
            raise ValueError(f"nfeat_0 must be positive when SDN is enabled, got {nfeat_0!r}")
        self.min_scale, self.max_scale = min_scale, max_scale
        self.nfeat_0, self.nfeat_diff, self.nfeat_floor = nfeat_0, nfeat_diff, nfeat_floor
        self.num_dirs = num_dirs
        self._num_features = nfeat_0
        self._next_dir = 0

    def uses_sdn(self, scale: int) -> bool:
        """Whether a block at this scale is an SDN block."""
        return self.num_dirs > 0 and self.min_scale <= scale <= self.max_scale

    def _take_dirs(self, count: int) -> list[int]:
        dirs = [(self._next_dir + i) % 4 for i in range(count)]
        self._next_dir = (self._next_dir + count) % 4
        return dirs

    def __call__(self, role: str, in_ch: int, out_ch: int, scale: int, upsample: bool) -> nn.Module:
        check_block_request(role, in_ch, out_ch, scale, upsample)
        if not self.uses_sdn(scale):
            return plain_conv(in_ch, out_ch, upsample)
        k, s, p = conv_geometry(upsample)
        if role == "output":
            return ResSDNLayer(in_ch, out_ch, self.nfeat_0, self._take_dirs(4), k, s, p, upsample)
        block = ResSDNLayer(in_ch, out_ch, self._num_features, self._take_dirs(self.num_dirs), k, s, p, upsample)
        if role == "down_b" and upsample:
            self._num_features = max(self.nfeat_floor, self._num_features - self.nfeat_diff)
        return block


class HiddenConvBlock(nn.Module):
    """A two-conv block with a free hidden width: conv(in -> width) -> ELU -> Conv3x3(width -> out).

    The first conv resamples when ``upsample`` (conv-transpose k4 s2 p1), like the block it replaces.
    Its parameter count is linear in ``width``, which the parameter-matched baseline exploits.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int, upsample: bool = False) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.first = plain_conv(in_ch, width, upsample)
        self.second = nn.Conv2d(width, out_ch, 3, 1, 1)

    def forward(self, x):
        return self.second(F.elu(self.first(x)))


class HiddenConvBlockFactory:
    """Conv decoder where every block that the SDN factory would make SDN is a ``HiddenConvBlock``."""

    def __init__(self, sdn_factory: SDNBlockFactory, width: int) -> None:
        self.sdn_factory = sdn_factory
        self.width = width

    def __call__(self, role: str, in_ch: int, out_ch: int, scale: int, upsample: bool) -> nn.Module:
        check_block_request(role, in_ch, out_ch, scale, upsample)
        if self.sdn_factory.uses_sdn(scale):
            return HiddenConvBlock(in_ch, out_ch, self.width, upsample)
        return plain_conv(in_ch, out_ch, upsample)
