"""Training-time augmentation wrappers for the datasets of ``get_dataset``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class RandomHFlip(Dataset):
    """Flip images left-right with probability 1/2, for configs with ``hflip`` (CIFAR-10 and CelebA
    in the paper). Draws from torch's global RNG, which the trainer seeds and checkpoints, so a
    resumed run (``num_workers=0``) flips exactly as an uninterrupted one."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, factors = self.dataset[index]
        if bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, factors
