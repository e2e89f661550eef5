"""dSprites rendered from its definition, with exact factor labels (no download).

Factors (as the official dSprites): shape {square, ellipse, heart} (3), scale linspace(0.5, 1, 6),
orientation linspace(0, 2*pi, 40), posX and posY linspace(0, 1, 32); 64x64 binary images, stored
as 0/255. The full grid has 3*6*40*32*32 = 737280 images, enumerated in C order (posY fastest).

Geometry (this suite's definition; the official sprites are similar, not pixel-identical):
pixel (row r, col c) has its centre at x = c + 0.5, y = r + 0.5. The sprite centre is at
x0 = 12 + 40 * posX, y0 = 12 + 40 * posY (posY grows downwards, like image rows). A pixel is on
when its centre, mapped into the sprite frame, lies in the shape: with dx = x - x0, dy = y0 - y
(up), u = (cos t * dx + sin t * dy) / a, v = (-sin t * dx + cos t * dy) / a for orientation t
(counter-clockwise on screen) and a = 7.5 * scale pixels:
  square  max(|u|, |v|) <= 1                       (side 15 px at scale 1)
  ellipse u^2 + (2 v)^2 <= 1                       (axes 15 x 7.5 px at scale 1)
  heart   (p^2 + q^2 - 1)^3 - p^2 q^3 <= 0, p = u / 0.9, q = v / 0.9 + 0.125 (classic heart curve)
Every shape stays inside the canvas (max radius < 11 px < 12 px margin).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from sdn.data.rendered import RenderedFactorData, check_factors, subsample_grid

FACTOR_NAMES = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)
IMAGE_SIZE = 64
HALF_SIZE_PX = 7.5  # a = HALF_SIZE_PX * scale
MARGIN_PX = 12.0
TRAVEL_PX = 40.0

# Every shape lies within 11 px of its centre (square: 7.5*sqrt(2); heart: < 11), so only a
# 26x26 block of pixels around the centre (+-12.5 px at least) needs evaluating.
_WINDOW = 26


def render(
    shape: np.ndarray,
    scale: np.ndarray,
    orientation: np.ndarray,
    pos_x: np.ndarray,
    pos_y: np.ndarray,
    chunk: int = 1024,
) -> np.ndarray:
    """Render sprites from factor VALUES (shape index, scale, radians, posX, posY in [0, 1]).

    All arguments broadcast to one length N; returns uint8 (N, 1, 64, 64) with values 0/255.
    """
    shape, scale, orientation, pos_x, pos_y = np.broadcast_arrays(
        np.asarray(shape, dtype=np.int64),
        np.asarray(scale, dtype=np.float64),
        np.asarray(orientation, dtype=np.float64),
        np.asarray(pos_x, dtype=np.float64),
        np.asarray(pos_y, dtype=np.float64),
    )
    if shape.ndim != 1:
        raise ValueError(f"factor values must be 1-D (N,), got shape {shape.shape}")
    if ((shape < 0) | (shape >= len(SHAPES))).any():
        raise ValueError(f"shape must be in 0..{len(SHAPES) - 1} ({SHAPES})")
    if (scale <= 0).any():
        raise ValueError("scale must be positive")
    out = np.empty((len(shape), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(shape), chunk):
        part = slice(start, start + chunk)
        out[part, 0] = _render_chunk(
            shape[part], scale[part], orientation[part], pos_x[part], pos_y[part]
        )
    return out


def _render_chunk(shape, scale, orientation, pos_x, pos_y) -> np.ndarray:
    """Evaluate the shapes on a WINDOW x WINDOW block of pixels around each centre (n, 64, 64)."""
    n = len(shape)
    x0 = MARGIN_PX + TRAVEL_PX * pos_x
    y0 = MARGIN_PX + TRAVEL_PX * pos_y
    offsets = np.arange(_WINDOW)
    col0 = np.clip(np.floor(x0).astype(np.int64) - _WINDOW // 2, 0, IMAGE_SIZE - _WINDOW)
    row0 = np.clip(np.floor(y0).astype(np.int64) - _WINDOW // 2, 0, IMAGE_SIZE - _WINDOW)
    cols = col0[:, None] + offsets[None, :]  # (n, WINDOW)
    rows = row0[:, None] + offsets[None, :]
    a = (HALF_SIZE_PX * scale)[:, None, None]
    dx = (cols + 0.5 - x0[:, None])[:, None, :]  # (n, 1, WINDOW)
    dy = (y0[:, None] - rows - 0.5)[:, :, None]  # (n, WINDOW, 1), pointing up
    cos = np.cos(orientation)[:, None, None]
    sin = np.sin(orientation)[:, None, None]
    u = (cos * dx + sin * dy) / a
    v = (-sin * dx + cos * dy) / a
    inside = np.zeros(u.shape, dtype=bool)
    for index, name in enumerate(SHAPES):
        which = shape == index
        if not which.any():
            continue
        uu, vv = u[which], v[which]
        if name == "square":
            hit = np.maximum(np.abs(uu), np.abs(vv)) <= 1.0
        elif name == "ellipse":
            hit = uu**2 + (2.0 * vv) ** 2 <= 1.0
        else:
            p, q = uu / 0.9, vv / 0.9 + 0.125
            hit = (p**2 + q**2 - 1.0) ** 3 - p**2 * q**3 <= 0.0
        inside[which] = hit
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = inside * np.uint8(255)
    return out


def factor_values(factors: np.ndarray) -> tuple[np.ndarray, ...]:
    """Map factor INDICES (N, 5) to the values ``render`` takes."""
    factors = check_factors(factors, FACTOR_SIZES)
    return (
        factors[:, 0],
        SCALES[factors[:, 1]],
        ORIENTATIONS[factors[:, 2]],
        POSITIONS[factors[:, 3]],
        POSITIONS[factors[:, 4]],
    )


def render_factors(factors: np.ndarray, progress: bool = False) -> np.ndarray:
    """Render factor INDICES (N, 5) to uint8 (N, 1, 64, 64), with a progress bar if asked."""
    values = factor_values(factors)
    out = np.empty((len(values[0]), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    step = 4096
    for start in tqdm(
        range(0, len(out), step), desc="render dsprites", disable=not progress, leave=False
    ):
        part = slice(start, start + step)
        out[part] = render(*(v[part] for v in values))
    return out


class DSpritesProcedural(RenderedFactorData):
    """``GroundTruthData`` rendering dSprites on demand, with a small LRU cache of images."""

    def __init__(self, cache_size: int = 8192):
        super().__init__(
            FACTOR_NAMES, FACTOR_SIZES, (1, IMAGE_SIZE, IMAGE_SIZE), render_factors, cache_size
        )


def subsample_factors(num: int, seed: int) -> np.ndarray:
    """``num`` distinct grid points (int64 (num, 5)) drawn without replacement with ``seed``."""
    return subsample_grid(FACTOR_SIZES, num, seed)
