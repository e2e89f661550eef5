"""Demo: a short CPU training of the vanilla VAE with a CNN and an SDN decoder on the procedural
dSprites, then all five disentanglement metrics of each encoder mean, printed as one table.

Not a DVC stage and not a result: a few hundred steps on CPU show that the pieces fit together
(data -> model -> trainer -> metrics); the scores of such short runs are noise-level.
Usage: ``python examples/disentangle_demo.py [--steps 100] [--num-train 300] [--out DIR]``
(about 5 CPU-minutes; 14 minutes wall on 2 shared cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdn.data import get_dataset, get_ground_truth  # noqa: E402
from sdn.metrics.disentanglement import compute_all  # noqa: E402
from sdn.models import count_parameters  # noqa: E402
from sdn.models.vanilla_vae import build_vanilla_vae, get_config  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402
from sdn.training import TrainConfig, train  # noqa: E402

DATASET = "dsprites_procedural"
DECODERS = ("cnn", "sdn")
EVAL_SEED = 0  # disentanglement_lib evaluates every model with the same seed


def run_one(decoder: str, args: argparse.Namespace, dataset, ground_truth, out_dir: Path) -> dict[str, float]:
    """Train one decoder kind, then score its posterior mean with the five metrics."""
    config = get_config("embedded", seed=args.seed)
    model = build_vanilla_vae(config, decoder)
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=None,
        checkpoint_every=args.steps, log_every=max(1, args.steps // 5), seed=args.seed,
        device="cpu", progress=True,
    )
    began = time.perf_counter()
    result = train(model, dataset, train_config, out_dir / decoder, resume=False)
    train_s = time.perf_counter() - began
    trained = result.eval_model.eval()

    def representation(images: np.ndarray) -> np.ndarray:
        return trained.encode_mean(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    began = time.perf_counter()
    scores = compute_all(ground_truth, representation, seed=EVAL_SEED, num_train=args.num_train,
                         num_eval=args.num_eval, batch_size=args.metric_batch)
    return {
        "decoder_params": float(count_parameters(trained.decoder)),
        "train_s": train_s,
        "metrics_s": time.perf_counter() - began,
        **{f"train.{k}": v for k, v in result.metrics.items()},
        **scores,
    }


def print_table(results: dict[str, dict[str, float]]) -> None:
    """One row per score, one column per decoder; settings.* rows last."""
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: (k.startswith("settings."), k))
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{d:>12}" for d in results))
    for key in keys:
        cells = [results[d].get(key, float("nan")) for d in results]
        print(f"{key:{width}}  " + "  ".join(f"{v:>12.4g}" for v in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per decoder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adamax lr (the paper's)")
    parser.add_argument("--num-images", type=int, default=2048, help="rendered training images")
    parser.add_argument("--num-train", type=int, default=300, help="metrics' training sample")
    parser.add_argument("--num-eval", type=int, default=150, help="metrics' evaluation sample")
    parser.add_argument("--metric-batch", type=int, default=16,
                        help="BetaVAE/FactorVAE points per training point; MIG/DCI/SAP encoding batch")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temp dir)")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    dataset = get_dataset(DATASET, "train", num=args.num_images, seed=0)
    ground_truth = get_ground_truth(DATASET)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out if args.out is not None else Path(tmp)
        results = {d: run_one(d, args, dataset, ground_truth, out_dir) for d in args.decoders}
    print_table(results)


if __name__ == "__main__":
    main()
