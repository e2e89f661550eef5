"""Operator launches of one training step (forward + backward) of every paper config, counted on
the meta device (no GPU, no memory): the plain sweep vs the Triton fast path, and the CNN.

Each model is built full size with ``device="meta"`` and one step (loss forward, backward) runs
under a ``TorchDispatchMode`` that counts every ATen or custom operator except views (which launch
no kernel). On CUDA each counted operator is about one kernel launch; each fast-path sweep kernel
(``sdn::sweep_forward`` / ``sdn::sweep_backward``) is exactly one. Not counted, as on the meta
device they do not exist: autocast's dtype casts (autocast has no meta device type, so the step
runs in fp32), bias copies inside cuBLAS calls, and the optimizer/EMA update (a few foreach
kernels). Real CUDA counts are a few percent higher; ``benchmarks/sweep_gpu.py`` measures them
with the CUDA profiler where a GPU is lent.

    python benchmarks/launches.py                  # every paper config
    python benchmarks/launches.py --configs cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import baselines  # noqa: E402,F401  (registers the decoder blocks)
from sdn.models.hvae import build_hvae, get_config  # noqa: E402
from sdn.models.vanilla_vae import build_vanilla_vae  # noqa: E402
from sdn.models.vanilla_vae import get_config as get_vae_config  # noqa: E402

# config -> (per-GPU batch of the paper runs, models); the batches of params-paper.yaml
PAPER = {
    "cifar10": (32, ("sdn", "cnn", "cnn_matched")),
    "imagenet32": (32, ("sdn", "cnn")),
    "celebahq256": (4, ("sdn", "cnn")),
    "shapes3d": (128, ("sdn", "cnn")),
}


class LaunchCounter(TorchDispatchMode):
    """Counts the non-view operators dispatched while active, by operator name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


_AUTOCAST = torch.autocast


def _autocast_skipping_meta(device_type: str, *args, **kwargs):
    """torch.autocast, but a no-op on the meta device (which has no autocast)."""
    return nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)


def _model_and_images(config: str, model: str, batch: int):
    if config == "shapes3d":
        cfg = get_vae_config("shapes3d")
        with torch.device("meta"):
            net = build_vanilla_vae(cfg, model)
        images = torch.empty(batch, cfg.channels, 64, 64, dtype=torch.uint8, device="meta")
    else:
        cfg = get_config(config)
        net = build_hvae(cfg, model, device="meta")
        images = torch.empty(batch, cfg.channels, cfg.image_size, cfg.image_size,
                             dtype=torch.uint8, device="meta")
    return net, images


def count_step(config: str, model: str, batch: int, sweep: str) -> tuple[int, int, Counter]:
    """(forward launches, backward launches, operator histogram) of one training step."""
    os.environ["SDN_SWEEP"] = sweep
    net, images = _model_and_images(config, model, batch)
    torch.autocast = _autocast_skipping_meta
    try:
        with LaunchCounter() as forward:
            loss = net(images)["loss"]
        with LaunchCounter() as backward:
            loss.backward()
    finally:
        torch.autocast = _AUTOCAST
    return forward.total, backward.total, forward.ops + backward.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(PAPER), default=list(PAPER))
    parser.add_argument("--models", nargs="+", default=None, help="only these models")
    parser.add_argument("--sweeps", nargs="+", choices=["triton", "plain"], default=["triton", "plain"],
                        help="sweep implementations counted for SDN models")
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent ops")
    args = parser.parse_args()
    print(f"torch={torch.__version__}; meta device, one step = forward + backward at the paper's "
          "per-GPU batch; views excluded; sweep=triton is the CUDA default (SDN_SWEEP=auto)")
    for config in args.configs:
        batch, models = PAPER[config]
        for model in (m for m in models if args.models is None or m in args.models):
            sweeps = args.sweeps if model == "sdn" else ("plain",)
            for sweep in sweeps:
                start = time.perf_counter()
                fwd, bwd, ops = count_step(config, model, batch, sweep)
                label = model if sweep == "triton" or model != "sdn" else "sdn-plain-sweep"
                print(f"{config} {label} launches_per_step={fwd + bwd} forward={fwd} "
                      f"backward={bwd} batch={batch} sweep={sweep if model == 'sdn' else '-'} "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
                if args.top:
                    print("   ", ", ".join(f"{k}={v}" for k, v in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
