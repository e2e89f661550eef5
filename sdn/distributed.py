"""torch.distributed plumbing for the trainer: process setup, metric reduction, seeded data sharding.

Sharding is defined on the *global* batch: the order of an epoch depends only on (seed, epoch), the
global batch of step t is a fixed window of that order, and rank r takes the r-th equal slice of it,
cut into consecutive micro-batches when the trainer accumulates gradients. A 2-process run therefore
sees exactly the images of a 1-process run with the same global batch, whatever the micro-batch.

The process group waits :data:`PROCESS_GROUP_TIMEOUT` (env ``SDN_PG_TIMEOUT_S`` overrides it) in any
collective before it fails, instead of NCCL's 10 minutes, so that ranks may wait in a :func:`barrier`
while rank 0 does work alone (writing files, tracking).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

DEVICES = ("auto", "cpu", "cuda")
# How long a rank waits in a collective (a barrier, an all-reduce) before the job fails. Two hours
# outlast any phase one rank runs alone in this suite (rank 0's checkpoint writes, sampling and
# MLflow export after training), while a rank that really hangs still ends the job the same day.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)
PROCESS_GROUP_TIMEOUT_ENV = "SDN_PG_TIMEOUT_S"


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (NumPy ``SeedSequence``), so that
    e.g. (seed, epoch) and (seed + 1, epoch - 1) give unrelated streams."""
    for key in keys:
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise ValueError(f"seed keys must be non-negative ints, got {keys!r}")
    words = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``: the run seed itself on rank 0, a derived one elsewhere, so that
    ranks draw independent noise while a single-process run uses ``seed`` unchanged."""
    return seed if rank == 0 else derive_seed(seed, rank)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the (possibly single-process) job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    distributed: bool = False  # a process group exists (torchrun sets WORLD_SIZE, even to 1)

    @property
    def is_main(self) -> bool:
        """Rank 0 is the only one that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Part of a torchrun job (a process group), even of one rank: the model is then DDP-wrapped."""
        return self.distributed or self.world_size > 1


def process_group_timeout() -> datetime.timedelta:
    """The collective timeout of the process group: ``SDN_PG_TIMEOUT_S`` seconds when that
    environment variable is set (a positive number), else :data:`PROCESS_GROUP_TIMEOUT`."""
    raw = os.environ.get(PROCESS_GROUP_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return PROCESS_GROUP_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"environment variable {PROCESS_GROUP_TIMEOUT_ENV} must be a positive number of "
                         f"seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Map ``"auto" | "cpu" | "cuda"`` to a torch device: on GPU ``cuda:<local_rank % device_count>``,
    so a job whose scheduler shows each process only its own GPU (``device_count`` 1) still works."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun job described by the environment (WORLD_SIZE/RANK/LOCAL_RANK), if any.

    Initialises the default process group (nccl on CUDA, gloo on CPU, collective timeout
    :func:`process_group_timeout`) unless one exists already; a torchrun job of one rank
    (``WORLD_SIZE=1``) is still a DDP job. Without torchrun variables this is a single-process context.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), torch_device, True)
    if world_size > 1 or launched:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=process_group_timeout())
        return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), torch_device, True)
    return DistContext(0, local_rank, 1, torch_device)


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if not ctx.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks (no-op in a single process), at most the process group's timeout
    (:func:`process_group_timeout`): put one around work that rank 0 does alone."""
    if ctx.is_distributed:
        dist.barrier()


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of dataset indices in ``epoch``: a permutation depending only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class ShardedBatchSampler(Sampler[list[int]]):
    """Batch sampler of one rank for one epoch, optionally starting at global batch ``start_batch``.

    Global batch t of the epoch is ``perm[t*B:(t+1)*B]`` with ``perm = epoch_permutation(...)``
    (the incomplete last batch is dropped); rank r's slice of it is ``[r*B/W, (r+1)*B/W)``, which
    the sampler yields as consecutive micro-batches of ``micro_batch_size`` indices (default: the
    whole slice, one per step). The micro-batches of all ranks tile the global batch, so every
    split (world size, micro-batch) of one global batch trains on the same images at each step.
    Starting at ``start_batch`` skips consumed batches without touching the dataset, which is what
    makes mid-epoch resume exact.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        micro_batch_size: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"batch_size (global) must be a positive multiple of the world size {world_size}, "
                f"got {global_batch_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} items, fewer than one global batch of {global_batch_size}"
            )
        self.steps_per_epoch = num_samples // global_batch_size
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.steps_per_epoch}], got {start_batch}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.micro_batch_size = self.per_rank if micro_batch_size is None else micro_batch_size
        if self.micro_batch_size < 1 or self.per_rank % self.micro_batch_size:
            raise ValueError(f"micro_batch_size must divide the per-rank batch {self.per_rank} "
                             f"(global {global_batch_size} over {world_size} ranks), got {micro_batch_size}")
        self.micro_batches_per_step = self.per_rank // self.micro_batch_size
        self.seed, self.epoch, self.rank, self.start_batch = seed, epoch, rank, start_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.micro_batches_per_step

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for batch in range(self.start_batch, self.steps_per_epoch):
            begin = batch * self.global_batch_size + self.rank * self.per_rank
            for micro in range(self.micro_batches_per_step):
                start = begin + micro * self.micro_batch_size
                yield order[start : start + self.micro_batch_size].tolist()
