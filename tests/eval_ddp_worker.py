"""Worker for the sharded-evaluation test: IW/ELBO bpd of a tiny HVAE and FID sample features, saved
per rank.

Launched by tests/test_sharded_eval.py as ``torchrun --standalone --nproc_per_node=2
tests/eval_ddp_worker.py --out DIR`` (gloo on CPU); the test also calls :func:`run` in-process for the
single-process reference. Odd counts on purpose: 7 images (3 + 4 per rank), 1 image (one rank has
none), 7 samples in batches of 2 (4 batches: 2 + 2), 3 samples in one batch (rank 1 draws none).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import baselines  # noqa: E402,F401  (registers the decoder blocks)
from sdn.metrics.fid import model_sample_fn, sample_features  # noqa: E402
from sdn.models.hvae import build_hvae, get_config  # noqa: E402
from sdn.scores import evaluate_bpd  # noqa: E402


class FakeInception(nn.Module):
    """A stand-in for torch-fidelity's FID Inception (uint8 images in, a tuple of (B, 2048) float32
    features out) that is cheap on a CPU and records the TF32 settings of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 4 * 4, 2048, generator=torch.Generator().manual_seed(0)))
        self.settings: list[tuple[str, str]] = []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        self.settings.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
        pooled = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        return (torch.tanh(pooled @ self.projection),)


def make_dataset(n: int) -> TensorDataset:
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    return TensorDataset(images, torch.zeros(n, 0, dtype=torch.int64))


def run(out_dir: Path) -> dict:
    """Evaluate and sample; return (and save as ``result_rank{r}_of{w}.pt``) every number."""
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn").eval()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    payload: dict = {"rank": rank, "world_size": world}
    payload["bpd"] = evaluate_bpd(model, make_dataset(7), batch_size=2, num_samples=5, chunk_size=3, seed=4,
                                  progress=False)
    payload["bpd_one_image"] = evaluate_bpd(model, make_dataset(1), batch_size=2, num_samples=3, chunk_size=3,
                                            seed=4, progress=False)
    sample_fn = model_sample_fn(model, temperature=0.9, seed=2)
    payload["features"], payload["grid"] = sample_features(
        sample_fn, FakeInception(), num_samples=7, sample_batch_size=2, batch_size=3, device="cpu",
        progress=False, grid_size=5)
    payload["features_one_batch"], payload["grid_one_batch"] = sample_features(
        sample_fn, FakeInception(), num_samples=3, sample_batch_size=4, batch_size=3, device="cpu",
        progress=False, grid_size=2)
    torch.save(payload, out_dir / f"result_rank{rank}_of{world}.pt")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    try:
        run(args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
