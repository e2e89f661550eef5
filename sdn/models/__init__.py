"""The models: ``hvae`` (the density model, ``build_hvae``), ``vanilla_vae`` (the disentanglement
VAE, ``build_vanilla_vae``), their blocks and likelihoods. This package module stays light: it
imports none of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements; works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
