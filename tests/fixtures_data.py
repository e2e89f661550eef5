"""Test helpers for the data layer: small archives in the REAL formats, and a local HTTP server.

The archives are written here independently of the code under test: CIFAR-10's python pickles,
3DShapes' h5, dSprites' npz, and Glow's tfrecord tar with tf.train.Example messages encoded by the
protobuf library and CRC-32C computed by a plain table-driven reference.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------ HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    requests: list[tuple[str, str | None]]
    flaky_done: set[str]


class _Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<file>: mode 'ok' (Range supported), 'norange' (ignores Range), 'truncate'
    (announces the full length, sends half, closes), 'flaky' (truncates the first request of each
    file only), 'html' (an HTML error page with status 200)."""

    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.lstrip("/").partition("/")
        if mode == "html":
            body = b"<!DOCTYPE html>\n<html><body>Quota exceeded</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        range_header = self.headers.get("Range")
        if range_header and mode != "norange":
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = mode == "truncate" or (mode == "flaky" and name not in self.server.flaky_done)
        if cut:
            self.server.flaky_done.add(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[_Server]:
    """Serve files of ``root`` on 127.0.0.1 (ephemeral port) from a thread; yields the server."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.root, server.requests, server.flaky_done = Path(root), [], set()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url(server: _Server, mode: str, name: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{mode}/{name}"


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ CIFAR-10


def make_cifar10_tarball(path: Path, per_batch: int = 3, num_test: int = 4, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz as the official one: pickled dicts of N x 3072 uint8 rows (R, G, B
    planes of 32x32) under cifar-10-batches-py/. Returns the expected arrays (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    expected = {"train": ([], []), "test": ([], [])}
    members: dict[str, bytes] = {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = num_test if batch == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {
            "batch_label": f"{batch} of 6",
            "labels": labels,
            "data": rows,
            "filenames": [f"img_{batch}_{i}.png" for i in range(n)],
        }
        members[batch] = pickle.dumps(entry, protocol=2)
        split = "test" if batch == "test_batch" else "train"
        expected[split][0].append(rows.reshape(n, 3, 32, 32))
        expected[split][1].extend(labels)
    members["batches.meta"] = pickle.dumps(
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, protocol=2
    )
    members["readme.html"] = b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; URL=...\">"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {
        split: (np.concatenate(images), np.asarray(labels)) for split, (images, labels) in expected.items()
    }


# ------------------------------------------------------------------------------ 3DShapes

SHAPES3D_VALUES = [
    np.arange(10) / 10.0,  # floor_hue
    np.arange(10) / 10.0,  # wall_hue
    np.arange(10) / 10.0,  # object_hue
    np.linspace(0.75, 1.25, 8),  # scale
    np.arange(4, dtype=np.float64),  # shape
    np.linspace(-30.0, 30.0, 15),  # orientation
]


def make_shapes3d_h5(path: Path, sizes=(2, 2, 1, 2, 2, 3), seed: int = 0, shuffle: bool = False):
    """3dshapes.h5 layout: 'images' (N, 64, 64, 3) uint8, 'labels' (N, 6) float64 factor VALUES,
    enumerated in C order (orientation fastest) over the first ``sizes[k]`` official values.
    Returns (images NHWC, factor indices (N, 6)) in file order."""
    import h5py

    grid = np.stack(np.meshgrid(*(np.arange(n) for n in sizes), indexing="ij"), -1).reshape(-1, 6)
    if shuffle:
        grid = grid[np.random.default_rng(seed + 1).permutation(len(grid))]
    labels = np.stack([SHAPES3D_VALUES[k][grid[:, k]] for k in range(6)], axis=1)
    images = np.random.default_rng(seed).integers(0, 256, (len(grid), 64, 64, 3), dtype=np.uint8)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("images", data=images)
        handle.create_dataset("labels", data=labels)
    return images, grid


# ------------------------------------------------------------------------------ dSprites


def make_dsprites_npz(path: Path, sizes=(3, 2, 2, 2, 2), seed: int = 0):
    """The dSprites npz keys: imgs (N, 64, 64) uint8 0/1, latents_values / latents_classes (N, 6)
    with column 0 = colour (one value), and a pickled 'metadata' dict. Returns (imgs, classes)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in sizes), indexing="ij"), -1).reshape(-1, 5)
    classes = np.concatenate([np.zeros((len(grid), 1), dtype=np.int64), grid], axis=1)
    values = np.stack(
        [
            np.ones(len(grid)),
            grid[:, 0] + 1.0,
            np.linspace(0.5, 1.0, 6)[grid[:, 1]],
            np.linspace(0.0, 2 * np.pi, 40)[grid[:, 2]],
            np.linspace(0.0, 1.0, 32)[grid[:, 3]],
            np.linspace(0.0, 1.0, 32)[grid[:, 4]],
        ],
        axis=1,
    )
    imgs = (np.random.default_rng(seed).random((len(grid), 64, 64)) < 0.1).astype(np.uint8)
    metadata = np.array(
        {
            "date": "April 2017",
            "latents_names": ("color", "shape", "scale", "orientation", "posX", "posY"),
            "latents_sizes": np.array([1, *sizes]),
        },
        dtype=object,
    )
    np.savez_compressed(
        path, imgs=imgs, latents_values=values, latents_classes=classes, metadata=metadata
    )
    return imgs, classes


# ------------------------------------------------------------------------------ Glow tfrecords


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def reference_crc32c(data: bytes) -> int:
    """Plain byte-at-a-time CRC-32C (Castagnoli), the textbook definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_bytes(records: list[bytes]) -> bytes:
    """TFRecord framing of ``records`` (length, masked CRC of length, data, masked CRC of data)."""
    out = bytearray()
    for record in records:
        length = len(record).to_bytes(8, "little")
        out += length + _masked(reference_crc32c(length)).to_bytes(4, "little")
        out += record + _masked(reference_crc32c(record)).to_bytes(4, "little")
    return bytes(out)


def example_classes(syntax: str = "proto3"):
    """tf.train.Example and friends built with the protobuf library from example.proto's schema.

    proto3 packs repeated numbers (as TensorFlow writes Int64List); proto2 does not."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"test_example_{syntax}.proto", package=f"testtf_{syntax}", syntax=syntax
    )

    def message(name, fields, nested=()):
        msg = fdp.message_type.add(name=name)
        for spec in nested:
            msg.nested_type.add().CopyFrom(spec)
        for number, fname, ftype, label, type_name, oneof in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
            if oneof is not None:
                field.oneof_index = oneof
        return msg

    pkg = f".testtf_{syntax}"
    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [(1, "value", F.TYPE_BYTES, rep, None, None)])
    message("FloatList", [(1, "value", F.TYPE_FLOAT, rep, None, None)])
    message("Int64List", [(1, "value", F.TYPE_INT64, rep, None, None)])
    feature = message(
        "Feature",
        [
            (1, "bytes_list", F.TYPE_MESSAGE, opt, f"{pkg}.BytesList", 0),
            (2, "float_list", F.TYPE_MESSAGE, opt, f"{pkg}.FloatList", 0),
            (3, "int64_list", F.TYPE_MESSAGE, opt, f"{pkg}.Int64List", 0),
        ],
    )
    feature.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=f"{pkg}.Feature")
    entry.options.map_entry = True
    message(
        "Features",
        [(1, "feature", F.TYPE_MESSAGE, rep, f"{pkg}.Features.FeatureEntry", None)],
        nested=[entry],
    )
    message("Example", [(1, "features", F.TYPE_MESSAGE, opt, f"{pkg}.Features", None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"testtf_{syntax}.{name}"))
        for name in ("Example", "Feature")
    }


def glow_example(classes, image_hwc: np.ndarray, label: int, attr: list[int] | None = None) -> bytes:
    """A serialised Example as Glow writes it: shape (int64 x3), data (raw bytes), label, attr."""
    example = classes["Example"]()
    feature = example.features.feature
    feature["shape"].int64_list.value.extend(list(image_hwc.shape))
    feature["data"].bytes_list.value.append(image_hwc.tobytes())
    feature["label"].int64_list.value.append(label)
    if attr is not None:
        feature["attr"].int64_list.value.extend(attr)
    return example.SerializeToString()


def make_glow_tar(
    path: Path,
    top: str,
    resolution: int,
    counts: dict[str, int],
    shards: dict[str, int],
    decoy_resolution: int | None = None,
    seed: int = 0,
    attr: bool = False,
) -> dict[str, np.ndarray]:
    """A Glow-style tar: <top>/<split>/<split>-rXX-s-SSSS-of-NNNN.tfrecords. Images are spread
    round-robin over shards; returns the expected (N, 3, R, R) arrays in shard-then-record order.
    A decoy resolution's shards (other size) are added too when asked."""
    classes = example_classes("proto3")
    rng = np.random.default_rng(seed)
    log2 = int(np.log2(resolution))
    expected = {}
    with tarfile.open(path, "w") as tar:
        for split, num in counts.items():
            images = rng.integers(0, 256, (num, resolution, resolution, 3), dtype=np.uint8)
            per_shard = [list(range(s, num, shards[split])) for s in range(shards[split])]
            order = [i for ids in per_shard for i in ids]
            expected[split] = images[order].transpose(0, 3, 1, 2)
            resolutions = [(log2, images)]
            if decoy_resolution:
                small = rng.integers(0, 256, (num, decoy_resolution, decoy_resolution, 3), dtype=np.uint8)
                resolutions.append((int(np.log2(decoy_resolution)), small))
            for lg, imgs in resolutions:
                for shard, ids in enumerate(per_shard):
                    records = [
                        glow_example(classes, imgs[i], 0, [1, -1] * 20 if attr else None) for i in ids
                    ]
                    data = tfrecord_bytes(records)
                    info = tarfile.TarInfo(
                        f"{top}/{split}/{split}-r{lg:02d}-s-{shard:04d}-of-{shards[split]:04d}.tfrecords"
                    )
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return expected
