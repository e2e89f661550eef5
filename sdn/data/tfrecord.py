"""A small TFRecord reader and ``tf.train.Example`` parser (TensorFlow is not a dependency).

TFRecord framing, per record: ``uint64 length | uint32 masked_crc32c(length bytes) | data |
uint32 masked_crc32c(data)``, little endian; masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8.
CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) is computed with a NumPy table, vectorised
across records and across 256-byte chunks of each record, so GBs verify in seconds, not hours.

``tf.train.Example`` is parsed from its protobuf wire format: Example{features=1: Features},
Features{feature=1: map<string, Feature>}, Feature{bytes_list=1 | float_list=2 | int64_list=3},
each list {value=1, repeated; numbers may be packed or not}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table[byte] = crc
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]


class TFRecordError(ValueError):
    """A TFRecord file is truncated or fails its CRC checks."""


_CHUNK = 256  # bytes per chunk when a long record's CRC is split into parallel pieces


def _zero_shift_tables(num_bytes: int) -> np.ndarray:
    """Tables (4, 256) of the linear map "feed ``num_bytes`` zero bytes" on a CRC register."""
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
    reg = basis.ravel().copy()
    for _ in range(num_bytes):
        reg = _TABLE[reg & 0xFF] ^ (reg >> 8)
    return reg.reshape(4, 256)


_SHIFT = _zero_shift_tables(_CHUNK)


def _raw_crc_rows(rows: np.ndarray) -> np.ndarray:
    """CRC register (init 0, no final xor) after feeding each row; vectorised over rows."""
    crc = np.zeros(rows.shape[0], dtype=np.uint32)
    for column in np.ascontiguousarray(rows.T):
        crc = _TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c_batch(data: np.ndarray) -> np.ndarray:
    """CRC-32C of each row of a uint8 array (num, length): uint32 (num,).

    With init 0 the CRC register is linear in the message and leading zero bytes leave it at 0, so
    each row is zero-padded in front to whole chunks, the chunks' CRCs are computed in parallel and
    folded with the "shift by one chunk" map. CRC-32C's all-ones initial register equals
    complementing the first four message bytes (reflected CRC), and the result is complemented.
    """
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2:
        raise ValueError(f"expected a (num, length) uint8 array, got shape {data.shape}")
    num, length = data.shape
    if length < 4:  # too short for the complement trick: run the register directly
        crc = np.full(num, 0xFFFFFFFF, dtype=np.uint32)
        for column in data.T:
            crc = _TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
        return crc ^ np.uint32(0xFFFFFFFF)
    chunks = -(-length // _CHUNK)
    padded = np.zeros((num, chunks * _CHUNK), dtype=np.uint8)
    padded[:, chunks * _CHUNK - length :] = data
    padded[:, chunks * _CHUNK - length : chunks * _CHUNK - length + 4] ^= 0xFF
    pieces = _raw_crc_rows(padded.reshape(num * chunks, _CHUNK)).reshape(num, chunks)
    crc = np.zeros(num, dtype=np.uint32)
    for k in range(chunks):
        crc = (
            _SHIFT[0][crc & 0xFF]
            ^ _SHIFT[1][(crc >> 8) & 0xFF]
            ^ _SHIFT[2][(crc >> 16) & 0xFF]
            ^ _SHIFT[3][crc >> 24]
            ^ pieces[:, k]
        )
    return crc ^ np.uint32(0xFFFFFFFF)


def crc32c(data: bytes) -> int:
    """CRC-32C of one byte string (short ones, like record headers, byte by byte in Python)."""
    if len(data) < 64:
        crc = 0xFFFFFFFF
        for byte in data:
            crc = _TABLE_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    return int(crc32c_batch(np.frombuffer(data, dtype=np.uint8)[None, :])[0])


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    return mask_crc(crc32c(data))


def mask_crc(crc: int | np.ndarray) -> int | np.ndarray:
    """Apply TFRecord's CRC mask to a raw CRC-32C value (or array of values)."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        return ((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(
    handle: BinaryIO, verify: bool = True, batch_bytes: int = 32 << 20, name: str = "tfrecord"
) -> Iterator[bytes]:
    """Yield the records of an open TFRecord stream; with ``verify`` every CRC is checked.

    Data CRCs are checked about ``batch_bytes`` of records at a time (vectorised); a bad record
    raises TFRecordError before any record of its batch is yielded.
    """
    pending: list[tuple[bytes, int]] = []
    pending_bytes = 0
    index = 0
    while True:
        header = handle.read(12)
        if not header:
            break
        if len(header) < 12:
            raise TFRecordError(f"{name}: truncated record header at record {index}")
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:])
        if verify and masked_crc32c(header[:8]) != length_crc:
            raise TFRecordError(f"{name}: length CRC mismatch at record {index}")
        body = handle.read(length + 4)
        if len(body) < length + 4:
            raise TFRecordError(f"{name}: truncated record {index} ({len(body)} of {length + 4} bytes)")
        (data_crc,) = struct.unpack("<I", body[length:])
        pending.append((body[:length], data_crc))
        pending_bytes += length
        index += 1
        if pending_bytes >= batch_bytes:
            yield from _check_and_flush(pending, verify, name, index - len(pending))
            pending, pending_bytes = [], 0
    yield from _check_and_flush(pending, verify, name, index - len(pending))


def count_records(handle: BinaryIO, name: str = "tfrecord") -> int:
    """Number of records in a seekable TFRecord stream (reads only the headers)."""
    position = handle.tell()
    end = handle.seek(0, 2)
    handle.seek(position)
    count = 0
    while True:
        header = handle.read(12)
        if not header:
            return count
        if len(header) < 12:
            raise TFRecordError(f"{name}: truncated record header at record {count}")
        (length,) = struct.unpack("<Q", header[:8])
        if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
            raise TFRecordError(f"{name}: length CRC mismatch at record {count}")
        position += 12 + length + 4
        if position > end:  # (some streams clamp seeks at their end, so compare explicitly)
            raise TFRecordError(f"{name}: truncated record {count}")
        handle.seek(position)
        count += 1


def _check_and_flush(
    pending: list[tuple[bytes, int]], verify: bool, name: str, first: int
) -> Iterator[bytes]:
    if verify and pending:
        by_length: dict[int, list[int]] = {}
        for position, (data, _) in enumerate(pending):
            by_length.setdefault(len(data), []).append(position)
        for length, positions in by_length.items():
            rows = np.frombuffer(
                b"".join(pending[p][0] for p in positions), dtype=np.uint8
            ).reshape(len(positions), length)
            got = mask_crc(crc32c_batch(rows))
            want = np.array([pending[p][1] for p in positions], dtype=np.uint32)
            bad = np.flatnonzero(got != want)
            if bad.size:
                raise TFRecordError(f"{name}: data CRC mismatch at record {first + positions[bad[0]]}")
    for data, _ in pending:
        yield data


# ---------------------------------------------------------------- protobuf: tf.train.Example


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in protobuf message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes in protobuf message")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_feature(buf: bytes) -> list[bytes] | list[int] | list[float]:
    for number, wire, payload in _fields(buf):
        if wire != 2:
            continue
        assert isinstance(payload, bytes)
        if number == 1:  # BytesList
            return [bytes(v) for n, w, v in _fields(payload) if n == 1 and w == 2]  # type: ignore[arg-type]
        if number == 2:  # FloatList: packed fixed32 or repeated fixed32
            floats: list[float] = []
            for n, w, v in _fields(payload):
                if n == 1 and w == 2:
                    floats.extend(np.frombuffer(v, dtype="<f4").tolist())  # type: ignore[arg-type]
                elif n == 1 and w == 5:
                    floats.append(struct.unpack("<f", v)[0])  # type: ignore[arg-type]
            return floats
        if number == 3:  # Int64List: packed varints or repeated varints
            ints: list[int] = []
            for n, w, v in _fields(payload):
                if n == 1 and w == 2:
                    pos = 0
                    while pos < len(v):  # type: ignore[arg-type]
                        value, pos = _varint(v, pos)  # type: ignore[arg-type]
                        ints.append(_signed64(value))
                elif n == 1 and w == 0:
                    ints.append(_signed64(v))  # type: ignore[arg-type]
            return ints
    return []


def parse_example(record: bytes) -> dict[str, list[bytes] | list[int] | list[float]]:
    """Features of a serialised ``tf.train.Example`` as {name: list of values}."""
    features: dict[str, list[bytes] | list[int] | list[float]] = {}
    for number, wire, payload in _fields(record):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(payload):  # type: ignore[arg-type]
            if n != 1 or w != 2:
                continue
            key, value = None, b""
            for en, ew, ev in _fields(entry):  # type: ignore[arg-type]
                if en == 1 and ew == 2:
                    key = bytes(ev).decode("utf-8")  # type: ignore[arg-type]
                elif en == 2 and ew == 2:
                    value = ev  # type: ignore[assignment]
            if key is None:
                raise ValueError("tf.train.Example feature map entry without a key")
            features[key] = _parse_feature(value)  # type: ignore[arg-type]
    return features
