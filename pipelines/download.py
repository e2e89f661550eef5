"""DVC stage: download one dataset archive (or the FID Inception weights), verify it, move it into place atomically.

Usage: ``python -m pipelines.download --dataset NAME --raw DIR [--params params.yaml]``
       ``python -m pipelines.download --fid-weights [--params params.yaml]`` (stage download_fid_weights)

dvc.yaml passes the folder (``--raw data/raw/<NAME>``); the archive keeps its official file name
there. The params section ``data.<NAME>`` says where it comes from::

    data:
      cifar10:
        url: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz   # required; any mirror
        md5: c58f30108f718f92721af3b95e74349a    # optional; and/or sha256: <64 hex>
                                                 # both null/absent = not verified (prints sha256, warns)

Archived datasets: cifar10, imagenet32, celebahq256, shapes3d, dsprites (defaults for url, checksum
and file name are in ``sdn.data.sources.SOURCES``). Embedded datasets have no download step.
Optional keys: ``timeout`` (s, default 60), ``retries`` (default 2).

``--fid-weights`` reads ``fid.weights`` (``url``; ``sha256_prefix`` and/or ``sha256``) and writes
``fid.weights_path``. torch-fidelity's file name ends in ``-6726825d``: torch.hub's
``<name>-<sha256 prefix>.<ext>`` convention, so the prefix is checked against the file's SHA-256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from pipelines.params import dataset_section, read_yaml
from sdn.data.download import DownloadError, Downloaded, download
from sdn.data.sources import SOURCES

FID_WEIGHTS = "fid_weights"  # the name DownloadError and the progress bar give the weights file


def fid_weights_params(params_path: str | Path) -> tuple[Path, dict]:
    """(``fid.weights_path``, ``fid.weights``) of the params file (ValueError naming a missing key)."""
    params = read_yaml(params_path) or {}
    fid = params.get("fid") or {}
    weights = fid.get("weights")
    if not isinstance(weights, dict) or not weights.get("url"):
        raise ValueError(f"{params_path}: fid.weights.url is required")
    if not fid.get("weights_path"):
        raise ValueError(f"{params_path}: fid.weights_path (where the weights go) is required")
    return Path(fid["weights_path"]), weights


def download_fid_weights(params_path: str | Path, progress: bool = True) -> Downloaded:
    """Fetch ``fid.weights.url`` to ``fid.weights_path``, checked against its sha256 (prefix)."""
    path, weights = fid_weights_params(params_path)
    return download(
        FID_WEIGHTS, weights["url"], path, sha256=weights.get("sha256"),
        sha256_prefix=weights.get("sha256_prefix"), timeout=float(weights.get("timeout", 60)),
        retries=int(weights.get("retries", 2)), progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help=f"one of {sorted(SOURCES)}")
    what.add_argument("--fid-weights", action="store_true", help="the FID Inception weights (fid.weights)")
    parser.add_argument("--raw", type=Path, help="the dataset's download folder (dvc.yaml: data/raw/NAME)")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.fid_weights:
        try:
            result = download_fid_weights(args.params, progress=not args.quiet)
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        state = "downloaded" if result.fetched else "already present"
        print(f"[{FID_WEIGHTS}] {state}: {result.path} sha256={result.sha256} "
              f"{'verified' if result.verified else 'NOT verified (no checksum pinned)'}")
        return 0
    if args.dataset not in SOURCES:
        parser.error(f"--dataset must be one of {sorted(SOURCES)} (embedded datasets need no download)")
    source = SOURCES[args.dataset]
    if args.raw is None:
        parser.error("--raw (the download folder) is required with --dataset")
    section = dataset_section(args.params, args.dataset)
    if not section.url:
        raise ValueError(f"data.{args.dataset}.url is required (the official one is {source.url})")
    archive = args.raw / source.filename
    try:
        result = download(
            args.dataset,
            section.url,
            archive,
            md5=section.md5,
            sha256=section.sha256,
            kind=source.kind,
            timeout=float(section.timeout or 60),
            retries=int(2 if section.retries is None else section.retries),
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
