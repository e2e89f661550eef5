"""Writing image grids: the one PNG grid writer of the library (sample, data and FID grids)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_image_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 0.0,
) -> Path:
    """Save images (N, C, H, W) as one PNG grid of ``nrow`` images per row; returns the path.

    uint8 images (values 0..255, torch or NumPy) are scaled to [0, 1]; float images must already be
    in [0, 1]. ``padding`` pixels of ``pad_value`` (0 black, 1 white) separate the images; one
    channel is shown as grey. torchvision's ``save_image`` does the drawing. The file is written
    atomically (temporary file in the same directory, then renamed); parent directories are created.
    """
    from torchvision.utils import save_image

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, dtype=images.dtype))
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor or array, got {getattr(images, 'shape', type(images))}")
    batch = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        save_image(batch, tmp, nrow=nrow, padding=padding, pad_value=pad_value)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
