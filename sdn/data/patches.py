"""``patches32``: 32x32 RGB patches of the photographs that ship inside installed packages.

No network, deterministic, built in seconds: the default density dataset of the embedded study.
Sources: scikit-image's ``skimage.data`` (astronaut, coffee, chelsea, rocket, hubble_deep_field,
immunohistochemistry, retina, colorwheel; ``cat`` is the same picture as ``chelsea`` and is left
out), scikit-learn's ``load_sample_images`` (china, flower) and matplotlib's ``grace_hopper.jpg``.
Train and test are split BY SOURCE IMAGE, so no test photograph contributes a training patch.
Each image is also downscaled by 2x2 block means (1/2, 1/4, 1/8) so patches see coarser structure;
crops are uniform over positions with a NumPy generator seeded by (seed, image, scale).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

PATCH = 32
SCALES = (1.0, 0.5, 0.25, 0.125)
MIN_SIDE = 40  # a scaled image must have at least this many pixels per side to be cropped
DEFAULT_TEST_SOURCES = ("coffee", "flower", "grace_hopper")


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
    """Patches (N, 3, 32, 32) uint8 and where each came from: (source, scale index, row, col)."""

    images: np.ndarray
    origins: np.ndarray  # int64 (N, 4)
    sources: tuple[str, ...]  # names indexed by origins[:, 0]


def build_patches32(
    patches_per_scale: int = 200,
    seed: int = 0,
    test_sources: Sequence[str] = DEFAULT_TEST_SOURCES,
    progress: bool = True,
) -> dict[str, PatchSplit]:
    """Build {"train": PatchSplit, "test": PatchSplit}; the same arguments give the same bytes."""
    if patches_per_scale < 1:
        raise ValueError(f"patches_per_scale must be >= 1, got {patches_per_scale}")
    unknown = set(test_sources) - set(SOURCES)
    if unknown or not test_sources or set(test_sources) == set(SOURCES):
        raise ValueError(
            f"test_sources must be a non-empty proper subset of {sorted(SOURCES)}, got {test_sources}"
        )
    names = tuple(SOURCES)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    origins: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for source_index, name in enumerate(tqdm(names, desc="patches32", disable=not progress)):
        split = "test" if name in test_sources else "train"
        photo = load_source(name)
        for scale_index, picture in enumerate(pyramid(photo, len(SCALES))):
            if min(picture.shape[:2]) < MIN_SIDE:
                continue
            height, width = picture.shape[:2]
            rng = np.random.default_rng([seed, source_index, scale_index])
            rows = rng.integers(0, height - PATCH + 1, size=patches_per_scale)
            cols = rng.integers(0, width - PATCH + 1, size=patches_per_scale)
            window = np.lib.stride_tricks.sliding_window_view(picture, (PATCH, PATCH), axis=(0, 1))
            images[split].append(np.ascontiguousarray(window[rows, cols]))  # (n, 3, 32, 32)
            origins[split].append(
                np.stack(
                    [np.full_like(rows, source_index), np.full_like(rows, scale_index), rows, cols],
                    axis=1,
                ).astype(np.int64)
            )
    return {
        split: PatchSplit(np.concatenate(images[split]), np.concatenate(origins[split]), names)
        for split in ("train", "test")
    }
