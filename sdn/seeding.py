"""One seed drives Python, NumPy, torch and DataLoader workers, so runs are bit-reproducible."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from sdn.distributed import derive_seed


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices) and switch torch to deterministic algorithms."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive Python/NumPy seeds from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (for DataLoader shuffling and sampling)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def image_generators(indices: Sequence[int], device: torch.device | str, *stream: int) -> list[torch.Generator]:
    """One generator per image on ``device``, seeded by (``*stream``, dataset index): an image's draws
    depend on which image it is, not on the batch, micro-batch or rank that holds it."""
    return [torch.Generator(device=device).manual_seed(derive_seed(*stream, int(i))) for i in indices]


def image_noise(indices: Sequence[int], size: int, device: torch.device | str, *stream: int) -> torch.Tensor:
    """Standard normal noise (B, ``size``) on ``device``, row b drawn from image ``indices[b]``'s own
    generator (:func:`image_generators`)."""
    generators = image_generators(indices, device, *stream)
    return torch.stack([torch.randn(size, generator=g, device=device) for g in generators])
