"""Cheap structural checks of downloaded containers (tar, tar.gz, h5, npz).

They catch a truncated file or an error page when no checksum is pinned: a tar whose last member
runs past the end of the file, a gzip stream that ends early, an HDF5 file shorter than its
superblock says, a zip whose central directory or member CRCs are broken.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

KINDS = ("tar", "tar.gz", "h5", "npz")
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")


def looks_like_html(path: str | Path) -> bool:
    """True when the file starts like an HTML/XML page (a typical error or login page)."""
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith(_HTML_PREFIXES)


def check_container(path: str | Path, kind: str) -> None:
    """Raise ValueError naming the problem if ``path`` is not a complete ``kind`` container."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown container kind {kind!r}, expected one of {KINDS}")
    if path.stat().st_size == 0:
        raise ValueError("file is empty")
    if looks_like_html(path):
        raise ValueError("file is an HTML/XML page, not a data file")
    try:
        if kind == "tar":
            _check_tar(path)
        elif kind == "tar.gz":
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:  # decompresses the whole stream: detects truncation
                    if member.isfile():
                        extracted = archive.extractfile(member)
                        assert extracted is not None
                        while extracted.read(1 << 20):
                            pass
        elif kind == "h5":
            import h5py

            with h5py.File(path, "r") as handle:
                list(handle.keys())
        else:  # npz
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"zip member {bad!r} has a bad CRC")
    except ValueError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"not a complete {kind} file ({type(error).__name__}: {error})") from error


def _check_tar(path: Path) -> None:
    """Walk the tar headers and make sure every member's data lies inside the file."""
    size = path.stat().st_size
    count = 0
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            count += 1
            if member.offset_data + member.size > size:
                raise ValueError(
                    f"tar member {member.name!r} ends at byte {member.offset_data + member.size}"
                    f" but the file has only {size} bytes (truncated)"
                )
    if count == 0:
        raise ValueError("tar archive has no members")
