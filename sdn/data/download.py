"""Resumable, verified download of one dataset archive (stdlib urllib only).

The file is streamed into ``<dest>.part`` with a progress bar; an interrupted transfer resumes with
an HTTP Range request when the server honours it. The finished file is checked (md5 / sha256 or a
sha256 prefix when pinned, otherwise a container sanity check) and only then moved atomically to ``dest``, so a DVC
stage never sees a partial output at its final path. Every failure raises one ``DownloadError``
naming the dataset, the URL and what was expected.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sdn.data.containers import KINDS, check_container, looks_like_html
from sdn.data.hashing import check_hex_digest, file_digests

USER_AGENT = "sdn-repro-download/1.0"


class DownloadError(RuntimeError):
    """A dataset archive could not be fetched or failed verification."""

    def __init__(self, dataset: str, url: str, expected: str, problem: str):
        self.dataset, self.url, self.expected, self.problem = dataset, url, expected, problem
        super().__init__(f"[{dataset}] download of {url} failed: {problem} (expected {expected})")


@dataclass(frozen=True)
class Downloaded:
    """Outcome of ``download``: where the verified file is and its checksums."""

    path: Path
    sha256: str
    md5: str
    fetched: bool  # False when a verified file was already in place (nothing was downloaded)
    verified: bool  # True when a pinned checksum matched


class _Retryable(Exception):
    """A transient failure (network, truncated transfer): worth another try that resumes."""


def download(
    dataset: str,
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    kind: str | None = None,
    sha256_prefix: str | None = None,
    timeout: float = 60.0,
    retries: int = 2,
    backoff_s: float = 2.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
) -> Downloaded:
    """Download ``url`` to ``dest`` for ``dataset``, verify it, and move it into place atomically.

    ``md5``/``sha256``: expected checksum (either or both); when neither is given the computed
    sha256 is printed with a warning. ``kind``: container type ("tar", "tar.gz", "h5", "npz") to
    sanity-check. ``sha256_prefix``: the first 8 or more hex digits of the expected sha256, as in
    torch.hub's ``<name>-<sha256 prefix>.<ext>`` file names. A second call with a verified file
    already at ``dest`` downloads nothing.
    """
    md5 = check_hex_digest("md5", md5)
    sha256 = check_hex_digest("sha256", sha256)
    sha256_prefix = _check_prefix(sha256_prefix)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if not isinstance(url, str) or not re.match(r"^(https?|file)://", url):
        raise ValueError(f"[{dataset}] url must start with http://, https:// or file://, got {url!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = Path(dest)
    expected = _describe_expected(md5, sha256, kind, sha256_prefix)
    pinned = bool(md5 or sha256 or sha256_prefix)

    if dest.exists():
        problem, digests = _verify(dest, md5, sha256, kind, progress, sha256_prefix)
        if problem is None:
            return Downloaded(dest, digests["sha256"], digests["md5"], False, pinned)
        warnings.warn(f"[{dataset}] existing {dest} is not valid ({problem}); downloading again")
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * attempt)
        try:
            _fetch(dataset, url, part, expected, timeout, chunk_size, progress)
            break
        except _Retryable as error:
            last = error
    else:
        raise DownloadError(dataset, url, expected, f"{last} (after {retries + 1} attempts)")

    problem, digests = _verify(part, md5, sha256, kind, progress, sha256_prefix)
    if problem is not None:
        part.unlink(missing_ok=True)  # a wrong file cannot be resumed into a right one
        raise DownloadError(dataset, url, expected, problem)
    if not pinned:
        warnings.warn(
            f"[{dataset}] {url}: no checksum pinned, file NOT verified; computed "
            f"sha256={digests['sha256']} (put it in params.yaml to pin it)"
        )
        print(f"[{dataset}] sha256 {digests['sha256']}  {dest.name}")
    os.replace(part, dest)
    return Downloaded(dest, digests["sha256"], digests["md5"], True, pinned)


def _check_prefix(prefix: str | None) -> str | None:
    """Normalise an expected sha256 prefix (8 to 64 hex digits, lower case) or raise ValueError."""
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not re.fullmatch(r"[0-9a-fA-F]{8,64}", prefix):
        raise ValueError(f"expected a sha256 prefix as 8 to 64 hex digits, got {prefix!r}")
    return prefix.lower()


def _describe_expected(
    md5: str | None, sha256: str | None, kind: str | None, sha256_prefix: str | None = None
) -> str:
    parts = [
        f"md5 {md5}" if md5 else "",
        f"sha256 {sha256}" if sha256 else "",
        f"sha256 starting with {sha256_prefix}" if sha256_prefix else "",
    ]
    text = " and ".join(p for p in parts if p)
    if not text:
        text = "an unverified file (no checksum pinned)"
    return text + (f", a complete {kind} file" if kind else "")


def _verify(
    path: Path,
    md5: str | None,
    sha256: str | None,
    kind: str | None,
    progress: bool,
    sha256_prefix: str | None = None,
) -> tuple[str | None, dict[str, str]]:
    """(None, digests) if ``path`` passes every check, else (the first failure, digests)."""
    if path.stat().st_size == 0:
        return "the file is empty", {}
    if looks_like_html(path):
        return "the server sent an HTML page instead of the data file", {}
    digests = file_digests(path, ("md5", "sha256"), progress)  # one read for both
    for name, value in (("md5", md5), ("sha256", sha256)):
        if value and digests[name] != value:
            return f"{name} mismatch: got {digests[name]}", digests
    if sha256_prefix and not digests["sha256"].startswith(sha256_prefix):
        return f"sha256 prefix mismatch: got {digests['sha256']}", digests
    if kind is not None:
        try:
            check_container(path, kind)
        except ValueError as error:
            return str(error), digests
    return None, digests


def _fetch(
    dataset: str,
    url: str,
    part: Path,
    expected: str,
    timeout: float,
    chunk_size: int,
    progress: bool,
) -> None:
    """Stream ``url`` into ``part``, resuming from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # our partial file is not a prefix we can extend
            part.unlink()
            raise _Retryable(f"server refused to resume at byte {offset} (HTTP 416)") from error
        if error.code >= 500 or error.code == 429:
            raise _Retryable(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(dataset, url, expected, f"HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _Retryable(f"host unreachable or connection failed: {reason}") from error

    with response:
        content_type = response.headers.get("Content-Type", "") or ""
        if "text/html" in content_type.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(
                dataset, url, expected, f"the server sent an HTML page (Content-Type {content_type})"
            )
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if status == 206:
            if not offset or _range_start(response) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server answered with an unexpected range (asked from {offset})")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # the server ignored the Range header: start over
        total = offset + remaining if remaining is not None else None
        received = 0
        with (
            open(part, mode) as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {dataset}",
                disable=not progress,
            ) as bar,
        ):
            while chunk := _read(response, chunk_size, offset + received):
                handle.write(chunk)  # a local write error (disk full) is not retried
                received += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and received != remaining:
        raise _Retryable(f"truncated transfer: got {offset + received} of {total} bytes")


def _read(response: http.client.HTTPResponse, size: int, position: int) -> bytes:
    """Next chunk of the body; a broken connection becomes a retryable error."""
    try:
        return response.read(size)
    except (http.client.HTTPException, OSError) as error:
        raise _Retryable(
            f"connection broke after {position} bytes ({type(error).__name__})"
        ) from error


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte position of a 206 response's Content-Range, or None if absent/unparseable."""
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", "") or "")
    return int(match.group(1)) if match else None
