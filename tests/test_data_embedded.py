"""Embedded datasets (no network): patches32, dsprites_procedural, shapes3d_procedural."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from sdn.data import get_dataset, get_ground_truth, prepare
from sdn.data import dsprites_procedural as dsp
from sdn.data import patches
from sdn.data import shapes3d_procedural as s3p
from sdn.data.ground_truth import GroundTruthData

# ------------------------------------------------------------------------------ patches32


@pytest.fixture(scope="module")
def patch_sets():
    return patches.build_patches32(progress=False)


def _load_independently(name: str) -> np.ndarray:
    """The source photograph, loaded here without the code under test."""
    if name == "flower" or name == "china":
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        return data.images[[f.endswith(f"{name}.jpg") for f in data.filenames].index(True)]
    if name == "grace_hopper":
        import matplotlib.image
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            return matplotlib.image.imread(handle, format="jpg")
    import skimage.data

    return getattr(skimage.data, name)()


def _footprints(split, patch: int = 32):
    """Per source: (boolean pixel mask of the photograph, summed area) covered by the split's patches."""
    out = {}
    for source, level, row, col in split.origins:
        f = 2 ** int(level)
        name = split.sources[source]
        if name not in out:
            out[name] = [np.zeros(_load_independently(name).shape[:2], dtype=bool), {}]
        mask, area = out[name]
        mask[row * f:(row + patch) * f, col * f:(col + patch) * f] = True
        area[level] = area.get(level, 0) + (patch * f) ** 2
    return out


def test_patches32_shapes_sizes_and_every_source_in_every_split(patch_sets):
    assert set(patch_sets) == {"train", "validation", "test"}
    for split in patch_sets.values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.origins.shape == (len(split.images), 4)
        assert {split.sources[i] for i in np.unique(split.origins[:, 0])} == set(patches.SOURCES)
    sizes = {k: len(v.images) for k, v in patch_sets.items()}
    assert sizes == {"train": 4536, "validation": 651, "test": 651}  # docs/datasets.md states these


def test_patches32_no_pixel_in_two_splits_and_no_overlap_inside_a_split(patch_sets):
    covered = {name: _footprints(split) for name, split in patch_sets.items()}
    for source in patches.SOURCES:
        masks = [covered[split][source][0] for split in covered]
        assert not np.any(masks[0] & masks[1]) and not np.any(masks[0] & masks[2]) and not np.any(masks[1] & masks[2])
        for split in covered:  # the patches of one level tile their regions without overlap
            mask, area = covered[split][source]
            for level, total in area.items():
                assert total == mask.sum(), (split, source, level)


def test_patches32_patches_are_crops_and_block_means_of_their_photo(patch_sets):
    from skimage.transform import downscale_local_mean

    for split in ("train", "test"):
        data = patch_sets[split]
        for i in range(0, len(data.images), max(1, len(data.images) // 40)):
            source, level, row, col = data.origins[i]
            photo = _load_independently(data.sources[source])[..., :3]
            f = 2 ** int(level)
            window = photo[row * f:(row + 32) * f, col * f:(col + 32) * f].astype(float)
            expected = np.rint(downscale_local_mean(window, (f, f, 1))).astype(np.uint8) if f > 1 else photo[
                row:row + 32, col:col + 32]
            np.testing.assert_array_equal(data.images[i], expected.transpose(2, 0, 1))


def test_patches32_region_splits_counts_and_permutation():
    labels = patches.region_splits(20, 0.1, 0.2, np.random.default_rng(0))
    assert np.bincount(labels, minlength=3).tolist() == [14, 2, 4]
    assert patches.region_splits(3, 0.01, 0.01, np.random.default_rng(0)).tolist().count(0) == 1
    other = patches.region_splits(20, 0.1, 0.2, np.random.default_rng(1))
    assert not np.array_equal(labels, other)


def test_patches32_pyramid_is_block_mean_of_the_photo():
    from skimage.transform import downscale_local_mean

    photo = _load_independently("chelsea")  # 300 x 451: odd width exercises the edge crop
    levels = patches.pyramid(photo, 4)
    for k, level in enumerate(levels):
        f = 2**k
        h, w = photo.shape[0] // f * f, photo.shape[1] // f * f
        expected = downscale_local_mean(photo[:h, :w].astype(float), (f, f, 1))
        assert level.dtype == np.uint8 and level.shape == expected.shape
        np.testing.assert_array_equal(level, np.rint(expected).astype(np.uint8))


def test_patches32_deterministic_and_seeded(patch_sets):
    again = patches.build_patches32(progress=False)
    for split in patch_sets:
        assert again[split].images.tobytes() == patch_sets[split].images.tobytes()
        np.testing.assert_array_equal(again[split].origins, patch_sets[split].origins)
    other = patches.build_patches32(seed=1, progress=False)
    assert not np.array_equal(other["test"].origins, patch_sets["test"].origins)


def test_patches32_other_sizes(patch_sets):
    small = patches.build_patches32(patch_size=16, region=64, levels=2, progress=False)
    assert small["train"].images.shape[1:] == (3, 16, 16)
    assert set(np.unique(small["test"].origins[:, 1])) == {0, 1}
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patches.build_patches32(patch_size=32, region=96, levels=3)
    with pytest.raises(ValueError, match="test_fraction"):
        patches.build_patches32(test_fraction=0.0)


def test_patches32_in_memory_equals_the_prepared_folder(tmp_path):
    """The same options give the same images in memory and from the folder ``prepare`` built;
    ``get_dataset`` only reads that folder, and refuses it for other options without touching it."""
    options = {"patch_size": 16, "region": 32, "levels": 1, "seed": 3}
    memory = get_dataset("patches32", "validation", **options)
    image, factors = memory[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert factors.dtype == torch.int64 and factors.numel() == 0
    prepare("patches32", tmp_path / "p", progress=False, **options)
    assert (tmp_path / "p" / "sample_grid.png").is_file()
    cached = get_dataset("patches32", "validation", root=tmp_path / "p", **options)
    assert len(cached) == len(memory)
    assert all(torch.equal(cached[i][0], memory[i][0]) for i in range(len(memory)))
    stamp = (tmp_path / "p" / "test_images.npy").stat().st_mtime_ns
    explicit = {**options, "test_fraction": 0.1}  # the default: the same build
    get_dataset("patches32", "train", root=tmp_path / "p", **explicit)
    with pytest.raises(ValueError, match="prepared with options"):
        get_dataset("patches32", "validation", root=tmp_path / "p", **{**options, "seed": 4})
    assert (tmp_path / "p" / "test_images.npy").stat().st_mtime_ns == stamp  # never rebuilt by a read


# ------------------------------------------------------------------------------ dsprites


def _reference_dsprite(shape: int, scale: float, theta: float, px: float, py: float) -> np.ndarray:
    """The documented geometry evaluated at every pixel centre of the 64x64 canvas, per pixel."""
    out = np.zeros((64, 64), dtype=np.uint8)
    x0, y0, a = 12 + 40 * px, 12 + 40 * py, 7.5 * scale
    for r in range(64):
        for c in range(64):
            dx, dy = (c + 0.5) - x0, y0 - (r + 0.5)
            u = (np.cos(theta) * dx + np.sin(theta) * dy) / a
            v = (-np.sin(theta) * dx + np.cos(theta) * dy) / a
            if shape == 0:
                inside = max(abs(u), abs(v)) <= 1
            elif shape == 1:
                inside = u * u + 4 * v * v <= 1
            else:
                p, q = u / 0.9, v / 0.9 + 0.125
                inside = (p * p + q * q - 1) ** 3 - p * p * q**3 <= 0
            out[r, c] = 255 if inside else 0
    return out


def test_dsprites_grid_and_protocol():
    data = get_ground_truth("dsprites_procedural")
    assert isinstance(data, GroundTruthData)
    assert tuple(data.factors_num_values) == (3, 6, 40, 32, 32)
    assert int(np.prod(data.factors_num_values)) == 737280 == len(data)
    assert tuple(data.factor_names) == ("shape", "scale", "orientation", "posX", "posY")
    assert data.observation_shape == (1, 64, 64)


def test_dsprites_matches_per_pixel_reference():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, n, 12) for n in dsp.FACTOR_SIZES], axis=1)
    extremes = np.array([[s, 5, o, x, y] for s in range(3) for o in (0, 13) for x in (0, 31) for y in (0, 31)])
    factors = np.concatenate([factors, extremes])
    images = dsp.render_factors(factors)
    assert images.shape == (len(factors), 1, 64, 64) and images.dtype == np.uint8
    for f, image in zip(factors, images):
        reference = _reference_dsprite(
            f[0], np.linspace(0.5, 1, 6)[f[1]], np.linspace(0, 2 * np.pi, 40)[f[2]],
            np.linspace(0, 1, 32)[f[3]], np.linspace(0, 1, 32)[f[4]],
        )
        assert (image[0] != reference).sum() <= 1, f  # identical up to float ties on an edge


def _centroid(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(image)
    return float(cols.mean() + 0.5), float(rows.mean() + 0.5)


def test_dsprites_square_centroid_follows_position():
    for px in (0.0, 0.3, 1.0):
        for py in (0.0, 0.55, 1.0):
            image = dsp.render(np.array([0]), 1.0, 0.0, px, py)[0, 0]
            cx, cy = _centroid(image)
            assert cx == pytest.approx(12 + 40 * px, abs=0.5)
            assert cy == pytest.approx(12 + 40 * py, abs=0.5)  # posY grows downwards


def test_dsprites_area_grows_with_scale_squared():
    scales = np.linspace(0.5, 1.0, 6)
    for shape, unit_area in ((0, 15.0**2), (1, np.pi * 7.5 * 3.75), (2, None)):
        areas = np.array(
            [(dsp.render(np.array([shape]), s, 0.4, 0.5, 0.5) > 0).sum() for s in scales], dtype=float
        )
        if unit_area is not None:
            np.testing.assert_allclose(areas, unit_area * scales**2, rtol=0.12)
        np.testing.assert_allclose(areas / areas[-1], scales**2, rtol=0.12)


def test_dsprites_rotation_symmetries_up_to_a_pixel():
    def close(a, b):
        a, b = a > 0, b > 0
        grow = np.ones((3, 3), dtype=bool)
        return (a <= ndimage.binary_dilation(b, grow)).all() and (b <= ndimage.binary_dilation(a, grow)).all()

    square = dsp.render(np.array([0, 0]), 1.0, np.array([0.0, np.pi / 2]), 0.4, 0.6)
    assert close(square[0, 0], square[1, 0])
    ellipse = dsp.render(np.array([1, 1]), 0.8, np.array([0.3, 0.3 + np.pi]), 0.5, 0.5)
    assert close(ellipse[0, 0], ellipse[1, 0])
    turned = dsp.render(np.array([1, 1]), 1.0, np.array([0.0, np.pi / 2]), 0.5, 0.5)
    assert not close(turned[0, 0], turned[1, 0])  # an ellipse is not 90-degree symmetric
    wide, tall = (turned[i, 0] > 0 for i in range(2))
    assert np.ptp(np.nonzero(wide)[1]) > np.ptp(np.nonzero(wide)[0])  # long axis horizontal
    assert np.ptp(np.nonzero(tall)[0]) > np.ptp(np.nonzero(tall)[1])  # long axis vertical


def test_dsprites_deterministic_cached_and_fast():
    factors = dsp.subsample_factors(10000, seed=0)
    assert len(np.unique(np.ravel_multi_index(tuple(factors.T), dsp.FACTOR_SIZES))) == 10000
    start = time.perf_counter()
    images = dsp.render_factors(factors)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed  # measured about 1 s on 2 shared cores
    assert set(np.unique(images)) == {0, 255}
    data = dsp.DSpritesProcedural(cache_size=50)
    rng = np.random.RandomState(0)
    picks = factors[:80]
    first = data.sample_observations_from_factors(picks, rng)
    second = data.sample_observations_from_factors(picks[::-1], rng)  # partly from the cache
    np.testing.assert_array_equal(first, images[:80])
    np.testing.assert_array_equal(second, images[:80][::-1])


def test_dsprites_procedural_dataset_items():
    dataset = get_dataset("dsprites_procedural", "train", num=300, seed=1)
    assert len(dataset) == 300
    image, factors = dataset[7]
    assert image.shape == (1, 64, 64) and image.dtype == torch.uint8
    assert factors.shape == (5,) and factors.dtype == torch.int64
    rendered = dsp.render_factors(factors.numpy()[None])[0]
    np.testing.assert_array_equal(image.numpy(), rendered)
    other = get_dataset("dsprites_procedural", "train", num=300, seed=2)
    assert not torch.equal(torch.stack([other[i][1] for i in range(10)]),
                           torch.stack([dataset[i][1] for i in range(10)]))




def test_dsprites_full_grid_rendered_on_demand_through_a_dataloader(tmp_path):
    """num=None: all 737,280 grid points, item i is grid point i in C order (checked with a
    hand-written mixed-radix decoding), batches rendered through __getitems__, and prepare writes
    only meta.json and the sample grid."""
    from torch.utils.data import DataLoader

    from sdn.data.prepare import prepare

    dataset = get_dataset("dsprites_procedural", "train", num=None, seed=0)
    assert len(dataset) == 3 * 6 * 40 * 32 * 32 == 737280
    index = 123457
    expected, rest = [], index
    for size in reversed(dsp.FACTOR_SIZES):
        expected.append(rest % size)
        rest //= size
    image, factors = dataset[index]
    assert factors.tolist() == expected[::-1]
    np.testing.assert_array_equal(image.numpy(), dsp.render_factors(np.array([expected[::-1]]))[0])
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    images, batch_factors = next(iter(loader))
    assert images.shape == (16, 1, 64, 64) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images.numpy(), dsp.render_factors(batch_factors.numpy()))
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    meta = prepare("dsprites_procedural", tmp_path / "out", progress=False, num=None, seed=0)
    assert meta["splits"]["train"]["num"] == 737280 and meta["splits"]["train"]["rendered_on_demand"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "sample_grid.png"]
# ------------------------------------------------------------------------------ shapes3d


def _hsv(pixel_chw: np.ndarray) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(pixel_chw.astype(float) / 255.0)


def test_shapes3d_procedural_colours_follow_hue_factors():
    rng = np.random.default_rng(1)
    factors = np.stack([rng.integers(0, n, 40) for n in s3p.FACTOR_SIZES], axis=1)
    images = s3p.render_factors(factors)
    assert images.shape == (40, 3, 64, 64) and images.dtype == np.uint8
    for f, image in zip(factors, images):
        wall = _hsv(image[:, 2, 60])  # right wall, whatever the orientation
        floor = _hsv(image[:, 63, 1])  # bottom-left floor, never covered by the object
        obj = _hsv(image[:, 50, 32])  # inside every object at every scale
        for hsv, hue_index, value in ((wall, f[1], 1.0), (floor, f[0], 0.9), (obj, f[2], None)):
            assert min(abs(hsv[0] - hue_index / 10), 1 - abs(hsv[0] - hue_index / 10)) < 0.01
            assert hsv[1] == pytest.approx(1.0, abs=0.01)
            if value is not None:
                assert hsv[2] == pytest.approx(value, abs=0.01)


def test_shapes3d_procedural_scale_and_orientation():
    def object_area(image: np.ndarray, hue: int) -> int:
        hsv = np.moveaxis(_hsv(np.moveaxis(image, 0, -1)), -1, 0)
        return int((np.abs(hsv[0] - hue / 10) < 0.01).sum())

    for shape in range(4):
        factors = np.array([[0, 0, 5, s, shape, 7] for s in range(8)])
        areas = [object_area(im, 5) for im in s3p.render_factors(factors)]
        assert all(b > a for a, b in zip(areas, areas[1:])), (shape, areas)
    turned = s3p.render_factors(np.array([[1, 3, 5, 4, k, o] for k in (0, 2) for o in (0, 14)]))
    cube_a, cube_b, sphere_a, sphere_b = turned
    window = (slice(None), slice(40, 56), slice(18, 46))
    assert not np.array_equal(cube_a[window], cube_b[window])  # a cube shows its side
    mask = np.abs(_hsv(np.moveaxis(sphere_a, 0, -1))[..., 0] - 0.5) < 0.01
    np.testing.assert_array_equal(sphere_a[:, mask], sphere_b[:, mask])  # a sphere does not
    assert not np.array_equal(sphere_a, sphere_b)  # but the room turns


def test_shapes3d_procedural_protocol_and_dataset():
    data = get_ground_truth("shapes3d_procedural", cache_size=10)
    assert isinstance(data, GroundTruthData)
    assert tuple(data.factors_num_values) == (10, 10, 10, 8, 4, 15) and len(data) == 480000
    rng = np.random.RandomState(0)
    factors = data.sample_factors(25, rng)
    np.testing.assert_array_equal(
        data.sample_observations_from_factors(factors, rng), s3p.render_factors(factors)
    )
    dataset = get_dataset("shapes3d_procedural", "train", num=50, seed=0)
    image, f = dataset[3]
    assert image.shape == (3, 64, 64) and f.shape == (6,)
    np.testing.assert_array_equal(image.numpy(), s3p.render_factors(f.numpy()[None])[0])
