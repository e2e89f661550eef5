"""The SDN layer of Miladinović et al. (ICLR 2021): project-in, directional GRU sweeps, project-out.

Unlike the official code this works on non-square maps (each sweep walks its own axis length),
never writes into its input, and runs the sweeps through :func:`sdn.sweep.sweep_lines`, whose
hand-written backward avoids the per-line copies of an in-place loop, or — on CUDA when Triton is
available — through the persistent kernels of :mod:`sdn.sweep_triton` (one launch per sweep).
The environment variable ``SDN_SWEEP`` (``auto`` | ``plain`` | ``triton``) overrides the choice.

Precision: the sweeps run in the dtype of the surrounding autocast region (the official ``--amp``
runs ran ``nn.GRUCell`` under fp16 autocast): their matrix products take fp16/bf16 operands, the
state is stored in that dtype. Outside autocast they run in the input's dtype; fp32 stays exact
fp32 (the plain path's matmuls follow torch's TF32 setting, off by default; the kernels never
use TF32).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from sdn.sweep import sweep_lines
from sdn.sweep_triton import TRITON_AVAILABLE, triton_sweep_lines

__all__ = ["DIRECTIONS", "SWEEP_IMPLEMENTATIONS", "DirectionalSweep", "SDNLayer", "ResSDNLayer",
           "normalize_directions", "select_sweep"]

SWEEP_IMPLEMENTATIONS = ("auto", "plain", "triton")

# Official direction index -> name (index order of djordjemila/sdn).
DIRECTIONS: tuple[str, ...] = ("left_right", "right_left", "top_down", "bottom_up")

# name -> (axis the sweep walks, reverse order). "cols": lines are columns (walk along W).
_SWEEP_AXIS = {
    "left_right": ("cols", False),
    "right_left": ("cols", True),
    "top_down": ("rows", False),
    "bottom_up": ("rows", True),
}


def normalize_directions(directions: Iterable[str | int]) -> list[str]:
    """Map names or official indices (0..3) to direction names; reject unknown or empty lists."""
    if isinstance(directions, (str, int)):
        directions = [directions]
    names = []
    for direction in directions:
        if isinstance(direction, int) and not isinstance(direction, bool) and 0 <= direction < 4:
            names.append(DIRECTIONS[direction])
        elif isinstance(direction, str) and direction in _SWEEP_AXIS:
            names.append(direction)
        else:
            raise ValueError(
                f"unknown SDN direction {direction!r}: expected one of {list(DIRECTIONS)} "
                "or their official indices 0..3"
            )
    if not names:
        raise ValueError(f"SDN directions must be a non-empty sequence of {list(DIRECTIONS)}")
    return names


def _to_lines(x: Tensor, axis: str) -> Tensor:
    """(B, F, H, W) -> (S, L, B, F) view with lines along the first axis.

    Going through channels-last first keeps features contiguous, which makes the copy into the
    line layout (inside the sweep) a cheap block copy instead of a 4-byte gather.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    return x.permute(2, 3, 0, 1) if axis == "rows" else x.permute(3, 2, 0, 1)


def _from_lines(lines: Tensor, axis: str) -> Tensor:
    """Inverse of :func:`_to_lines`: a (B, F, H, W) tensor in channels-last memory format."""
    order = (2, 3, 0, 1) if axis == "rows" else (2, 3, 1, 0)
    return lines.permute(*order).contiguous(memory_format=torch.channels_last)


def _check_map(x: Tensor, channels: int, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{what} expects {channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
        )


def select_sweep(device: torch.device, implementation: str | None = None) -> Callable[..., Tensor]:
    """The sweep function for tensors on ``device``.

    ``implementation`` (default: the ``SDN_SWEEP`` environment variable, else ``auto``): ``plain``
    is :func:`sdn.sweep.sweep_lines` (the reference, used on CPU); ``triton`` the persistent
    kernels (compiled on CUDA, interpreted on CPU — slow, for tests; one operator on the meta
    device); ``auto`` picks ``triton`` on CUDA when Triton is importable, else ``plain``. The meta
    device counts as CUDA: it stands for the GPU a memory plan or launch count is made for.
    """
    choice = implementation or os.environ.get("SDN_SWEEP", "auto")
    if choice not in SWEEP_IMPLEMENTATIONS:
        raise ValueError(f"SDN_SWEEP must be one of {list(SWEEP_IMPLEMENTATIONS)}, got {choice!r}")
    if choice == "triton" and not TRITON_AVAILABLE:
        raise ValueError("SDN_SWEEP=triton needs the `triton` package, which is not importable")
    if choice == "auto":
        choice = "triton" if device.type in ("cuda", "meta") and TRITON_AVAILABLE else "plain"
    return triton_sweep_lines if choice == "triton" else sweep_lines


_AUTOCAST_DEVICES = ("cpu", "cuda")  # the meta device has no autocast


def _sweep_dtype(x: Tensor) -> torch.dtype:
    """The dtype the sweeps compute in: the autocast dtype inside autocast, else the input's."""
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _run_sweeps(x: Tensor, sweeps: Sequence["DirectionalSweep"]) -> Tensor:
    """Apply sweeps in order, converting layouts only when the sweep axis changes."""
    compute_dtype = _sweep_dtype(x)
    sweep_fn = select_sweep(x.device)
    # Autocast is off inside: the dtypes are set explicitly (operands, weights and state in the
    # autocast dtype), as autocast would have run nn.GRUCell.
    device_type = x.device.type
    with (torch.autocast(device_type=device_type, enabled=False)
          if device_type in _AUTOCAST_DEVICES else nullcontext()):
        lines, axis = None, None
        for sweep in sweeps:
            sweep_axis, reverse = _SWEEP_AXIS[sweep.direction]
            if lines is None:
                lines = _to_lines(x.to(compute_dtype), sweep_axis)
            elif sweep_axis != axis:  # rows (H, W, B, F) <-> columns (W, H, B, F)
                lines = lines.transpose(0, 1)
            axis = sweep_axis
            cell = sweep.cell
            lines = sweep_fn(
                lines,
                cell.weight_ih.to(compute_dtype),
                cell.weight_hh.to(compute_dtype),
                None if cell.bias_ih is None else cell.bias_ih.to(compute_dtype),
                None if cell.bias_hh is None else cell.bias_hh.to(compute_dtype),
                reverse=reverse,
            )
        return _from_lines(lines, axis).to(x.dtype)


class DirectionalSweep(nn.Module):
    """One directional sweep: every line is updated by a GRUCell from the updated previous line."""

    def __init__(self, num_features: int, direction: str | int) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        (self.direction,) = normalize_directions([direction])
        self.num_features = num_features
        self.cell = nn.GRUCell(3 * num_features, num_features)

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x, self.num_features, f"DirectionalSweep({self.direction})")
        return _run_sweeps(x, [self])

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, direction={self.direction!r}"


def _projection(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, upsample: bool
) -> nn.Module:
    conv = nn.ConvTranspose2d if upsample else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size, stride, padding)


class SDNLayer(nn.Module):
    """project_in (conv or conv-transpose) → tanh → directional sweeps → 1×1 project_out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_features: int,
        directions: Sequence[str | int],
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_features", num_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels = in_channels
        self.directions = normalize_directions(directions)
        self.project_in = _projection(
            in_channels, num_features, kernel_size, stride, padding, upsample
        )
        self.sweeps = nn.ModuleList(DirectionalSweep(num_features, d) for d in self.directions)
        self.project_out = nn.Conv2d(num_features, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x, self.in_channels, "SDNLayer")
        h = torch.tanh(self.project_in(x))
        return self.project_out(_run_sweeps(h, self.sweeps))


class ResSDNLayer(nn.Module):
    """Gated mix of an SDN layer and a parallel conv: σ(g)·conv(x) + (1 − σ(g))·y."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_features: int,
        directions: Sequence[str | int],
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.sdn = SDNLayer(
            in_channels, 2 * out_channels, num_features, directions,
            kernel_size, stride, padding, upsample,
        )
        self.conv = _projection(in_channels, out_channels, kernel_size, stride, padding, upsample)

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x, self.in_channels, "ResSDNLayer")
        y, g = self.sdn(x).chunk(2, dim=1)
        # lerp(y, c, σ(g)) = y + σ(g)(c − y) = σ(g)·c + (1 − σ(g))·y
        return torch.lerp(y, self.conv(x), torch.sigmoid(g))
