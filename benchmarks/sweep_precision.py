"""What the sweep's precision does to the numbers: ELBO bpd of a briefly trained embedded SDN-VAE
on the whole patches32 test split, with the sweeps in fp32 vs bf16 (CPU).

The model (the ``embedded`` preset) is trained in fp32 with params.yaml's density train settings
(batch 16, Adamax lr 0.01 cosine, EMA 0.99) for ``--steps`` steps (fewer than the study's 2,400:
a benchmark budget), then its EMA weights are evaluated four times with the same seed (the same
posterior samples, so the differences are paired):

  fp32                 everything fp32 (the embedded study)
  sweeps bf16          only the sweeps in bf16 (operands, products and state), the rest fp32
  autocast bf16        the whole model under bf16 autocast; the sweeps follow it (sdn.layers)
  autocast, fp32 sweep bf16 autocast with the sweeps kept in fp32 (sdn.layers before this change)

    python benchmarks/sweep_precision.py --data data/prepared/patches32 --steps 1200
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import baselines  # noqa: E402,F401  (registers the decoder blocks)
import sdn.layers  # noqa: E402
from sdn.data import get_dataset  # noqa: E402
from sdn.models.hvae import build_hvae, get_config  # noqa: E402
from sdn.scores import evaluate_bpd  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402
from sdn.training import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _variants():
    """name -> (autocast context factory, sweep dtype override or None)."""
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    return {
        "fp32": (nullcontext, None),
        "sweeps bf16": (nullcontext, torch.bfloat16),
        "autocast bf16": (bf16, None),
        "autocast, fp32 sweep": (bf16, torch.float32),
    }


def evaluate(model, loader, variant: str) -> float:
    context, sweep_dtype = _variants()[variant]
    patch = (mock.patch.object(sdn.layers, "_sweep_dtype", lambda x: sweep_dtype)
             if sweep_dtype is not None else nullcontext())
    with patch, context():
        return evaluate_bpd(model, loader, seed=0, progress=False)["elbo_bpd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="prepared patches32 folder (python -m pipelines.prepare); default: "
                             "build it in memory")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    options = params["data"]["patches32"]["options"]
    settings = params["density"]["patches32"]
    train_settings = {k: v for k, v in settings["train"].items()
                      if k not in ("checkpoint_every", "eval_every", "log_every", "steps")}
    config = TrainConfig(**{**train_settings, "steps": args.steps, "seed": args.seed,
                            "device": "cpu", "progress": False, "checkpoint_every": args.steps,
                            "log_every": max(1, args.steps // 4)})
    train_set = get_dataset("patches32", "train", root=args.data, **options)
    test_set = get_dataset("patches32", "test", root=args.data, **options)
    seed_everything(args.seed)
    model = build_hvae(get_config(settings["config"], seed=args.seed), "sdn")
    start = time.perf_counter()
    result = train(model, train_set, config, checkpoint_dir=None)
    train_s = time.perf_counter() - start
    net = result.eval_model
    loader = DataLoader(test_set, batch_size=settings["eval"]["batch_size"], shuffle=False)
    print(f"embedded SDN-VAE, {args.steps} steps (batch {config.batch_size}, lr {config.lr} "
          f"{config.lr_schedule}, EMA {config.ema_decay}, fp32) in {train_s:.0f}s on "
          f"{torch.get_num_threads()} thread(s); patches32 test split: {len(test_set)} images; "
          f"ELBO bpd (1 sample, seed 0), EMA weights")
    reference = None
    for variant in _variants():
        bpd = evaluate(net, loader, variant)
        reference = bpd if reference is None else reference
        print(f"  {variant:<22} elbo_bpd={bpd:.5f}  diff_vs_fp32={bpd - reference:+.5f}",
              flush=True)


if __name__ == "__main__":
    main()
