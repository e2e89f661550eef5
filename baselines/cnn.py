"""``cnn``: the official CNN baseline, the same model with SDN disabled (sdn_max_scale 0).

Like the paper's baseline it is *not* parameter-matched; see ``cnn_matched`` for that.
"""

from __future__ import annotations

from baselines import register_baseline
from sdn.configs import HVAEConfig
from sdn.models.blocks import ConvBlockFactory


@register_baseline("cnn")
def build_cnn(config: HVAEConfig) -> ConvBlockFactory:
    """Every top-down block is one (transposed) convolution."""
    return ConvBlockFactory()
