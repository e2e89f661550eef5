"""Demo: 200 CPU steps of the embedded SDN-VAE and its CNN baseline on ``patches32``, printing the
training bpd as it falls, then the test-split ELBO and importance-weighted bpd of the EMA weights.

Not a DVC stage and not a result (the study is ``make repro``): it shows the density pieces working
together (data -> model -> trainer -> scores) in a few minutes.
Usage: ``python examples/density_demo.py [--steps 200] [--models sdn cnn] [--iw-samples 16]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/ and baselines/

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from sdn.callbacks import Callback  # noqa: E402
import baselines  # noqa: E402,F401  (registers the decoder blocks)
from sdn.models import count_parameters  # noqa: E402
from sdn.models.hvae import build_hvae, get_config  # noqa: E402
from sdn.data import get_dataset  # noqa: E402
from sdn.scores import evaluate_bpd  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402
from sdn.training import TrainConfig, train  # noqa: E402


class PrintBpd(Callback):
    """Prints the windowed training bpd every ``log_every`` steps."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        print(f"  {self.model_name:>12} step {step:>4}  train bpd {metrics['bpd']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["sdn", "cnn"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01, help="Adamax lr (the embedded study's)")
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--iw-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_set = get_dataset("patches32", "train")
    test_set = Subset(get_dataset("patches32", "test"), range(args.test_images))
    config = get_config("embedded", seed=args.seed)  # the weight-init seed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            seed_everything(args.seed)
            model = build_hvae(config, name)
            print(f"{name}: {count_parameters(model):,} parameters", flush=True)
            train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       ema_decay=0.9, checkpoint_every=args.steps,
                                       log_every=max(1, args.steps // 10), seed=args.seed,
                                       device="cpu", progress=False)
            began = time.perf_counter()
            result = train(model, train_set, train_config, Path(tmp) / name,
                           callbacks=[PrintBpd(name)], resume=False)
            seconds = time.perf_counter() - began
            scores = evaluate_bpd(result.eval_model, test_set, batch_size=64,
                                  num_samples=args.iw_samples, seed=args.seed, progress=False)
            rows.append((name, seconds, scores["elbo_bpd"], scores["iw_bpd"]))
    print(f"\n{'model':>12} {'train s':>8} {'test ELBO bpd':>14} {'test IW bpd (K=' + str(args.iw_samples) + ')':>20}")
    for name, seconds, elbo, iw in rows:
        print(f"{name:>12} {seconds:>8.1f} {elbo:>14.3f} {iw:>20.3f}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
