"""Download + prepare of every archived dataset, on small files in the real formats."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fixtures_data import (
    make_cifar10_tarball,
    make_dsprites_npz,
    make_glow_tar,
    make_shapes3d_h5,
    serve,
    tfrecord_bytes,
    url,
)
from sdn.data import get_dataset, get_ground_truth, prepare
from sdn.data.ground_truth import GroundTruthData

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cifar10_pipeline_scripts_end_to_end(tmp_path):
    """download.py + prepare.py driven by a params.yaml, against the local server."""
    www = tmp_path / "www"
    www.mkdir()
    expected = make_cifar10_tarball(www / "cifar-10-python.tar.gz", per_batch=3, num_test=4)
    md5 = hashlib.md5((www / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    with serve(www) as server:
        section = {
            "url": url(server, "ok", "cifar-10-python.tar.gz"),
            "md5": md5,
            "retries": 0,
        }
        raw, out = tmp_path / "raw", tmp_path / "prepared" / "cifar10"  # dvc.yaml's --raw / --out
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"data": {"cifar10": section}}))
        download, prepare_cli = _script("download"), _script("prepare")
        fetch = ["--dataset", "cifar10", "--params", str(params), "--quiet", "--raw", str(raw)]
        build = [*fetch, "--out", str(out)]
        assert download.main(fetch) == 0
        assert prepare_cli.main(build) == 0
        requests = len(server.requests)
        assert download.main(fetch) == 0
        assert len(server.requests) == requests  # second run: no download

    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "test"):
        images, labels = expected[split]
        stored = np.load(out / f"{split}_images.npy", mmap_mode="r")
        assert stored.dtype == np.uint8 and stored.shape == images.shape
        np.testing.assert_array_equal(stored, images)
        np.testing.assert_array_equal(np.load(out / f"{split}_labels.npy"), labels)
        assert meta["splits"][split]["num"] == len(images)
    assert meta["name"] == "cifar10" and meta["source"]["url"] == section["url"]
    assert meta["source"]["sha256"] == hashlib.sha256((raw / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    assert (out / "sample_grid.png").stat().st_size > 0
    assert _no_temp_dirs(out.parent)

    # a second prepare with the same archive does nothing
    stamp = (out / "train_images.npy").stat().st_mtime_ns
    assert prepare_cli.main(build) == 0
    assert (out / "train_images.npy").stat().st_mtime_ns == stamp

    data = get_dataset("cifar10", "test", root=out)
    image, factors = data[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(expected["test"][0][1]))
    assert factors.dtype == torch.int64 and factors.numel() == 0
    assert len(data) == 4


def test_download_cli_reports_failure_with_exit_code(tmp_path, capsys):
    www = tmp_path / "www"
    www.mkdir()
    (www / "3dshapes.h5").write_bytes(b"not an h5 file at all")
    with serve(www) as server:
        params = tmp_path / "params.yaml"
        section = {"url": url(server, "ok", "3dshapes.h5"), "md5": "0" * 32, "retries": 0}
        params.write_text(yaml.safe_dump({"data": {"shapes3d": section}}))
        assert _script("download").main(["--dataset", "shapes3d", "--params", str(params), "--quiet",
                                         "--raw", str(tmp_path / "raw")]) == 1
    err = capsys.readouterr().err
    assert "shapes3d" in err and section["url"] in err and "0" * 32 in err
    assert not (tmp_path / "raw" / "3dshapes.h5").exists()


@pytest.mark.parametrize("shuffle", [False, True])
def test_shapes3d_prepare_and_ground_truth(tmp_path, shuffle):
    images, grid = make_shapes3d_h5(tmp_path / "3dshapes.h5", sizes=(2, 2, 1, 2, 2, 3), shuffle=shuffle)
    with pytest.warns(UserWarning, match="factor sizes"):
        meta = prepare("shapes3d", tmp_path / "out", archive=tmp_path / "3dshapes.h5", progress=False)
    assert meta["factor_sizes"] == [2, 2, 1, 2, 2, 3]
    assert meta["factor_names"] == ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    assert meta["factor_values"][5] == pytest.approx([-30.0, -25.714285714285715, -21.428571428571427])
    stored = np.load(tmp_path / "out" / "train_images.npy")
    np.testing.assert_array_equal(stored, images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "train_factors.npy"), grid)

    data = get_ground_truth("shapes3d", root=tmp_path / "out")
    assert isinstance(data, GroundTruthData)
    assert data.observation_shape == (3, 64, 64)
    rng = np.random.RandomState(0)
    factors = data.sample_factors(20, rng)
    assert factors.dtype == np.int64 and factors.shape == (20, 6)
    assert (factors < np.array(data.factors_num_values)).all() and (factors >= 0).all()
    observed = data.sample_observations_from_factors(factors, rng)
    for f, obs in zip(factors, observed):
        row = np.flatnonzero((grid == f).all(axis=1))  # independent lookup in the file's order
        assert len(row) == 1
        np.testing.assert_array_equal(obs, images[row[0]].transpose(2, 0, 1))

    item_image, item_factors = get_dataset("shapes3d", "train", root=tmp_path / "out")[5]
    assert item_factors.tolist() == grid[5].tolist()
    assert torch.equal(item_image, torch.from_numpy(images[5].transpose(2, 0, 1).copy()))


def test_shapes3d_incomplete_grid_is_rejected(tmp_path):
    import h5py

    images, grid = make_shapes3d_h5(tmp_path / "full.h5", sizes=(2, 1, 1, 1, 2, 2))
    with h5py.File(tmp_path / "full.h5") as src, h5py.File(tmp_path / "cut.h5", "w") as dst:
        dst["images"] = src["images"][:-1]
        dst["labels"] = src["labels"][:-1]
    with pytest.raises(ValueError, match="grid"):
        prepare("shapes3d", tmp_path / "out", archive=tmp_path / "cut.h5", progress=False)
    assert not (tmp_path / "out").exists() and _no_temp_dirs(tmp_path)


def test_dsprites_prepare_and_ground_truth(tmp_path):
    imgs, classes = make_dsprites_npz(tmp_path / "d.npz", sizes=(3, 2, 2, 2, 2))
    with pytest.warns(UserWarning, match="factor sizes"):
        meta = prepare("dsprites", tmp_path / "out", archive=tmp_path / "d.npz", progress=False, chunk=7)
    stored = np.load(tmp_path / "out" / "train_images.npy")
    assert stored.shape == (48, 1, 64, 64) and set(np.unique(stored)) <= {0, 255}
    np.testing.assert_array_equal(stored[:, 0], imgs.astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "train_factors.npy"), classes[:, 1:])
    assert meta["factor_sizes"] == [3, 2, 2, 2, 2]
    assert meta["factor_values"][1] == pytest.approx([0.5, 0.6])

    data = get_ground_truth("dsprites", root=tmp_path / "out")
    factors = np.array([[2, 1, 0, 1, 1], [0, 0, 1, 0, 1]])
    observed = data.sample_observations_from_factors(factors, np.random.RandomState(0))
    for f, obs in zip(factors, observed):
        row = np.flatnonzero((classes[:, 1:] == f).all(axis=1))[0]
        np.testing.assert_array_equal(obs[0], imgs[row] * 255)
    with pytest.raises(ValueError):
        data.sample_observations_from_factors(np.array([[3, 0, 0, 0, 0]]), np.random.RandomState(0))


@pytest.mark.parametrize(
    "name,top,resolution,counts,shards",
    [
        ("imagenet32", "imagenet-oord-tfr", 32, {"train": 7, "validation": 3}, {"train": 3, "validation": 2}),
        ("celebahq256", "celeba-tfr", 256, {"train": 3, "validation": 2}, {"train": 2, "validation": 1}),
    ],
)
def test_glow_tfrecord_prepare(tmp_path, name, top, resolution, counts, shards):
    expected = make_glow_tar(
        tmp_path / "a.tar", top, resolution, counts, shards, decoy_resolution=16,
        attr=name == "celebahq256",
    )
    with pytest.warns(UserWarning, match="Glow's scripts wrote"):
        meta = prepare(name, tmp_path / "out", archive=tmp_path / "a.tar", progress=False)
    for split, images in expected.items():
        stored = np.load(tmp_path / "out" / f"{split}_images.npy")
        assert stored.shape == (counts[split], 3, resolution, resolution)
        np.testing.assert_array_equal(stored, images)
        assert meta["splits"][split]["num"] == counts[split]
    data = get_dataset(name, "validation", root=tmp_path / "out")
    assert torch.equal(data[0][0], torch.from_numpy(expected["validation"][0].copy()))
    with pytest.raises(ValueError, match="splits"):
        get_dataset(name, "test", root=tmp_path / "out")


@pytest.mark.filterwarnings("ignore:.*Glow's scripts wrote")
def test_glow_corrupt_record_fails_atomically(tmp_path):
    import io
    import tarfile

    make_glow_tar(tmp_path / "good.tar", "imagenet-oord-tfr", 32, {"train": 2, "validation": 2},
                  {"train": 1, "validation": 1})
    with tarfile.open(tmp_path / "good.tar") as src, tarfile.open(tmp_path / "bad.tar", "w") as dst:
        for member in src.getmembers():
            data = bytearray(src.extractfile(member).read())
            if "validation-r05" in member.name:
                data[100] ^= 0xFF  # a pixel byte of the first record
            member.size = len(data)
            dst.addfile(member, io.BytesIO(bytes(data)))
    with pytest.raises(ValueError, match="CRC"):
        prepare("imagenet32", tmp_path / "out", archive=tmp_path / "bad.tar", progress=False)
    assert not (tmp_path / "out").exists() and _no_temp_dirs(tmp_path)


def test_glow_missing_shard_is_reported(tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        data = tfrecord_bytes([])
        info = tarfile.TarInfo("celeba-tfr/train/train-r08-s-0000-of-0002.tfrecords")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="1 of 2 shards missing"):
        prepare("celebahq256", tmp_path / "out", archive=tmp_path / "a.tar", progress=False)


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar10") as info:
        get_dataset("cifar100", "train")
    assert "patches32" in str(info.value)  # lists the known names
    with pytest.raises(ValueError, match="splits"):
        get_dataset("patches32", "valid")
    with pytest.raises(ValueError, match="root"):
        get_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="no ground-truth factors"):
        get_ground_truth("cifar10")
    with pytest.raises(FileNotFoundError, match="prepare"):
        get_dataset("shapes3d", "train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown options"):
        get_dataset("dsprites_procedural", "train", number=3)
    with pytest.raises(ValueError, match="archive"):
        prepare("dsprites", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown options"):
        prepare("cifar10", tmp_path / "x", archive=tmp_path / "a.tar.gz", bits=5)
    with pytest.raises(ValueError, match="unknown options"):
        prepare("patches32", tmp_path / "x", seeds=1)


def test_prepared_dataset_pickles_without_its_arrays(tmp_path):
    import pickle

    make_dsprites_npz(tmp_path / "d.npz", sizes=(3, 1, 1, 2, 2))
    with pytest.warns(UserWarning):
        prepare("dsprites", tmp_path / "out", archive=tmp_path / "d.npz", progress=False)
    data = get_dataset("dsprites", "train", root=tmp_path / "out")
    first = data[3]
    blob = pickle.dumps(data)
    assert len(blob) < 4096  # 12 images of 4 KiB would not fit: the memory maps are not pickled
    clone = pickle.loads(blob)
    assert torch.equal(clone[3][0], first[0]) and torch.equal(clone[3][1], first[1])


def test_prepare_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        prepare("dsprites_procedural", tmp_path / "data", progress=False, num=10, seed=0)
    with pytest.raises(FileNotFoundError, match="prepare"):  # reading never builds
        get_dataset("dsprites_procedural", "train", root=tmp_path / "data", num=10)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert _no_temp_dirs(tmp_path)
