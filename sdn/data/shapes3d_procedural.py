"""``shapes3d_procedural``: 64x64 colour scenes with 3DShapes' six factors, rendered exactly.

A stand-in for 3DShapes that needs no download (a simple 2.5-D drawing, not the official renders).
Factors and sizes as 3DShapes: floor_hue 10, wall_hue 10, object_hue 10 (hues k/10), scale 8
(linspace(0.75, 1.25, 8)), shape 4 (cube, cylinder, sphere, capsule), orientation 15
(linspace(-30, 30, 15) degrees); 480000 combinations, C order (orientation fastest).

Scene (pixel centres x = c + 0.5, y = r + 0.5, y down; phi = orientation in radians):
  walls   the room corner is at xc = 32 + 48 sin(phi); left of it the wall has brightness 0.75, right
          of it 1.0 (wall hue); the floor (floor hue, brightness 0.9) is below
          yb(x) = 34 + 0.25 |x - xc|, so turning the camera slides the corner sideways.
  object  stands on (32, 54) with size s = 16 * scale px, object hue:
          cube      width s(|cos phi| + |sin phi|), height s; the side face (width s|sin phi|, on the
                    left for phi > 0, on the right for phi < 0) has brightness 0.7, the front 1.0;
          cylinder  width s, height s, brightness 0.75 + 0.25 cos(pi (x - 32) / s) across it;
          sphere    disc of radius s/2 centred at (32, 54 - s/2), brightness 0.6 + 0.4 sqrt(1 - d^2/R^2);
          capsule   points within 0.3 s of the segment x = 32, y in [54 - 0.9 s, 54 - 0.3 s], shaded
                    like the sphere across x.
Colour = hsv_to_rgb(hue, 1, 1) * brightness, rounded to uint8.
"""

from __future__ import annotations

import functools

import numpy as np
from tqdm.auto import tqdm

from sdn.data.rendered import RenderedFactorData, check_factors, subsample_grid

FACTOR_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
SHAPES = ("cube", "cylinder", "sphere", "capsule")
HUES = np.arange(10) / 10.0
SCALES = np.linspace(0.75, 1.25, 8)
ORIENTATIONS_DEG = np.linspace(-30.0, 30.0, 15)
IMAGE_SIZE = 64
BASE = (32.0, 54.0)  # (x, y) of the object's base centre
SIZE_PX = 16.0

_X = np.arange(IMAGE_SIZE, dtype=np.float64)[None, None, :] + 0.5  # (1, 1, W)
_Y = np.arange(IMAGE_SIZE, dtype=np.float64)[None, :, None] + 0.5  # (1, H, 1)


def _hue_rgb(hues: np.ndarray) -> np.ndarray:
    """Fully saturated, full-value RGB in [0, 1] of each hue in [0, 1): (N, 3)."""
    from matplotlib.colors import hsv_to_rgb

    hsv = np.stack([hues, np.ones_like(hues), np.ones_like(hues)], axis=-1)
    return hsv_to_rgb(hsv)


_PALETTE = _hue_rgb(HUES).astype(np.float32)


def render_factors(factors: np.ndarray, progress: bool = False, chunk: int = 2048) -> np.ndarray:
    """Render factor INDICES (N, 6) to uint8 (N, 3, 64, 64)."""
    factors = check_factors(factors, FACTOR_SIZES)
    out = np.empty((len(factors), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    rooms = _rooms()
    _, _, mask, light = _layers()
    for start in tqdm(
        range(0, len(factors), chunk), desc="render shapes3d", disable=not progress, leave=False
    ):
        f = factors[start : start + chunk]
        image = rooms[f[:, 0], f[:, 1], f[:, 5]]  # (n, 3, H, W) uint8
        k = (f[:, 3], f[:, 4], f[:, 5])
        where = np.nonzero(mask[k])  # object pixels: (image, row, col)
        shade = light[k][where]  # (m,)
        colour = _PALETTE[f[where[0], 2]] * shade[:, None]  # (m, 3)
        image.transpose(0, 2, 3, 1)[where] = _to_uint8(colour)
        out[start : start + chunk] = image
    return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _rooms() -> np.ndarray:
    """Every empty room, uint8 (floor_hue, wall_hue, orientation, 3, H, W) (18 MB)."""
    floor, wall_light, _, _ = _layers()
    floor_rgb = _PALETTE[:, None, None, :, None, None] * np.float32(0.9)  # (10, 1, 1, 3, 1, 1)
    wall_rgb = _PALETTE[None, :, None, :, None, None] * wall_light[None, None, :, None]
    return _to_uint8(np.where(floor[None, None, :, None], floor_rgb, wall_rgb))


@functools.lru_cache(maxsize=1)
def _layers() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scene's layers, which depend on few factors, for every value of those factors.

    floor (15, H, W) bool and wall brightness (15, H, W) per orientation; object mask and
    brightness (8, 4, 15, H, W) per (scale, shape, orientation).
    """
    phi = np.deg2rad(ORIENTATIONS_DEG)[:, None, None]
    corner = 32.0 + 48.0 * np.sin(phi)
    floor = np.broadcast_to(_Y > 34.0 + 0.25 * np.abs(_X - corner), (len(phi), IMAGE_SIZE, IMAGE_SIZE))
    wall_light = np.broadcast_to(np.where(_X < corner, 0.75, 1.0), floor.shape)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in FACTOR_SIZES[3:]), indexing="ij"), -1)
    combos = grid.reshape(-1, 3)  # (scale, shape, orientation) indices, C order
    mask, light = _object_layer(
        SIZE_PX * SCALES[combos[:, 0]], combos[:, 1], np.deg2rad(ORIENTATIONS_DEG[combos[:, 2]])
    )
    shape = (*FACTOR_SIZES[3:], IMAGE_SIZE, IMAGE_SIZE)
    return (
        np.ascontiguousarray(floor),
        wall_light.astype(np.float32),
        mask.reshape(shape),
        light.astype(np.float32).reshape(shape),
    )


def _object_layer(size: np.ndarray, shape: np.ndarray, phi: np.ndarray):
    """Object mask (n, H, W) and brightness (n, H, W) for sizes in px, shape indices, radians."""
    n = len(size)
    size, phi = size[:, None, None], phi[:, None, None]
    x0, y0 = BASE
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    light = np.ones((n, IMAGE_SIZE, IMAGE_SIZE))
    dx = np.broadcast_to(_X - x0, (n, IMAGE_SIZE, IMAGE_SIZE))
    for index, name in enumerate(SHAPES):
        rows = shape == index
        if not rows.any():
            continue
        s, p, ddx = size[rows], phi[rows], dx[rows]
        vertical = (_Y >= y0 - s) & (_Y <= y0)
        if name == "cube":
            side = s * np.abs(np.sin(p))
            half = 0.5 * s * (np.abs(np.cos(p)) + np.abs(np.sin(p)))
            hit = vertical & (np.abs(ddx) <= half)
            on_side = np.where(p > 0, ddx < -half + side, ddx > half - side)
            shade = np.where(on_side, 0.7, 1.0)
        elif name == "cylinder":
            hit = vertical & (np.abs(ddx) <= s / 2)
            shade = 0.75 + 0.25 * np.cos(np.pi * ddx / s)
        elif name == "sphere":
            radius = s / 2
            d2 = ddx**2 + (_Y - (y0 - radius)) ** 2
            hit = d2 <= radius**2
            shade = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - d2 / radius**2, 0.0, 1.0))
        else:  # capsule: distance to a vertical segment
            radius = 0.3 * s
            yy = np.clip(_Y, y0 - 0.9 * s, y0 - 0.3 * s)
            d2 = ddx**2 + (_Y - yy) ** 2
            hit = d2 <= radius**2
            shade = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - ddx**2 / radius**2, 0.0, 1.0))
        mask[rows] = hit
        light[rows] = np.broadcast_to(shade, hit.shape)
    return mask, light


class Shapes3DProcedural(RenderedFactorData):
    """``GroundTruthData`` rendering the 3DShapes-like scenes on demand, with an LRU cache."""

    def __init__(self, cache_size: int = 4096):
        super().__init__(
            FACTOR_NAMES, FACTOR_SIZES, (3, IMAGE_SIZE, IMAGE_SIZE), render_factors, cache_size
        )


def subsample_factors(num: int, seed: int) -> np.ndarray:
    """``num`` distinct grid points (int64 (num, 6)) drawn without replacement with ``seed``."""
    return subsample_grid(FACTOR_SIZES, num, seed)
