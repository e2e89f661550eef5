"""The one on-disk format of prepared datasets, written atomically, read with memory maps.

A prepared dataset is a directory::

    <out>/meta.json               name, splits {split: {num, image_shape, ...}}, factors, source
    <out>/<split>_images.npy      uint8 (N, C, H, W), loaded with mmap_mode="r"
    <out>/<split>_factors.npy     int64 (N, K) factor indices (factor datasets only)
    <out>/<split>_labels.npy      int64 (N,) class labels where the source has them (unused by models)
    <out>/sample_grid.png         a grid of the first training images, for a quick look

It is built in a temporary sibling directory and renamed into place only when complete, so an
interrupted prepare never leaves something DVC could mistake for a finished output. A file damaged
later (cut short by a full disk or an interrupted copy) raises :class:`PreparedDataError` naming it
and saying how to rebuild it, instead of NumPy's ``mmap length is greater than file size``.
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


class PreparedDataError(ValueError):
    """A file of a prepared dataset is missing, truncated or corrupt: ``path`` names it; the message
    says how to rebuild the dataset (and ``hint``, when given, how the caller's workflow does it)."""

    def __init__(self, path: str | Path, reason: str, name: str | None = None, hint: str | None = None) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.reason = reason
        self.name = name
        self.hint = hint
        call = f"sdn.data.prepare({name!r}, {str(self.root)!r}, ...)" if name else "sdn.data.prepare"
        message = (f"{self.path} {reason}: the prepared dataset {self.root} is damaged; "
                   f"prepare it again with {call} (in a study: the dataset's prepare step)")
        super().__init__(message + (f"; {hint}" if hint else ""))

    def with_hint(self, hint: str) -> "PreparedDataError":
        """The same error with ``hint`` added to the message."""
        return PreparedDataError(self.path, self.reason, self.name, hint)


def load_array(path: str | Path, rows: int | None = None, name: str | None = None,
               mmap_mode: str | None = "r") -> np.ndarray:
    """``np.load`` one array file of a prepared dataset (memory-mapped by default), raising
    :class:`PreparedDataError` naming the file when it is missing, cut short, corrupt or holds
    another number of ``rows`` than meta.json records."""
    path = Path(path)
    if not path.is_file():
        raise PreparedDataError(path, "is missing", name)
    try:
        array = np.load(path, mmap_mode=mmap_mode)
    except (ValueError, EOFError, OSError) as error:
        size = path.stat().st_size
        raise PreparedDataError(path, f"is truncated or corrupt ({size} bytes; NumPy: {error})", name) from error
    if rows is not None and (array.ndim == 0 or array.shape[0] != rows):
        raise PreparedDataError(path, f"holds shape {array.shape}, but {META} records {rows} rows", name)
    return array


def verify_prepared(root: str | Path) -> dict[str, Any]:
    """Open every array of the prepared dataset in ``root`` (headers and sizes only, no data read);
    return its meta, or raise :class:`PreparedDataError` naming the first damaged file."""
    meta = read_meta(root)
    for split, entry in meta.get("splits", {}).items():
        entry = entry if isinstance(entry, dict) else {}
        if entry.get("rendered_on_demand"):  # no arrays: rendered when read
            continue
        rows = entry.get("num")
        load_array(image_path(root, split), rows, meta.get("name"))
        for path in (factors_path(root, split), labels_path(root, split)):
            if path.is_file():
                load_array(path, rows, meta.get("name"))
    return meta


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
    """Read ``meta.json`` of a prepared dataset, or raise FileNotFoundError naming the directory
    (:class:`PreparedDataError` naming the file when it is truncated, not JSON or of another format)."""
    path = Path(root) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no {META}); run the prepare step first"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise PreparedDataError(path, f"is truncated or not valid JSON ({error})") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
        raise PreparedDataError(path, f"does not hold a {META} object (got {type(meta).__name__})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            path, f"has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}", meta.get("name")
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
        self._rows = self.meta["splits"][split].get("num") if isinstance(self.meta["splits"][split], dict) else None
        self._images: np.ndarray | None = None
        self._factors: np.ndarray | None = None
        self.has_factors = factors_path(self.root, split).is_file()
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{image_path(self.root, split)}: expected uint8 (N, C, H, W)")
        if self.factors is not None and len(self.factors) != len(self.images):  # opens (and checks) the file
            raise PreparedDataError(factors_path(self.root, split),
                                    f"holds {len(self.factors)} rows for {len(self.images)} images", self.meta.get("name"))

    @property
    def images(self) -> np.ndarray:
        """All images of the split, uint8 (N, C, H, W), memory-mapped read-only."""
        if self._images is None:
            self._images = load_array(image_path(self.root, self.split), self._rows, self.meta.get("name"))
        return self._images

    @property
    def factors(self) -> np.ndarray | None:
        """Factor indices int64 (N, K), or None for datasets without factors."""
        if self._factors is None and self.has_factors:
            self._factors = load_array(factors_path(self.root, self.split), self._rows, self.meta.get("name"))
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
