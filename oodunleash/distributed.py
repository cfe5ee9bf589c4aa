"""Helpers for running under ``torchrun`` / ``accelerate launch`` (DistributedDataParallel).

Everything here degrades to a no-op in a single process, so the rest of the library calls
these functions unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "all_gather_variable",
    "all_reduce_sum",
    "check_distributed_sampler",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0: the only rank that writes files, logs and progress bars."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (in place) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, which may differ in length."""
    if not is_distributed():
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, lengths, strict=True)])


def check_distributed_sampler(loader: DataLoader) -> None:
    """Under DDP each rank must see its own shard of the data: refuse a plain sampler."""
    if not is_distributed():
        return
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        raise ValueError(
            "Running under torch.distributed, but the DataLoader's sampler is "
            f"{type(sampler).__name__}, so every rank would see the same data. Build the loader "
            "with sampler=torch.utils.data.DistributedSampler(dataset, shuffle=True)."
        )
