"""``sdn``: the SDN-VAE itself (ResSDN top-down blocks at the configured scales)."""

from __future__ import annotations

from sdn.models.blocks import SDNBlockFactory, register_blocks
from sdn.models.hvae import HVAEConfig


def sdn_factory_for(config: HVAEConfig) -> SDNBlockFactory:
    """A fresh SDN block factory with the config's SDN settings."""
    return SDNBlockFactory(
        min_scale=config.sdn_min_scale,
        max_scale=config.sdn_max_scale,
        nfeat_0=config.sdn_nfeat_0,
        nfeat_diff=config.sdn_nfeat_diff,
        num_dirs=config.sdn_num_dirs,
        nfeat_floor=config.sdn_nfeat_floor,
    )


@register_blocks("sdn")
def build_sdn(config: HVAEConfig) -> SDNBlockFactory:
    """Block factory of the SDN model."""
    return sdn_factory_for(config)
