"""File checksums (md5 / sha256) computed in one streaming pass, with a progress bar for big files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tqdm.auto import tqdm

ALGORITHMS = ("md5", "sha256")
_HEX_LENGTH = {"md5": 32, "sha256": 64}


def file_digests(
    path: str | Path, algorithms: tuple[str, ...] = ALGORITHMS, progress: bool = True
) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm, reading the file once."""
    path = Path(path)
    hashers = {name: hashlib.new(name) for name in algorithms}
    size = path.stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"checksum {path.name}",
            disable=not progress or size < (64 << 20),
            leave=False,
        ) as bar,
    ):
        while chunk := handle.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def check_hex_digest(algorithm: str, value: str | None) -> str | None:
    """Normalise an expected checksum (lower case) or raise ValueError if it is not valid hex."""
    if value is None:
        return None
    if algorithm not in _HEX_LENGTH:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}, expected one of {ALGORITHMS}")
    if not isinstance(value, str) or not re.fullmatch(
        rf"[0-9a-fA-F]{{{_HEX_LENGTH[algorithm]}}}", value
    ):
        raise ValueError(
            f"expected {algorithm} checksum as {_HEX_LENGTH[algorithm]} hex digits, got {value!r}"
        )
    return value.lower()
