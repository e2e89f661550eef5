"""DVC stage: prepare one dataset into the suite's on-disk format (uint8 .npy + meta.json + grid).

Usage: ``python -m pipelines.prepare --dataset NAME --out DIR [--raw DIR] [--params params.yaml] [--force]``

dvc.yaml passes the paths: ``--raw data/raw/<NAME>`` (the download stage's output, archived
datasets only) and ``--out data/prepared/<NAME>``. The params section ``data.<NAME>`` gives the
source address (recorded in meta.json) and, for embedded datasets, the builder ``options``::

    data:
      cifar10:                               # archived: cifar10, imagenet32, celebahq256,
        url: https://...                     #   shapes3d, dsprites
      patches32:                             # embedded: patches32, dsprites_procedural,
        options: {patch_size: 16, region: 64, levels: 3, validation_fraction: 0.005, test_fraction: 0.005}
      dsprites_procedural:                   #   shapes3d_procedural (no archive, no url)
        options: {num: 10000, seed: 0}

Output: ``<out>/{split}_images.npy`` (N, C, H, W) uint8, ``{split}_factors.npy`` for factor
datasets, ``meta.json`` and ``sample_grid.png`` (see ``sdn.data.storage``). Re-running with the same
archive and options does nothing unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from pipelines.params import dataset_section
from sdn.data.prepare import ARCHIVED, EMBEDDED, prepare
from sdn.data.sources import SOURCES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(ARCHIVED + EMBEDDED)}")
    parser.add_argument("--out", type=Path, required=True, help="the prepared folder (dvc.yaml: data/prepared/NAME)")
    parser.add_argument("--raw", type=Path, help="the download folder (dvc.yaml: data/raw/NAME; archived datasets)")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.dataset not in ARCHIVED + EMBEDDED:
        parser.error(f"--dataset must be one of {sorted(ARCHIVED + EMBEDDED)}")
    section = dataset_section(args.params, args.dataset)
    archive = None
    source = {}
    if args.dataset in ARCHIVED:
        if args.raw is None:
            parser.error(f"--raw (the download folder) is required for the archived dataset {args.dataset}")
        archive = args.raw / SOURCES[args.dataset].filename
        if section.url:
            source["url"] = section.url
    meta = prepare(
        args.dataset,
        args.out,
        archive=archive,
        source=source,
        force=args.force,
        progress=not args.quiet,
        **section.options,
    )
    sizes = ", ".join(f"{split} {info['num']}" for split, info in meta["splits"].items())
    print(f"[{args.dataset}] prepared in {args.out}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
