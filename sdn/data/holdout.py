"""A validation split held out from a training split: a fixed, seeded draw of indices.

The official SDN code selected its checkpoint on the test split; a fair study selects on images
that are neither trained on nor tested on. ``holdout_indices`` splits ``range(num)`` into the
indices kept for training and the held-out validation indices (both sorted, disjoint, covering
every index); ``split_holdout`` applies it to a dataset.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset


def holdout_indices(num: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of ``range(num)``: ``size`` of them drawn without
    replacement by a NumPy generator seeded with ``seed``, the rest kept for training."""
    if not isinstance(num, int) or not isinstance(size, int) or not isinstance(seed, int):
        raise ValueError(f"num, size and seed must be ints, got {num!r}, {size!r}, {seed!r}")
    if not 0 < size < num:
        raise ValueError(f"a validation hold-out of {size} images needs 0 < size < {num} (the training split's size)")
    held = np.zeros(num, dtype=bool)
    held[np.random.default_rng(seed).choice(num, size, replace=False)] = True
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def split_holdout(dataset: Dataset, size: int, seed: int) -> tuple[Subset, Subset]:
    """(training subset, validation subset) of ``dataset`` by :func:`holdout_indices`."""
    keep, held = holdout_indices(len(dataset), size, seed)
    return Subset(dataset, keep), Subset(dataset, held)
