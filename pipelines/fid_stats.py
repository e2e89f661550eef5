"""DVC stage: Inception reference statistics (mu, sigma) of one dataset split, written to one ``.npz``,
with the features of a seeded subset of ``--kid-features`` images for KID.

Without Inception weights (no ``--weights-path``, or a path that does not exist: a study that does not
download them) it writes a file that records why, so the later FID stage reports n/a instead of failing.
``--device auto`` (dvc.yaml) runs Inception where the fid stage runs it (cuda if available), TF32 off.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdn.distributed import DEVICES, resolve_device
from sdn.metrics.fid import (
    FEATURE_LAYER,
    IMPLEMENTATION,
    VERSION,
    InceptionWeightsUnavailable,
    load_inception,
)
from sdn.metrics.fid_stats import (
    ReferenceStatistics,
    compute_reference,
    save_reference_statistics,
    save_unavailable_reference,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="a dataset of the study")
    parser.add_argument("--split", default="train", help="prepared split (FID convention: the whole train split)")
    parser.add_argument("--data", type=Path, help="the dataset's prepared folder (embedded: optional)")
    parser.add_argument("--params", default="params.yaml", help="params file (the dataset's options)")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--weights-path", default="", help="local Inception weights (fid.weights_path); empty = none")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-images", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto = cuda if available, the device the fid stage samples on")
    parser.add_argument("--kid-features", type=int, default=10000,
                        help="features of this many images (a seeded subset) kept for KID (fid.kid.reference_features)")
    parser.add_argument("--kid-seed", type=int, default=0, help="seed of that subset (fid.kid.seed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Compute and save the statistics (or the 'unavailable' marker); returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    try:
        extractor = load_inception(args.weights_path or None, device)
    except InceptionWeightsUnavailable as err:
        logging.warning("FID reference statistics not computed: %s", err)
        save_unavailable_reference(args.out, args.dataset, args.split, str(err))
        return 0
    from pipelines.study import load_study  # only needed when statistics are actually computed

    dataset = load_study(args.params).with_data(args.dataset, args.data).prepared(args.dataset, args.split)
    max_images = args.max_images or None
    mu, sigma, features, indices = compute_reference(
        dataset, extractor, args.batch_size, device, max_images, num_features=args.kid_features, seed=args.kid_seed
    )
    num_images = len(dataset) if max_images is None else min(len(dataset), max_images)
    stats = ReferenceStatistics(mu, sigma, args.dataset, args.split, num_images, IMPLEMENTATION, VERSION, FEATURE_LAYER,
                                features, indices, args.kid_seed if features is not None else None)
    save_reference_statistics(args.out, stats)
    logging.info("wrote %s (%s; KID features: %s)", args.out, stats.describe(), stats.describe_features())
    return 0


if __name__ == "__main__":
    sys.exit(main())
