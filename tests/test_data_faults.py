"""A damaged prepared dataset (a file cut short, a corrupt meta.json) is named, with how to rebuild it:
``sdn.data`` names the file and ``sdn.data.prepare``; the study adds the DVC command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sdn.data import PreparedDataError, get_dataset, get_ground_truth, prepare
from sdn.data.storage import factors_path, image_path, write_meta

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num": 32, "seed": 0}
PATCHES = {"patch_size": 8, "region": 16, "levels": 1, "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 0}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture()
def dsprites(tmp_path) -> Path:
    out = tmp_path / "dsprites_procedural"
    prepare("dsprites_procedural", out, progress=False, **SMALL)
    return out


def test_truncated_images_are_named_and_prepare_rebuilds_them(dsprites):
    before = np.array(get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL).images)
    truncate(image_path(dsprites, "train"))
    with pytest.raises(PreparedDataError) as info:
        get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)
    message = str(info.value)
    assert str(image_path(dsprites, "train")) in message and "truncated" in message
    assert f"prepare it again with sdn.data.prepare('dsprites_procedural', '{dsprites}', ...)" in message
    assert info.value.path == image_path(dsprites, "train")
    # prepare (without force) does not trust the damaged folder: it rebuilds the same arrays
    prepare("dsprites_procedural", dsprites, progress=False, **SMALL)
    assert np.array_equal(get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL).images, before)


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.99])
def test_any_cut_of_an_array_file_is_named(dsprites, keep):
    truncate(image_path(dsprites, "train"), keep)
    with pytest.raises(PreparedDataError, match=r"train_images\.npy is truncated or corrupt"):
        get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)


def test_truncated_factors_and_a_wrong_row_count_are_named(dsprites):
    truncate(factors_path(dsprites, "train"))
    with pytest.raises(PreparedDataError, match=r"train_factors\.npy is truncated or corrupt"):
        get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)
    # a whole file of the wrong length (e.g. copied from another build) is named too
    np.save(factors_path(dsprites, "train"), np.zeros((16, 5), np.int64))
    with pytest.raises(PreparedDataError, match=r"train_factors\.npy holds shape \(16, 5\), but meta.json records 32"):
        get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)


def test_ground_truth_of_a_truncated_folder_is_named(tmp_path):
    out = tmp_path / "dsprites"
    out.mkdir()
    images = np.zeros((8, 1, 64, 64), np.uint8)
    np.save(image_path(out, "train"), images)
    np.save(factors_path(out, "train"), np.zeros((8, 5), np.int64))
    write_meta(out, {"name": "dsprites", "splits": {"train": {"num": 8, "image_shape": [1, 64, 64]}},
                     "factor_names": list("abcde"), "factor_sizes": [1, 1, 1, 2, 4]})
    truncate(factors_path(out, "train"))
    with pytest.raises(PreparedDataError, match=r"train_factors\.npy is truncated"):
        get_ground_truth("dsprites", root=out)


@pytest.mark.parametrize("content", [None, b"", b"[1, 2]", b"\xff\xfe"])
def test_corrupt_meta_json_is_named(dsprites, content):
    meta = dsprites / "meta.json"
    if content is None:
        truncate(meta)
    else:
        meta.write_bytes(content)
    with pytest.raises(PreparedDataError, match=r"meta\.json (is truncated or not valid JSON|does not hold)"):
        get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)


def test_the_study_adds_the_dvc_command_that_rebuilds_an_embedded_dataset(tmp_path):
    from pipelines.study import validate

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["patches32"]["options"] = dict(PATCHES)
    out = tmp_path / "patches32"
    prepare("patches32", out, progress=False, **PATCHES)
    study = validate(params).with_data("patches32", out)
    assert len(study.prepared("patches32", "train")) > 0
    truncate(image_path(out, "train"))
    with pytest.raises(PreparedDataError) as info:
        study.prepared("patches32", "train")
    message = str(info.value)
    assert str(image_path(out, "train")) in message
    assert message.endswith("rebuild it with: dvc repro -f prepare_embedded@patches32")
    with pytest.raises(PreparedDataError, match="dvc repro -f prepare_embedded@patches32"):
        study.dataset("patches32", "train")  # what the stages call


def test_the_study_adds_the_dvc_command_that_rebuilds_an_archived_dataset(tmp_path):
    from pipelines.study import validate

    params = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    out = tmp_path / "cifar10"
    out.mkdir()
    np.save(image_path(out, "train"), np.zeros((16, 3, 32, 32), np.uint8))
    write_meta(out, {"name": "cifar10", "splits": {"train": {"num": 16, "image_shape": [3, 32, 32]}}})
    study = validate(copy.deepcopy(params)).with_data("cifar10", out)
    assert len(study.prepared("cifar10", "train")) == 16
    (out / "meta.json").write_text(json.dumps({"name": "cifar10"})[:-3])
    with pytest.raises(PreparedDataError) as info:
        study.prepared("cifar10", "train")
    assert str(out / "meta.json") in str(info.value)
    assert str(info.value).endswith("rebuild it with: dvc repro -f prepare@cifar10")


def test_a_whole_prepared_dataset_reads_as_before(dsprites):
    data = get_dataset("dsprites_procedural", "train", root=dsprites, **SMALL)
    image, factors = data[3]
    assert image.dtype == torch.uint8 and factors.dtype == torch.int64 and len(data) == 32
