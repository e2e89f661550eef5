"""Time each disentanglement metric at disentanglement_lib's default sample counts.

Synthetic ground truth with 3DShapes-like factor sizes [10, 10, 10, 8, 4, 15]; observations are
tiny uint8 images (1, 4, 4) holding the factor values plus 10 nuisance pixels, and the
representation is a fixed random linear map to 10 codes, so the encoder costs ~nothing and the
times are the metrics' own. Wall and CPU (all threads) seconds are printed per metric.

    PYTHONPATH=. .venv/bin/python benchmarks/disentanglement_metrics.py [--num-train N] [--n-jobs J]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from sdn.metrics.disentanglement import (
    compute_beta_vae,
    compute_dci,
    compute_factor_vae,
    compute_mig,
    compute_sap,
)

SIZES = [10, 10, 10, 8, 4, 15]
NUM_PIXELS = 16


class SyntheticShapes:
    """GroundTruthData with 3DShapes-like factor sizes and (1, 4, 4) uint8 observations."""

    factor_names = ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    factors_num_values = SIZES
    observation_shape = (1, 4, 4)

    def sample_factors(self, num: int, random_state: np.random.RandomState) -> np.ndarray:
        return np.stack([random_state.randint(n, size=num) for n in SIZES], axis=1).astype(np.int64)

    def sample_observations_from_factors(
        self, factors: np.ndarray, random_state: np.random.RandomState
    ) -> np.ndarray:
        nuisance = random_state.randint(0, 256, size=(len(factors), NUM_PIXELS - len(SIZES)))
        pixels = np.concatenate([factors * 16, nuisance], axis=1).astype(np.uint8)
        return pixels.reshape(len(factors), *self.observation_shape)


_WEIGHTS = 0.1 * np.random.RandomState(0).randn(10, NUM_PIXELS)
_WEIGHTS[:, : len(SIZES)] += np.eye(10, len(SIZES))  # codes 0-5 mostly one factor each, 6-9 noise


def representation_fn(images: np.ndarray) -> np.ndarray:
    """A cheap fixed linear 'encoder' from 16 pixels to 10 codes."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0 @ _WEIGHTS.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-eval", type=int, default=5000)
    parser.add_argument("--n-jobs", type=int, default=-1, help="DCI threads (-1: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, n, e = SyntheticShapes(), args.num_train, args.num_eval
    runs = {
        "beta_vae": lambda: compute_beta_vae(data, representation_fn, args.seed, 64, n, e),
        "factor_vae": lambda: compute_factor_vae(data, representation_fn, args.seed, 64, n, e, n),
        "mig": lambda: compute_mig(data, representation_fn, args.seed, n),
        "dci": lambda: compute_dci(data, representation_fn, args.seed, n, e, n_jobs=args.n_jobs),
        "sap": lambda: compute_sap(data, representation_fn, args.seed, n, e),
    }
    total_wall = total_cpu = 0.0
    print(f"num_train={n} num_eval={e} factor sizes={SIZES} codes=10 dci n_jobs={args.n_jobs}")
    for name, run in runs.items():
        wall, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library-default LogisticRegression may not converge
            scores = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        shown = ", ".join(f"{key}={value:.4f}" for key, value in scores.items())
        print(f"{name:>10}: {wall:7.1f} s wall {cpu:7.1f} s cpu   {shown}", flush=True)
    print(f"{'total':>10}: {total_wall:7.1f} s wall {total_cpu:7.1f} s cpu")


if __name__ == "__main__":
    main()
