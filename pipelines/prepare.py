"""DVC stage: prepare one dataset into the suite's on-disk format (uint8 .npy + meta.json + grid).

Usage: ``python pipelines/prepare.py --dataset NAME [--params params.yaml] [--force]``

Reads the section ``data.<NAME>`` of the params file::

    data:
      cifar10:                               # archived: cifar10, imagenet32, celebahq256,
        url: https://...                     #   shapes3d, dsprites (url recorded in meta.json)
        archive: data/raw/cifar-10-python.tar.gz   # the download stage's output
        out: data/prepared/cifar10           # required: the prepared directory (stage output)
      patches32:                             # embedded: patches32, dsprites_procedural,
        out: data/prepared/patches32         #   shapes3d_procedural (no archive, no url)
        options: {patch_size: 16, region: 64, levels: 3, validation_fraction: 0.005, test_fraction: 0.005}
      dsprites_procedural:
        out: data/prepared/dsprites_procedural
        options: {num: 10000, seed: 0}

Output: ``<out>/{split}_images.npy`` (N, C, H, W) uint8, ``{split}_factors.npy`` for factor
datasets, ``meta.json`` and ``sample_grid.png`` (see ``sdn.data.storage``). Re-running with the same
archive and options does nothing unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/

from pipelines.study import dataset_params  # noqa: E402
from sdn.data.prepare import ARCHIVED, EMBEDDED, prepare  # noqa: E402
from sdn.data.sources import SOURCES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(ARCHIVED + EMBEDDED)}")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.dataset not in ARCHIVED + EMBEDDED:
        parser.error(f"--dataset must be one of {sorted(ARCHIVED + EMBEDDED)}")
    section = dataset_params(args.params, args.dataset)
    if not section.get("out"):
        raise ValueError(f"data.{args.dataset}.out (the prepared directory) is required")
    options = section.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"data.{args.dataset}.options must be a mapping, got {options!r}")
    archive = None
    source = {}
    if args.dataset in ARCHIVED:
        default = Path("data/raw") / SOURCES[args.dataset].filename
        archive = Path(section.get("archive") or default)
        if section.get("url"):
            source["url"] = section["url"]
    meta = prepare(
        args.dataset,
        section["out"],
        archive=archive,
        source=source,
        force=args.force,
        progress=not args.quiet,
        **options,
    )
    sizes = ", ".join(f"{split} {info['num']}" for split, info in meta["splits"].items())
    print(f"[{args.dataset}] prepared in {section['out']}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
