"""Training-time augmentation wrappers for the datasets of ``get_dataset``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from sdn.distributed import derive_seed

# Seed stream of the flips (see sdn.training.TRAIN_NOISE_STREAM for the posterior noise's).
FLIP_STREAM = 2


class RandomHFlip(Dataset):
    """Flip images left-right with probability 1/2, for configs with ``hflip`` (CIFAR-10 and CelebA
    in the paper).

    Whether image ``index`` is flipped in epoch ``epoch`` is one bit of ``derive_seed(seed,
    FLIP_STREAM, epoch, index)``: it depends on neither the rank, the micro-batch nor the loader
    worker that reads it, so a job of any number of processes flips exactly the images one process
    does, and a resumed run flips as an uninterrupted one. The trainer calls :meth:`set_epoch` before
    each epoch's loader is made (as for ``DistributedSampler``).
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is flipped in the current epoch."""
        return bool(derive_seed(self.seed, FLIP_STREAM, self.epoch, int(index)) & 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, factors = self.dataset[index]
        if self.flipped(index):
            image = image.flip(-1)
        return image, factors
