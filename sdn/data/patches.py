"""``patches32``: square RGB patches of every photograph that ships inside installed packages.

No network, deterministic, built in seconds: the default density dataset of the embedded study.
Sources: scikit-image's ``skimage.data`` (astronaut, coffee, chelsea, rocket, hubble_deep_field,
immunohistochemistry, retina, colorwheel; ``cat`` is the same picture as ``chelsea`` and is left
out), scikit-learn's ``load_sample_images`` (china, flower) and matplotlib's ``grace_hopper.jpg``.

Train, validation and test come from the SAME distribution: every photograph is cut into a grid of
square regions (``region`` pixels a side; the ragged right and bottom edges are dropped), and the
regions of each photograph are dealt out to the splits by a seeded shuffle, in the proportions
``validation_fraction`` / ``test_fraction`` / the rest (stratified per photograph, so every split
sees every photograph). A region and its 2x2 block-mean halvings (``levels`` of them) give
non-overlapping ``patch_size`` patches on an aligned grid, so no pixel of the photograph reaches two
splits and no two patches of one split overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

SPLITS = ("train", "validation", "test")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.image
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        return matplotlib.image.imread(handle, format="jpg")


# Order matters: a source's position is part of its crops' seed.
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "colorwheel": _skimage("colorwheel"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _grace_hopper,
}


def load_source(name: str) -> np.ndarray:
    """The named source photograph as uint8 (H, W, 3)."""
    if name not in SOURCES:
        raise ValueError(f"unknown patch source {name!r}, expected one of {sorted(SOURCES)}")
    image = np.asarray(SOURCES[name]())
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"source {name} is not an RGB uint8 image: {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``image`` and its successive halvings (2x2 block means, odd edge dropped), as uint8.

    Level k is the mean of the 2^k x 2^k blocks of the original, rounded once (half to even).
    """
    out = [image]
    current = image.astype(np.float64)
    for _ in range(levels - 1):
        h, w = current.shape[0] // 2 * 2, current.shape[1] // 2 * 2
        c = current[:h, :w]
        current = 0.25 * (c[0::2, 0::2] + c[0::2, 1::2] + c[1::2, 0::2] + c[1::2, 1::2])
        out.append(np.clip(np.rint(current), 0, 255).astype(np.uint8))
    return out


@dataclass(frozen=True)
class PatchSplit:
    """Patches (N, 3, P, P) uint8 and where each came from: (source, level, row, col).

    ``row``/``col`` are the patch's top-left corner in the source photograph halved ``level`` times.
    """

    images: np.ndarray
    origins: np.ndarray  # int64 (N, 4)
    sources: tuple[str, ...]  # names indexed by origins[:, 0]


def region_splits(num_regions: int, validation_fraction: float, test_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of each of ``num_regions`` regions of one photo.

    The counts are the rounded fractions (at least one validation and one test region whenever the
    photograph has three or more); which regions go where is a seeded permutation.
    """
    n_val = int(round(validation_fraction * num_regions))
    n_test = int(round(test_fraction * num_regions))
    if num_regions >= 3:
        n_val, n_test = max(n_val, 1 if validation_fraction > 0 else 0), max(n_test, 1 if test_fraction > 0 else 0)
    labels = np.zeros(num_regions, dtype=np.int64)
    order = rng.permutation(num_regions)
    labels[order[:n_test]] = 2
    labels[order[n_test:n_test + n_val]] = 1
    return labels


def build_patches32(
    patch_size: int = 32,
    region: int = 128,
    levels: int = 3,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, PatchSplit]:
    """Build {"train", "validation", "test": PatchSplit}; the same arguments give the same bytes."""
    if patch_size < 2 or region < patch_size or levels < 1:
        raise ValueError(f"need patch_size >= 2, region >= patch_size, levels >= 1; got "
                         f"patch_size={patch_size}, region={region}, levels={levels}")
    if region % (patch_size * 2 ** (levels - 1)):
        raise ValueError(f"region ({region}) must be a multiple of patch_size * 2**(levels - 1) "
                         f"= {patch_size * 2 ** (levels - 1)}, so every level tiles it exactly")
    if not (0 < validation_fraction and 0 < test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"validation_fraction and test_fraction must be > 0 with a sum < 1, got "
                         f"{validation_fraction} and {test_fraction}")
    names = tuple(SOURCES)
    images: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    origins: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for source_index, name in enumerate(tqdm(names, desc="patches32", disable=not progress)):
        photo = load_source(name)
        grid_rows, grid_cols = photo.shape[0] // region, photo.shape[1] // region
        rng = np.random.default_rng([seed, source_index])
        labels = region_splits(grid_rows * grid_cols, validation_fraction, test_fraction, rng)
        for index, split_index in enumerate(labels):
            r0, c0 = divmod(index, grid_cols)
            block = photo[r0 * region:(r0 + 1) * region, c0 * region:(c0 + 1) * region]
            for level, picture in enumerate(pyramid(block, levels)):
                side = region >> level
                tiles = picture.reshape(side // patch_size, patch_size, side // patch_size, patch_size, 3)
                tiles = tiles.transpose(0, 2, 4, 1, 3).reshape(-1, 3, patch_size, patch_size)
                rows, cols = np.divmod(np.arange(len(tiles)), side // patch_size)
                split = SPLITS[split_index]
                images[split].append(np.ascontiguousarray(tiles))
                origins[split].append(np.stack([
                    np.full_like(rows, source_index), np.full_like(rows, level),
                    r0 * side + rows * patch_size, c0 * side + cols * patch_size,
                ], axis=1).astype(np.int64))
    return {
        split: PatchSplit(np.concatenate(images[split]), np.concatenate(origins[split]), names)
        for split in SPLITS
    }
