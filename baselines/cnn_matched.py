"""``cnn_matched``: a CNN decoder widened until its parameter count matches the SDN model's.

Every top-down block that the SDN model makes a ResSDN becomes a ``HiddenConvBlock``
(conv -> ELU -> conv with a free hidden width); all other blocks stay as in the CNN baseline. The
model's parameter count is affine in that width, so two meta-device builds fix the line and the
width is solved for, then checked to lie within ``TOLERANCE`` of the SDN model's count. Nothing is
allocated: models are built on the meta device.
"""

from __future__ import annotations

import functools

import torch

from baselines.sdn import sdn_factory_for
from sdn.models import count_parameters
from sdn.models.blocks import HiddenConvBlockFactory, register_blocks
from sdn.models.hvae import HierarchicalVAE, HVAEConfig

TOLERANCE = 0.05  # relative parameter-count mismatch allowed


def _count(config: HVAEConfig, factory) -> int:
    with torch.device("meta"):
        return count_parameters(HierarchicalVAE(config, factory))


@functools.lru_cache(maxsize=32)
def matched_width(config: HVAEConfig) -> int:
    """Hidden width of the widened conv blocks whose model is within 5% of the SDN model's size."""
    target = _count(config, sdn_factory_for(config))
    c1 = _count(config, HiddenConvBlockFactory(sdn_factory_for(config), 1))
    c2 = _count(config, HiddenConvBlockFactory(sdn_factory_for(config), 2))
    slope = c2 - c1
    if slope == 0:  # no block is SDN in this config: the CNN already matches
        return 1
    width = max(1, round((target - (c1 - slope)) / slope))
    got = _count(config, HiddenConvBlockFactory(sdn_factory_for(config), width))
    if abs(got - target) > TOLERANCE * target:
        raise ValueError(
            f"cannot match {target} SDN parameters within {TOLERANCE:.0%} for config {config.name!r}: "
            f"best width {width} gives {got}"
        )
    return width


@register_blocks("cnn_matched")
def build_cnn_matched(config: HVAEConfig) -> HiddenConvBlockFactory:
    """Conv decoder with the SDN blocks replaced by parameter-matched two-conv blocks."""
    return HiddenConvBlockFactory(sdn_factory_for(config), matched_width(config))
