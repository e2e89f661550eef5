"""DVC stage: download one dataset archive, verify it, move it into place atomically.

Usage: ``python pipelines/download.py --dataset NAME [--params params.yaml]``

Reads the section ``data.<NAME>`` of the params file::

    data:
      cifar10:
        url: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz   # required; any mirror
        md5: c58f30108f718f92721af3b95e74349a    # optional; and/or sha256: <64 hex>
                                                 # both null/absent = not verified (prints sha256, warns)
        archive: data/raw/cifar-10-python.tar.gz # where the file goes (the stage's output)
        out: data/prepared/cifar10               # used by pipelines/prepare.py

Archived datasets: cifar10, imagenet32, celebahq256, shapes3d, dsprites (defaults for url, checksum
and file name are in ``sdn.data.sources.SOURCES``). Embedded datasets have no download step.
Optional keys: ``timeout`` (s, default 60), ``retries`` (default 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/

from pipelines.study import dataset_params  # noqa: E402
from sdn.data.download import DownloadError, download  # noqa: E402
from sdn.data.sources import SOURCES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(SOURCES)}")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.dataset not in SOURCES:
        parser.error(f"--dataset must be one of {sorted(SOURCES)} (embedded datasets need no download)")
    source = SOURCES[args.dataset]
    section = dataset_params(args.params, args.dataset)
    if not section.get("url"):
        raise ValueError(f"data.{args.dataset}.url is required (the official one is {source.url})")
    archive = Path(section.get("archive") or Path("data/raw") / source.filename)
    try:
        result = download(
            args.dataset,
            section["url"],
            archive,
            md5=section.get("md5"),
            sha256=section.get("sha256"),
            kind=source.kind,
            timeout=float(section.get("timeout", 60)),
            retries=int(section.get("retries", 2)),
            progress=not args.quiet,
        )
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    state = "downloaded" if result.fetched else "already present"
    check = "verified" if result.verified else "NOT verified (no checksum pinned)"
    print(f"[{args.dataset}] {state}: {result.path} sha256={result.sha256} {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
