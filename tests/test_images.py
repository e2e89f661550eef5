"""``sdn.images.save_image_grid``: the one grid writer, byte-identical to torchvision's ``save_image``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from sdn.images import save_image_grid


@pytest.mark.parametrize(("channels", "num", "nrow", "padding", "pad_value"),
                         [(3, 10, 8, 2, 0.0), (1, 64, 8, 2, 1.0), (3, 16, 4, 1, 0.0)])
def test_grid_matches_torchvision_for_uint8_numpy_and_float_inputs(tmp_path, channels, num, nrow, padding, pad_value):
    images = torch.randint(0, 256, (num, channels, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = tmp_path / "reference.png"
    save_image(images.float() / 255.0, reference, nrow=nrow, padding=padding, pad_value=pad_value)
    for i, given in enumerate((images, images.numpy(), images.float() / 255.0)):
        path = save_image_grid(given, tmp_path / "sub" / f"grid{i}.png", nrow=nrow, padding=padding, pad_value=pad_value)
        assert path.read_bytes() == reference.read_bytes()
    with Image.open(path) as grid:
        cols, rows = min(nrow, num), -(-num // nrow)
        assert grid.size == (cols * (6 + padding) + padding, rows * (6 + padding) + padding)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["grid0.png", "grid1.png", "grid2.png"]  # no temp files


def test_grid_rejects_a_single_image(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        save_image_grid(np.zeros((3, 4, 4), dtype=np.uint8), tmp_path / "x.png")
