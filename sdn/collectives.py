"""Collectives of the evaluation code: which items a rank of an initialised torch.distributed process
group takes, and the exact union of the per-item results of all ranks (no-ops without a group).

Unlike ``sdn.distributed`` (the trainer's explicit ``DistContext``), these read the default process
group, so library functions such as ``sdn.scores.evaluate_bpd`` shard themselves when called under
torchrun and run unchanged in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_items: int, rank: int, world: int) -> range:
    """The contiguous share of ``rank``: items ``[rank * n // world, (rank + 1) * n // world)``
    (sizes differ by at most one; a rank may get none when there are fewer items than ranks)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    return range(rank * num_items // world, (rank + 1) * num_items // world)


def _communication_device() -> torch.device:
    """Where the default group's backend takes tensors: the current GPU for NCCL, else the CPU."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_disjoint(tensor: torch.Tensor, block_rows: int = 8192) -> torch.Tensor:
    """The union of per-rank results, on every rank: each rank passes a tensor of the same shape
    holding its own rows and zeros in every other rank's rows, and gets the sum over ranks, which is
    exactly the union (x + 0 = x). Sent in blocks of ``block_rows`` rows (bounded extra memory);
    returned on the input's device (the input itself without a process group of several ranks)."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    if tensor.dim() == 0:
        raise ValueError("merge_disjoint needs a tensor with a row dimension")
    out = tensor.clone().contiguous()
    where = _communication_device()
    for start in range(0, out.shape[0], block_rows):
        block = out[start:start + block_rows].to(where)
        dist.all_reduce(block, op=dist.ReduceOp.SUM)
        out[start:start + block_rows] = block.to(out.device)
    return out
