"""The one on-disk format of prepared datasets, written atomically, read with memory maps.

A prepared dataset is a directory::

    <out>/meta.json               name, splits {split: {num, image_shape, ...}}, factors, source
    <out>/<split>_images.npy      uint8 (N, C, H, W), loaded with mmap_mode="r"
    <out>/<split>_factors.npy     int64 (N, K) factor indices (factor datasets only)
    <out>/<split>_labels.npy      int64 (N,) class labels where the source has them (unused by models)
    <out>/sample_grid.png         a grid of the first training images, for a quick look

It is built in a temporary sibling directory and renamed into place only when complete, so an
interrupted prepare never leaves something DVC could mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT_VERSION = 1
META = "meta.json"
GRID = "sample_grid.png"


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``.

    Only an empty directory or an earlier prepared dataset (one with meta.json) is replaced: any
    other existing directory raises ValueError rather than being deleted.
    """
    out = Path(out)
    if out.exists() and not (out / META).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise ValueError(
                f"{out} exists and is not a prepared dataset (no {META}); refusing to replace it."
                " Pass the dataset's own directory, e.g. data/prepared/<name>"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary dir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def image_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_images.npy"


def factors_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_factors.npy"


def labels_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_labels.npy"


def new_image_array(root: str | Path, split: str, shape: tuple[int, ...]) -> np.memmap:
    """A writable uint8 .npy memory map (N, C, H, W) for ``split`` under ``root``."""
    if len(shape) != 4:
        raise ValueError(f"image arrays are (N, C, H, W), got shape {shape}")
    return np.lib.format.open_memmap(image_path(root, split), mode="w+", dtype=np.uint8, shape=shape)


def write_meta(root: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (adds the format version)."""
    meta = {"format_version": FORMAT_VERSION, **meta}
    with open(Path(root) / META, "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_meta(root: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared dataset, or raise FileNotFoundError naming the directory."""
    path = Path(root) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no {META}); run the prepare step first"
        )
    with open(path) as handle:
        meta = json.load(handle)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def split_meta(images: np.ndarray, factors: np.ndarray | None = None) -> dict[str, Any]:
    """The meta.json entry of one split."""
    entry: dict[str, Any] = {"num": int(images.shape[0]), "image_shape": list(images.shape[1:])}
    if factors is not None:
        entry["num_factors"] = int(factors.shape[1])
    return entry


class PreparedImages(Dataset):
    """A split of a prepared dataset: item i is (uint8 (C, H, W), int64 (K,) or empty) tensors.

    Arrays are memory-mapped lazily and not pickled, so DataLoader workers (fork or spawn) each
    map the files themselves instead of receiving a copy.
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if split not in self.meta["splits"]:
            raise ValueError(
                f"{self.meta['name']} has splits {sorted(self.meta['splits'])}, got {split!r}"
            )
        self.split = split
        self._images: np.ndarray | None = None
        self._factors: np.ndarray | None = None
        self.has_factors = factors_path(self.root, split).is_file()
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{image_path(self.root, split)}: expected uint8 (N, C, H, W)")

    @property
    def images(self) -> np.ndarray:
        """All images of the split, uint8 (N, C, H, W), memory-mapped read-only."""
        if self._images is None:
            self._images = np.load(image_path(self.root, self.split), mmap_mode="r")
        return self._images

    @property
    def factors(self) -> np.ndarray | None:
        """Factor indices int64 (N, K), or None for datasets without factors."""
        if self._factors is None and self.has_factors:
            self._factors = np.load(factors_path(self.root, self.split), mmap_mode="r")
        return self._factors

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_factors": None}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.images[index]))
        factors = self.factors
        if factors is None:
            return image, torch.empty(0, dtype=torch.int64)
        return image, torch.from_numpy(np.array(factors[index], dtype=np.int64))


class ArrayImages(Dataset):
    """In-memory images (N, C, H, W) uint8 with optional factors (N, K), same items as above."""

    def __init__(self, images: np.ndarray, factors: np.ndarray | None = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
        if factors is not None and (factors.ndim != 2 or len(factors) != len(images)):
            raise ValueError(f"factors must be (N, K) with N={len(images)}, got {factors.shape}")
        self.images = images
        self.factors = None if factors is None else factors.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.images[index]))
        if self.factors is None:
            return image, torch.empty(0, dtype=torch.int64)
        return image, torch.from_numpy(np.array(self.factors[index]))
