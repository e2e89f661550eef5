"""Every dataset of the suite behind one entry point: ``get_dataset(name, split, root, **options)``.

Items are ``(image, factors)``: ``image`` uint8 (C, H, W) in 0..255, ``factors`` int64 (K,) factor
indices or an empty int64 tensor (see docs/architecture.md). Archived datasets (cifar10,
imagenet32, celebahq256, shapes3d, dsprites) are read from ``root``, the output directory of their
prepare step. Embedded datasets (patches32, dsprites_procedural, shapes3d_procedural) need no
download: they are built from installed packages or rendered, in memory, or cached under ``root``.
Factor datasets also give a ``GroundTruthData`` via ``get_ground_truth`` for the metrics.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sdn.data import dsprites_procedural, patches, shapes3d_procedural
from sdn.data.download import DownloadError, download
from sdn.data.factor_grid import FactorGridData
from sdn.data.ground_truth import GroundTruthData
from sdn.data.prepare import embedded_options, prepare, rendered_grid
from sdn.data.storage import (
    ArrayImages,
    PreparedDataError,
    PreparedImages,
    factors_path,
    image_path,
    load_array,
    read_meta,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DownloadError",
    "GroundTruthData",
    "PreparedDataError",
    "download",
    "get_dataset",
    "get_ground_truth",
    "prepare",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset."""

    name: str
    splits: tuple[str, ...]
    embedded: bool  # built without a download
    has_factors: bool
    image_shape: tuple[int, int, int]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", ("train", "test"), False, False, (3, 32, 32)),
        DatasetInfo("imagenet32", ("train", "validation"), False, False, (3, 32, 32)),
        DatasetInfo("celebahq256", ("train", "validation"), False, False, (3, 256, 256)),
        DatasetInfo("shapes3d", ("train",), False, True, (3, 64, 64)),
        DatasetInfo("dsprites", ("train",), False, True, (1, 64, 64)),
        DatasetInfo("patches32", ("train", "validation", "test"), True, False, (3, 32, 32)),
        DatasetInfo("dsprites_procedural", ("train",), True, True, (1, 64, 64)),
        DatasetInfo("shapes3d_procedural", ("train",), True, True, (3, 64, 64)),
    )
}


def _info(name: str, split: str | None = None) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}, expected one of {sorted(DATASETS)}")
    info = DATASETS[name]
    if split is not None and split not in info.splits:
        raise ValueError(f"{name} has splits {list(info.splits)}, got {split!r}")
    return info


def get_dataset(
    name: str, split: str = "train", root: str | Path | None = None, **options: Any
) -> Dataset:
    """The ``split`` of dataset ``name`` as a torch Dataset of (uint8 image, int64 factors).

    Archived datasets need ``root`` = their prepare output directory and take no options.
    Embedded ones take builder options (patches32: patch_size, region, levels, validation_fraction,
    test_fraction, seed;
    dsprites_procedural / shapes3d_procedural: num, seed; ``num=None`` is the whole factor grid,
    rendered on demand) and, with ``root``, are read from there: the folder ``prepare`` built with
    the same options (a ValueError names a folder built with others; nothing is written here).
    """
    info = _info(name, split)
    if not info.embedded:
        if root is None:
            raise ValueError(
                f"{name} is prepared from a download: pass root=<its prepare output directory>"
            )
        if options:
            raise ValueError(f"{name} takes no options, got {sorted(options)}")
        return _prepared(name, root, split)
    options = embedded_options(name, options)
    if options.get("num", 0) is None:  # the whole factor grid, rendered on demand
        return rendered_grid(name)
    if root is not None:
        built_with = read_meta(root).get("options")
        if built_with != options:
            raise ValueError(f"{root} holds {name} prepared with options {built_with}, not {options}: "
                             f"prepare it again with these options (sdn.data.prepare)")
        return _prepared(name, root, split)
    images, factors = _built(name, json.dumps(options, sort_keys=True))[split]
    return ArrayImages(images, factors)


def _prepared(name: str, root: str | Path, split: str) -> PreparedImages:
    dataset = PreparedImages(root, split)
    if dataset.meta.get("name") != name:
        raise ValueError(f"{root} holds dataset {dataset.meta.get('name')!r}, not {name!r}")
    return dataset


@functools.lru_cache(maxsize=4)
def _built(name: str, options_json: str) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """In-memory build of an embedded dataset (cached per process; arrays are read-only)."""
    options = json.loads(options_json)
    if name == "patches32":
        built = patches.build_patches32(**options, progress=False)
        result = {split: (data.images, None) for split, data in built.items()}
    else:
        module = dsprites_procedural if name == "dsprites_procedural" else shapes3d_procedural
        factors = module.subsample_factors(options["num"], options["seed"])
        result = {"train": (module.render_factors(factors), factors)}
    for images, factors in result.values():
        images.setflags(write=False)
        if factors is not None:
            factors.setflags(write=False)
    return result


def get_ground_truth(name: str, root: str | Path | None = None, **options: Any) -> GroundTruthData:
    """The ``GroundTruthData`` of a factor dataset (for the disentanglement metrics).

    shapes3d / dsprites: over the prepared arrays under ``root`` (memory-mapped).
    dsprites_procedural / shapes3d_procedural: rendered on demand (option ``cache_size``).
    """
    info = _info(name)
    if not info.has_factors:
        factor_sets = sorted(n for n, i in DATASETS.items() if i.has_factors)
        raise ValueError(f"{name} has no ground-truth factors; factor datasets: {factor_sets}")
    if name == "dsprites_procedural":
        return dsprites_procedural.DSpritesProcedural(**_ground_truth_options(name, options))
    if name == "shapes3d_procedural":
        return shapes3d_procedural.Shapes3DProcedural(**_ground_truth_options(name, options))
    if root is None:
        raise ValueError(f"{name} is prepared from a download: pass root=<its prepare output directory>")
    if options:
        raise ValueError(f"{name} takes no options, got {sorted(options)}")
    meta = read_meta(root)
    if meta.get("name") != name:
        raise ValueError(f"{root} holds dataset {meta.get('name')!r}, not {name!r}")
    rows = meta["splits"]["train"].get("num")
    return FactorGridData(
        load_array(image_path(root, "train"), rows, name),
        load_array(factors_path(root, "train"), rows, name, mmap_mode=None),
        meta["factor_names"],
        meta["factor_sizes"],
    )


def _ground_truth_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    cls = (
        dsprites_procedural.DSpritesProcedural
        if name == "dsprites_procedural"
        else shapes3d_procedural.Shapes3DProcedural
    )
    allowed = set(inspect.signature(cls).parameters)
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"{name}: unknown options {sorted(unknown)}, expected some of {sorted(allowed)}")
    return options
