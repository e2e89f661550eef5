"""One inverse-autoregressive-flow step for the per-layer posterior of the HVAE (IAF-VAE style).

The autoregressive net is spatially masked (raster order over positions, all channels of a
position share a mask): a 3x3 'A' conv (centre excluded) plus the context, then [ELU, 3x3 'B' conv
(centre included)] x 2. Output at position p therefore depends only on z at positions before p, so
the Jacobian of z -> (z - 0.1 m) / exp(0.1 s) is triangular with diagonal exp(-0.1 s) and
log q(z_new) = log q(z) + sum(0.1 s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """Conv2d whose kernel is multiplied by a raster-order spatial mask ('A' excludes the centre).

    The mask is applied functionally in ``forward``, so it composes with weight-norm
    parametrizations and never edits the stored weight.
    """

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, 1, kernel_size // 2)
        mask = torch.ones(kernel_size, kernel_size)
        c = kernel_size // 2
        mask[c, c + (mask_type == "B"):] = 0
        mask[c + 1:] = 0
        self.register_buffer("mask", mask.expand(out_channels, in_channels, -1, -1).clone(), persistent=False)
        self.mask_type = mask_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class ARConvNet(nn.Module):
    """Masked conv net z, context -> (m, s), each (B, z, H, W), autoregressive over positions."""

    def __init__(self, z_size: int, context_size: int, num_layers: int = 2) -> None:
        super().__init__()
        self.z_size = z_size
        self.conv_a = MaskedConv2d("A", z_size, context_size)
        layers = []
        for i in range(num_layers):
            out = 2 * z_size if i == num_layers - 1 else context_size
            layers.append(MaskedConv2d("B", context_size, out))
        self.convs_b = nn.ModuleList(layers)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_a(z) + context
        for conv in self.convs_b:
            h = conv(F.elu(h))
        m, s = h.chunk(2, dim=1)
        return m, s


class IAFStep(nn.Module):
    """z -> (z - 0.1 m) / exp(0.1 s) with (m, s) = ARConvNet(z, context); returns (z_new, log-det term).

    The returned ``log_scale`` (elementwise 0.1 s) is what must be *added* to log q(z) to get
    log q(z_new).
    """

    def __init__(self, z_size: int, context_size: int) -> None:
        super().__init__()
        self.net = ARConvNet(z_size, context_size)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = self.net(z, context)
        log_scale = 0.1 * s
        return (z - 0.1 * m) * torch.exp(-log_scale), log_scale


def context_channels(z_size: int, context: int = 100) -> int:
    """Context width of the official IAF: max(context // z, 1) * z (a multiple of z)."""
    return max(context // z_size, 1) * z_size
