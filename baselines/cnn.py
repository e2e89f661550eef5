"""``cnn``: the official CNN baseline, the same model with SDN disabled (sdn_max_scale 0).

Like the paper's baseline it is *not* parameter-matched; see ``cnn_matched`` for that.
"""

from __future__ import annotations

from sdn.models.blocks import ConvBlockFactory, register_blocks
from sdn.models.hvae import HVAEConfig


@register_blocks("cnn")
def build_cnn(config: HVAEConfig) -> ConvBlockFactory:
    """Every top-down block is one (transposed) convolution."""
    return ConvBlockFactory()
