"""The trainer's random draws follow the image, not the process: posterior noise per (seed, epoch,
dataset index) and flips per (seed, epoch, index), so any split of the global batch over ranks and
micro-batches trains on the same noise (the two-node test, tests/test_multinode.py, checks a job of
two processes against one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import baselines  # noqa: F401  (registers the "sdn" decoder blocks)
from sdn.data.augment import RandomHFlip
from sdn.models.hvae import build_hvae, get_config
from sdn.training import TrainConfig, train

SEED = 5


def seed_of(*keys: int) -> int:
    """The 63-bit seed of ``keys``, written out from NumPy's SeedSequence (the documented mixing)."""
    first, second = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return ((int(first) << 32) | int(second)) & (2**63 - 1)


class NoiseRecorder(nn.Module):
    """A conv model that takes posterior noise and records, per step, which image got which noise row
    (each image's first pixel is its dataset index)."""

    posterior_noise_size = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.extend((int(image[0, 0, 0]), row.clone()) for image, row in zip(images, noise))
        x = images.float() / 255.0
        loss = F.mse_loss(self.conv(x), x) + 0.0 * noise.sum()
        return {"loss": loss}


def indexed_images(n: int) -> TensorDataset:
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return TensorDataset(images, torch.zeros(n, 1))


def config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, seed=SEED, num_workers=0, device="cpu", progress=False,
                checkpoint_every=100, log_every=3)
    return TrainConfig.from_dict({**base, **overrides})


def test_posterior_noise_of_an_image_is_drawn_from_its_own_seed(tmp_path):
    model = NoiseRecorder()
    train(model, indexed_images(16), config(micro_batch_size=4), None)  # 2 steps per epoch: epochs 0..2
    assert len(model.seen) == 6 * 8
    for position, (index, row) in enumerate(model.seen):
        epoch = position // 16
        want = torch.randn(3, generator=torch.Generator().manual_seed(seed_of(SEED, 1, epoch, index)))
        assert torch.equal(row, want), (position, index, epoch)
    # each epoch visits every image once, and an image's noise changes from one epoch to the next
    by_epoch = [dict(model.seen[e * 16:(e + 1) * 16]) for e in range(3)]
    assert all(sorted(seen) == list(range(16)) for seen in by_epoch)
    assert not torch.equal(by_epoch[0][3], by_epoch[1][3])


def test_flips_follow_seed_epoch_and_index():
    images = torch.arange(200 * 2 * 2, dtype=torch.float32).reshape(200, 1, 2, 2).to(torch.uint8)
    flipping = RandomHFlip(TensorDataset(images, torch.zeros(200, 1)), seed=SEED)
    flipped = []
    for epoch in (0, 1):
        flipping.set_epoch(epoch)
        want = [bool(seed_of(SEED, 2, epoch, i) & 1) for i in range(200)]
        got = [bool(torch.equal(flipping[i][0], images[i].flip(-1))) for i in range(200)]
        assert got == want
        assert all(torch.equal(flipping[i][0], images[i]) for i in range(200) if not want[i])
        flipped.append(want)
    assert flipped[0] != flipped[1]
    assert 70 < sum(flipped[0]) < 130  # about half (binomial(200, 1/2): 5 sd)


def tiny_hvae_run(tmp_path, micro_batch_size, seed=SEED) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 8, 8), generator=generator, dtype=torch.uint8)
    dataset = RandomHFlip(TensorDataset(images, torch.zeros(16, 1)), seed=seed)
    model = build_hvae(get_config("tiny", free_bits=0.0), "sdn")  # free bits clamp each micro-batch's mean
    cfg = config(steps=3, seed=seed, micro_batch_size=micro_batch_size, grad_clip=200.0)
    return {k: v.detach().clone() for k, v in train(model, dataset, cfg, None).model.state_dict().items()}


def test_hvae_trains_alike_in_one_or_four_micro_batches(tmp_path):
    """The tiny HVAE (plain ELBO) draws posterior noise and flips: whole batch and 4 micro-batches
    agree to rounding, while another seed (other noise and flips) moves the weights far more."""
    torch.set_num_threads(1)
    whole, split = tiny_hvae_run(tmp_path, None), tiny_hvae_run(tmp_path, 2)
    other = tiny_hvae_run(tmp_path, None, seed=SEED + 1)
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=0, atol=2e-5, msg=key)
    moved = max(float((other[k].float() - v.float()).abs().max()) for k, v in whole.items())
    assert moved > 1e-3
