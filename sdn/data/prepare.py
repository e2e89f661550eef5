"""Prepare steps: turn each downloaded archive (or embedded source) into the on-disk format.

One function per dataset, all dispatched by ``prepare(name, out, archive=..., **options)``, which
writes ``out`` atomically (see ``sdn.data.storage``) with ``meta.json`` and ``sample_grid.png``, and
does nothing when ``out`` already holds the same archive (sha256) prepared with the same options.

Splits follow the paper: CIFAR-10 train/test; ImageNet32 and CelebAHQ256 train/validation (Glow's
tfrecords; images are stored at 8 bits, models quantise to their ``bits``, e.g. 5 for CelebAHQ256);
3DShapes and dSprites: "train" is the whole factor grid.
"""

from __future__ import annotations

import importlib.metadata
import json
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sdn.data import dsprites_procedural, glow, patches, shapes3d_procedural
from sdn.data.factor_grid import factor_indices, grid_lookup
from sdn.data.hashing import file_digests
from sdn.data.rendered import RenderedGrid
from sdn.data.storage import (
    GRID,
    atomic_output_dir,
    factors_path,
    image_path,
    labels_path,
    new_image_array,
    read_meta,
    split_meta,
    verify_prepared,
    write_meta,
)
from sdn.images import save_image_grid

SHAPES3D_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_SIZES = (10, 10, 10, 8, 4, 15)
DSPRITES_FACTORS = dsprites_procedural.FACTOR_NAMES
DSPRITES_SIZES = dsprites_procedural.FACTOR_SIZES
# Image counts written by Glow's conversion scripts; a different count only warns.
GLOW_COUNTS = {
    "imagenet32": {"train": 1281148, "validation": 50000},
    "celebahq256": {"train": 27000, "validation": 3000},
}
GLOW_RESOLUTION = {"imagenet32": 32, "celebahq256": 256}
ARCHIVED = ("cifar10", "imagenet32", "celebahq256", "shapes3d", "dsprites")
EMBEDDED = ("patches32", "dsprites_procedural", "shapes3d_procedural")
ARCHIVED_OPTIONS = {"shapes3d": {"chunk"}, "dsprites": {"chunk"}}  # rows converted per step
# Options of the embedded builders and their defaults (meta.json records the merged options).
EMBEDDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "patches32": {
        "patch_size": 32,
        "region": 128,
        "levels": 3,
        "validation_fraction": 0.1,
        "test_fraction": 0.1,
        "seed": 0,
    },
    "dsprites_procedural": {"num": 10000, "seed": 0},
    "shapes3d_procedural": {"num": 10000, "seed": 0},
}


def embedded_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options of embedded dataset ``name`` merged over the defaults, in meta.json's JSON form."""
    defaults = EMBEDDED_DEFAULTS[name]
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(
            f"{name}: unknown options {sorted(unknown)}, expected some of {sorted(defaults)}"
        )
    return json.loads(json.dumps({**defaults, **options}))


def prepare(
    name: str,
    out: str | Path,
    archive: str | Path | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Prepare dataset ``name`` into directory ``out``; returns its meta.json content.

    ``archive``: the downloaded file (archived datasets only). ``source``: extra provenance to
    record (e.g. the URL). ``options``: dataset-specific (see each ``_prepare_*`` function).
    """
    out = Path(out)
    options = json.loads(json.dumps(options))  # the form meta.json stores (tuples -> lists)
    if name in ARCHIVED:
        if archive is None:
            raise ValueError(f"{name} is prepared from a downloaded archive: pass archive=PATH")
        unknown = set(options) - ARCHIVED_OPTIONS.get(name, set())
        if unknown:
            raise ValueError(
                f"{name}: unknown options {sorted(unknown)}, "
                f"expected some of {sorted(ARCHIVED_OPTIONS.get(name, set()))}"
            )
        archive = Path(archive)
        if not archive.is_file():
            raise FileNotFoundError(f"{name}: archive {archive} not found; run the download step")
        sha256 = file_digests(archive, ("sha256",), progress)["sha256"]
        provenance = {**(source or {}), "archive": archive.name, "sha256": sha256}
    elif name in EMBEDDED:
        if archive is not None:
            raise ValueError(f"{name} is embedded (built from installed packages): no archive")
        options = embedded_options(name, options)
        provenance = {**(source or {}), **_embedded_provenance(name)}
    else:
        raise ValueError(f"unknown dataset {name!r}, expected one of {sorted(ARCHIVED + EMBEDDED)}")

    if not force and _up_to_date(out, name, provenance, options):
        return read_meta(out)
    with atomic_output_dir(out) as tmp:
        if name == "cifar10":
            body = _prepare_cifar10(archive, tmp, progress, **options)  # type: ignore[arg-type]
        elif name in GLOW_RESOLUTION:
            body = _prepare_glow(name, archive, tmp, progress, **options)  # type: ignore[arg-type]
        elif name == "shapes3d":
            body = _prepare_shapes3d(archive, tmp, progress, **options)  # type: ignore[arg-type]
        elif name == "dsprites":
            body = _prepare_dsprites(archive, tmp, progress, **options)  # type: ignore[arg-type]
        elif name == "patches32":
            body = _build_patches32(tmp, progress, **options)
        else:
            body = _build_procedural(name, tmp, progress, **options)
        meta = {"name": name, "source": provenance, "options": options, **body}
        write_meta(tmp, meta)
        if image_path(tmp, "train").is_file():
            grid_images = np.load(image_path(tmp, "train"), mmap_mode="r")
            spread = np.unique(np.linspace(0, len(grid_images) - 1, 64).astype(np.int64))
            save_image_grid(grid_images[spread], tmp / GRID, nrow=8, padding=2, pad_value=1.0)
            del grid_images
        else:  # rendered on demand: the grid of a seeded sample of grid points
            grid = rendered_grid(name)
            picks = np.random.default_rng(options["seed"]).choice(len(grid), 64, replace=False)
            save_image_grid(torch.stack([image for image, _ in grid.__getitems__(picks)]), tmp / GRID,
                            nrow=8, padding=2, pad_value=1.0)
    return read_meta(out)


def _up_to_date(out: Path, name: str, provenance: dict, options: dict) -> bool:
    """Whether ``out`` holds ``name`` built from the same source and options, every array whole
    (a file cut short since is rebuilt, not trusted)."""
    try:
        meta = verify_prepared(out)
    except (FileNotFoundError, ValueError):  # includes PreparedDataError
        return False
    return (
        meta.get("name") == name
        and meta.get("source") == provenance
        and meta.get("options") == options
        and all(image_path(out, split).is_file() for split in meta.get("splits", {}))
    )


def _embedded_provenance(name: str) -> dict[str, Any]:
    if name == "patches32":
        packages = ("scikit-image", "scikit-learn", "matplotlib")
    else:
        packages = ("numpy",)
    return {
        "embedded": True,
        "packages": {p: importlib.metadata.version(p) for p in packages},
    }


# ------------------------------------------------------------------------------ CIFAR-10


def _prepare_cifar10(archive: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Extract the python tarball and read it with torchvision's CIFAR10 (train 50k / test 10k)."""
    from torchvision.datasets import CIFAR10

    class _CIFAR10Files(CIFAR10):
        # The archive checksum is verified by the download step; per-file md5s are switched off
        # so that mirrors and the tests' small archives in the same format are readable too.
        train_list = [[filename, None] for filename, _ in CIFAR10.train_list]
        test_list = [[filename, None] for filename, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    splits = {}
    with tempfile.TemporaryDirectory(dir=out) as work:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(work, filter="data")
        for split, train in (("train", True), ("test", False)):
            data = _CIFAR10Files(work, train=train, download=False)
            images = np.ascontiguousarray(data.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
            if images.shape[1:] != (3, 32, 32) or images.dtype != np.uint8:
                raise ValueError(f"CIFAR-10 {split}: unexpected images {images.dtype} {images.shape}")
            np.save(image_path(out, split), images)
            np.save(labels_path(out, split), np.asarray(data.targets, dtype=np.int64))
            splits[split] = {**split_meta(images), "classes": list(data.classes)}
    return {"splits": splits}


# ------------------------------------------------------------------- ImageNet32, CelebAHQ256


def _prepare_glow(name: str, archive: Path, out: Path, progress: bool) -> dict[str, Any]:
    resolution = GLOW_RESOLUTION[name]
    splits = {}
    for split in ("train", "validation"):
        num = glow.convert_split(archive, split, resolution, out, progress)
        expected = GLOW_COUNTS[name][split]
        if num != expected:
            warnings.warn(f"{name} {split}: {num} images, Glow's scripts wrote {expected}")
        splits[split] = {"num": num, "image_shape": [3, resolution, resolution]}
    return {"splits": splits}


# ------------------------------------------------------------------------------ 3DShapes


def _prepare_shapes3d(archive: Path, out: Path, progress: bool, chunk: int = 8192) -> dict:
    """images (N, 64, 64, 3) uint8 -> (N, 3, 64, 64); float labels -> factor indices by np.unique."""
    import h5py

    with h5py.File(archive, "r") as handle:
        if "images" not in handle or "labels" not in handle:
            raise ValueError(f"{archive}: expected datasets 'images' and 'labels', got {list(handle)}")
        source = handle["images"]
        labels = np.asarray(handle["labels"][()], dtype=np.float64)
        if source.ndim != 4 or source.shape[3] != 3 or labels.shape != (source.shape[0], 6):
            raise ValueError(
                f"{archive}: images {source.shape} / labels {labels.shape}, "
                "expected (N, 64, 64, 3) and (N, 6)"
            )
        factors, values = factor_indices(labels)
        sizes = tuple(len(v) for v in values)
        grid_lookup(factors, sizes)  # every combination exactly once
        if sizes != SHAPES3D_SIZES:
            warnings.warn(f"3dshapes factor sizes {sizes}, the official file has {SHAPES3D_SIZES}")
        num = source.shape[0]
        images = new_image_array(out, "train", (num, 3, *source.shape[1:3]))
        for start in tqdm(range(0, num, chunk), desc="3dshapes", disable=not progress):
            images[start : start + chunk] = source[start : start + chunk].transpose(0, 3, 1, 2)
        images.flush()
        del images
    np.save(factors_path(out, "train"), factors)
    return _factor_meta(num, [3, *source.shape[1:3]], SHAPES3D_FACTORS, sizes, values)


# ------------------------------------------------------------------------------- dSprites


def _prepare_dsprites(archive: Path, out: Path, progress: bool, chunk: int = 16384) -> dict:
    """imgs 0/1 -> 0/255 (N, 1, 64, 64); latents_classes[:, 1:6] are the factor indices."""
    with np.load(archive, allow_pickle=False) as npz:
        missing = {"imgs", "latents_classes", "latents_values"} - set(npz.files)
        if missing:
            raise ValueError(f"{archive}: missing arrays {sorted(missing)} (dSprites npz layout)")
        classes = np.asarray(npz["latents_classes"], dtype=np.int64)
        latent_values = np.asarray(npz["latents_values"], dtype=np.float64)
    if classes.ndim != 2 or classes.shape[1] != 6:
        raise ValueError(f"{archive}: latents_classes {classes.shape}, expected (N, 6)")
    factors = np.ascontiguousarray(classes[:, 1:6])
    sizes = tuple(int(s) for s in factors.max(axis=0) + 1)
    grid_lookup(factors, sizes)
    if sizes != DSPRITES_SIZES:
        warnings.warn(f"dSprites factor sizes {sizes}, the official file has {DSPRITES_SIZES}")
    values = [np.unique(latent_values[:, k]) for k in range(1, 6)]
    num = len(factors)
    images = None
    start = 0
    for rows in _npz_rows(archive, "imgs", chunk, progress):
        if images is None:
            if rows.shape[1:] != (64, 64):
                raise ValueError(f"{archive}: imgs rows {rows.shape[1:]}, expected (64, 64)")
            images = new_image_array(out, "train", (num, 1, 64, 64))
        if rows.max(initial=0) > 1:
            raise ValueError(f"{archive}: imgs must be binary 0/1, found {rows.max()}")
        images[start : start + len(rows), 0] = rows * np.uint8(255)
        start += len(rows)
    if images is None or start != num:
        raise ValueError(f"{archive}: {start} images for {num} factor rows")
    images.flush()
    del images
    np.save(factors_path(out, "train"), factors)
    return _factor_meta(num, [1, 64, 64], DSPRITES_FACTORS, sizes, values)


def _npz_rows(path: Path, key: str, chunk: int, progress: bool) -> Iterator[np.ndarray]:
    """Stream the rows of one array of an .npz without holding it all in memory."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key} must be a C-ordered plain array")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        for start in tqdm(range(0, shape[0], chunk), desc=key, disable=not progress):
            count = min(chunk, shape[0] - start)
            buffer = handle.read(count * row_bytes)
            if len(buffer) != count * row_bytes:
                raise ValueError(f"{path}:{key} is truncated")
            yield np.frombuffer(buffer, dtype=dtype).reshape(count, *row_shape)


def _factor_meta(num, image_shape, names, sizes, values) -> dict[str, Any]:
    return {
        "splits": {"train": {"num": int(num), "image_shape": list(image_shape), "num_factors": len(names)}},
        "factor_names": list(names),
        "factor_sizes": [int(s) for s in sizes],
        "factor_values": [np.asarray(v, dtype=np.float64).tolist() for v in values],
    }


# ------------------------------------------------------------------------- embedded data


def _build_patches32(out: Path, progress: bool, **options: Any) -> dict[str, Any]:
    """Every split of patches32 (options: ``sdn.data.patches.build_patches32``) with its origins."""
    built = patches.build_patches32(**options, progress=progress)
    splits = {}
    for split, data in built.items():
        np.save(image_path(out, split), data.images)
        np.save(Path(out) / f"{split}_origins.npy", data.origins)
        used = sorted({data.sources[i] for i in np.unique(data.origins[:, 0])})
        splits[split] = {**split_meta(data.images), "sources": used}
    return {"splits": splits, "split_rule": "disjoint regions of every photograph, dealt out per photograph"}


def rendered_grid(name: str) -> RenderedGrid:
    """The whole factor grid of procedural dataset ``name``, rendered on demand."""
    module = dsprites_procedural if name == "dsprites_procedural" else shapes3d_procedural
    return RenderedGrid(module.FACTOR_SIZES, module.render_factors)


def _build_procedural(
    name: str, out: Path, progress: bool, num: int | None = 10000, seed: int = 0
) -> dict[str, Any]:
    """A seeded subsample of ``num`` grid points of a rendered factor dataset; ``num=None``: the
    whole grid, rendered on demand when read (only meta.json and the sample grid are written)."""
    if name == "dsprites_procedural":
        module, names = dsprites_procedural, DSPRITES_FACTORS
        values = [
            np.arange(3),
            dsprites_procedural.SCALES,
            dsprites_procedural.ORIENTATIONS,
            dsprites_procedural.POSITIONS,
            dsprites_procedural.POSITIONS,
        ]
    else:
        module, names = shapes3d_procedural, SHAPES3D_FACTORS
        values = [
            shapes3d_procedural.HUES,
            shapes3d_procedural.HUES,
            shapes3d_procedural.HUES,
            shapes3d_procedural.SCALES,
            np.arange(4),
            shapes3d_procedural.ORIENTATIONS_DEG,
        ]
    if num is None:
        shape = list(module.render_factors(np.zeros((1, len(names)), np.int64)).shape[1:])
        meta = _factor_meta(int(np.prod(module.FACTOR_SIZES)), shape, names, module.FACTOR_SIZES, values)
        meta["splits"]["train"]["rendered_on_demand"] = True
        return meta
    factors = module.subsample_factors(num, seed)
    images = module.render_factors(factors, progress)
    np.save(image_path(out, "train"), images)
    np.save(factors_path(out, "train"), factors)
    return _factor_meta(num, list(images.shape[1:]), names, module.FACTOR_SIZES, values)
