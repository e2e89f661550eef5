"""Worker for the DDP tests: trains a tiny deterministic model with sdn.training.train and saves the result.

Launched by tests/test_training.py as ``torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py
--out DIR`` (gloo on CPU), and by tests/test_accumulation.py with ``--micro-batch-size`` and
``--steps`` on 2 and 4 ranks; the tests also call :func:`run` in-process for the single-process run.
Its ``eval_fn`` all-reduces the ranks' numbers, so it only finishes if every rank calls it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdn.callbacks import CurveWriter  # noqa: E402
from sdn.training import TrainConfig, train  # noqa: E402

CONFIG = TrainConfig(
    steps=6, batch_size=8, lr=1e-2, lr_decay=0.9, lr_decay_every=2, ema_decay=0.9, grad_clip=1.0,
    checkpoint_every=3, log_every=2, eval_every=3, seed=7, num_workers=0, device="cpu", progress=False,
)


class DeterministicNet(nn.Module):
    """Conv autoencoder-ish model with a per-image Bernoulli loss; no randomness, so a sharded batch
    gives the same gradient as the whole batch up to float rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        logits = self.conv2(torch.tanh(self.conv1(2 * x - 1)))
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        loss = nll.mean()
        return {"loss": loss, "bpd": loss / (x[0].numel() * torch.log(torch.tensor(2.0)))}


def make_dataset(n: int = 32) -> TensorDataset:
    """n binary 1x8x8 images stored as 0/255 uint8, with an int64 factor each."""
    generator = torch.Generator().manual_seed(123)
    images = (torch.rand(n, 1, 8, 8, generator=generator) < 0.4).to(torch.uint8) * 255
    factors = torch.randint(0, 3, (n, 1), generator=generator)
    return TensorDataset(images, factors)


def collective_eval(module: nn.Module) -> dict[str, float]:
    """This rank's number and the sum over ranks (an all-reduce, as a sharded evaluation does)."""
    rank = float(dist.get_rank()) if dist.is_initialized() else 0.0
    total = torch.tensor([rank])
    if dist.is_initialized():
        dist.all_reduce(total)
    return {"rank": rank, "rank_sum": float(total)}


def run(out_dir: Path, micro_batch_size: int | None = None, steps: int | None = None) -> dict:
    """Train and return (and save as ``result_rank{r}_of{w}.pt``) params, EMA params and metrics."""
    torch.manual_seed(0)
    model = DeterministicNet()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig.from_dict({**CONFIG.to_dict(), "micro_batch_size": micro_batch_size,
                                    "steps": steps or CONFIG.steps})
    curve = CurveWriter(out_dir / f"curve_rank{rank}_of{world}.csv")
    result = train(model, make_dataset(), config, out_dir / f"ckpt_{world}", callbacks=[curve],
                   eval_fn=collective_eval)
    payload = {
        "params": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in result.ema_model.state_dict().items()},
        "metrics": result.metrics,
        "eval_metrics": result.eval_metrics,
        "steps": result.steps,
        "rank": rank,
        "world_size": world,
    }
    torch.save(payload, out_dir / f"result_rank{rank}_of{world}.pt")
    return payload


def launch(out_dir: Path, nproc: int, *args: str, timeout: float = 180) -> list[dict]:
    """Run this worker under ``torchrun --standalone --nproc_per_node=nproc`` (gloo, CPU, one thread
    per process) with ``--out out_dir *args``; return every rank's payload, rank 0 first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), CUDA_VISIBLE_DEVICES="")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         __file__, "--out", str(out_dir), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        raise AssertionError(f"torchrun with {nproc} ranks failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [torch.load(out_dir / f"result_rank{r}_of{nproc}.pt") for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out, args.micro_batch_size, args.steps)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
