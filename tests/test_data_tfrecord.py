"""TFRecord framing, CRC-32C and tf.train.Example parsing against independent references."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fixtures_data import example_classes, reference_crc32c, tfrecord_bytes
from sdn.data.tfrecord import (
    TFRecordError,
    count_records,
    crc32c,
    crc32c_batch,
    parse_example,
    read_records,
)


def test_crc32c_standard_check_value():
    # The CRC catalogue's check value of CRC-32C (iSCSI) for the ASCII string "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 255, 256, 257, 1000, 3085])
def test_crc32c_batch_matches_bytewise_reference(length):
    rows = np.random.default_rng(length).integers(0, 256, (5, length), dtype=np.uint8)
    got = crc32c_batch(rows)
    assert got.dtype == np.uint32
    assert got.tolist() == [reference_crc32c(row.tobytes()) for row in rows]


def test_records_round_trip_with_crc_verification():
    records = [b"", b"a", bytes(range(256)) * 3, b"x" * 70000]
    framed = tfrecord_bytes(records)
    assert list(read_records(io.BytesIO(framed))) == records
    # tiny batches exercise the vectorised check across several flushes and lengths
    assert list(read_records(io.BytesIO(framed), batch_bytes=1)) == records
    assert count_records(io.BytesIO(framed)) == len(records)


def test_corrupted_data_byte_fails_the_crc():
    framed = bytearray(tfrecord_bytes([b"hello world", b"second"]))
    framed[12 + 3] ^= 0x01  # inside the first record's data
    with pytest.raises(TFRecordError, match="data CRC mismatch at record 0"):
        list(read_records(io.BytesIO(bytes(framed))))
    # without verification the (corrupt) bytes come through
    assert len(list(read_records(io.BytesIO(bytes(framed)), verify=False))) == 2


def test_corrupted_length_and_truncation_are_detected():
    framed = tfrecord_bytes([b"abc", b"defgh"])
    bad_length = bytearray(framed)
    bad_length[0] ^= 0x02
    with pytest.raises(TFRecordError, match="length CRC"):
        list(read_records(io.BytesIO(bytes(bad_length))))
    with pytest.raises(TFRecordError, match="truncated"):
        list(read_records(io.BytesIO(framed[:-3])))
    with pytest.raises(TFRecordError, match="truncated"):
        count_records(io.BytesIO(framed[:-3]))


@pytest.mark.parametrize("syntax", ["proto3", "proto2"])  # packed vs unpacked int64/float lists
def test_parse_example_matches_protobuf_encoding(syntax):
    classes = example_classes(syntax)
    example = classes["Example"]()
    feature = example.features.feature
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    feature["data"].bytes_list.value.append(image.tobytes())
    feature["shape"].int64_list.value.extend([4, 4, 3])
    feature["label"].int64_list.value.append(7)
    feature["attr"].int64_list.value.extend([1, -1, 2**40, -(2**62)])
    feature["weights"].float_list.value.extend([0.5, -2.25])
    feature["names"].bytes_list.value.extend([b"a", b"", b"ccc"])
    feature["empty"].int64_list.SetInParent()
    parsed = parse_example(example.SerializeToString())
    assert parsed["data"] == [image.tobytes()]
    assert parsed["shape"] == [4, 4, 3]
    assert parsed["label"] == [7]
    assert parsed["attr"] == [1, -1, 2**40, -(2**62)]
    assert parsed["weights"] == [0.5, -2.25]
    assert parsed["names"] == [b"a", b"", b"ccc"]
    assert parsed["empty"] == []


def test_parse_example_rejects_truncated_message():
    classes = example_classes("proto3")
    example = classes["Example"]()
    example.features.feature["data"].bytes_list.value.append(b"x" * 50)
    with pytest.raises(ValueError, match="truncated"):
        parse_example(example.SerializeToString()[:-10])
