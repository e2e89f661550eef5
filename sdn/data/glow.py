"""Read Glow's tfrecord archives (imagenet-oord-tfr.tar, celeba-tfr.tar) into uint8 arrays.

Layout (openai/glow ``data_loaders``): ``<top>/<split>/<split>-rXX-s-SSSS-of-NNNN.tfrecords`` where
XX = log2(resolution) and split is ``train`` or ``validation``; each record is a tf.train.Example with
``data`` (bytes, raw uint8 H x W x 3), ``shape`` (int64 [H, W, 3]) and ``label`` (int64, 0 for these
two datasets; CelebA-HQ also has ``attr``). Shards are read in shard order, records in file order.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdn.data.storage import labels_path, new_image_array
from sdn.data.tfrecord import count_records, parse_example, read_records


def shard_members(archive: tarfile.TarFile, split: str, resolution: int) -> list[tarfile.TarInfo]:
    """The tar members holding ``split`` at ``resolution``, in shard order; all shards must exist."""
    log2 = int(np.log2(resolution))
    if 2**log2 != resolution:
        raise ValueError(f"resolution must be a power of two, got {resolution}")
    pattern = re.compile(
        rf"(?:^|/){split}/{split}-r{log2:02d}-s-(\d+)-of-(\d+)\.tfrecords$"
    )
    found: dict[int, tarfile.TarInfo] = {}
    totals = set()
    for member in archive.getmembers():
        match = pattern.search(member.name)
        if match and member.isfile():
            found[int(match.group(1))] = member
            totals.add(int(match.group(2)))
    if not found:
        raise ValueError(
            f"no '{split}/{split}-r{log2:02d}-s-*-of-*.tfrecords' shards in {archive.name}"
        )
    if len(totals) != 1:
        raise ValueError(f"{split} shards disagree on the shard count: {sorted(totals)}")
    (total,) = totals
    missing = sorted(set(range(total)) - set(found))
    if missing:
        raise ValueError(
            f"{split} r{log2:02d}: {len(missing)} of {total} shards missing (e.g. {missing[:5]})"
        )
    return [found[i] for i in range(total)]


def convert_split(
    archive_path: str | Path,
    split: str,
    resolution: int,
    out_dir: str | Path,
    progress: bool = True,
) -> int:
    """Write ``<out_dir>/<split>_images.npy`` (N, 3, R, R) and ``<split>_labels.npy``; return N."""
    with tarfile.open(archive_path, "r:") as archive:
        members = shard_members(archive, split, resolution)
        num = 0
        for member in tqdm(members, desc=f"count {split}", disable=not progress, leave=False):
            handle = archive.extractfile(member)
            assert handle is not None
            num += count_records(handle, name=member.name)
        images = new_image_array(out_dir, split, (num, 3, resolution, resolution))
        labels = np.zeros(num, dtype=np.int64)
        index = 0
        expected = (resolution, resolution, 3)
        with tqdm(total=num, desc=f"convert {split}", disable=not progress, unit="img") as bar:
            for member in members:
                handle = archive.extractfile(member)
                assert handle is not None
                for record in read_records(handle, verify=True, name=member.name):
                    example = parse_example(record)
                    shape = tuple(example.get("shape", []))
                    data = example.get("data", [])
                    if shape != expected or len(data) != 1:
                        raise ValueError(
                            f"{member.name} record {index}: shape {shape} / {len(data)} data "
                            f"entries, expected shape {expected} and one data entry"
                        )
                    pixels = np.frombuffer(data[0], dtype=np.uint8)  # type: ignore[arg-type]
                    if pixels.size != np.prod(expected):
                        raise ValueError(
                            f"{member.name} record {index}: {pixels.size} bytes, expected "
                            f"{int(np.prod(expected))}"
                        )
                    images[index] = pixels.reshape(expected).transpose(2, 0, 1)
                    labels[index] = int(example.get("label", [0])[0])  # type: ignore[arg-type]
                    index += 1
                    bar.update(1)
        images.flush()
        del images
        np.save(labels_path(out_dir, split), labels)
    return num
