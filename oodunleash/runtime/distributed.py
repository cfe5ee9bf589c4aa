"""Helpers for running under ``torchrun`` / ``accelerate launch`` (DistributedDataParallel).

Everything here degrades to a no-op in a single process, so the rest of the library calls
these functions unconditionally. What the library does under ``torch.distributed``:

* :func:`init_distributed` starts the default process group from the environment variables
  that ``torchrun`` and ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) when the script has not started one itself;
* :func:`shard_loader` gives a plain ``DataLoader`` a :class:`~torch.utils.data.DistributedSampler`
  so every rank reads its own shard;
* :func:`real_samples` and :func:`gather_samples` know which samples a ``DistributedSampler``
  duplicated to even out the shards, so sums and gathered outputs equal those of one process
  on the same data.

See ``docs/howto/distributed.md`` for the user-facing story.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from oodunleash.runtime.modules import model_device

__all__ = [
    "all_gather_variable",
    "all_reduce_sum",
    "any_rank",
    "check_distributed_sampler",
    "check_same_on_all_ranks",
    "gather_samples",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_device",
    "local_rank",
    "rank",
    "real_samples",
    "shard_loader",
    "sync_buffers",
    "sync_module",
    "world_size",
]


# --------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, set by torchrun/accelerate; else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _gpu_per_process() -> bool:
    """Whether every process of this node can have a GPU of its own (the same on all ranks)."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and processes_here <= torch.cuda.device_count()


def local_device() -> torch.device:
    """The device this process should compute on: ``cuda:LOCAL_RANK`` when every process of the
    node has a GPU of its own, else the CPU (as when more processes than GPUs were started)."""
    return torch.device("cuda", local_rank()) if _gpu_per_process() else torch.device("cpu")


def is_main_process() -> bool:
    """True on rank 0: the only rank that writes files, logs and progress bars."""
    return rank() == 0


def init_distributed(backend: str | None = None) -> bool:
    """Start the default process group from the launcher's environment, if needed.

    Does nothing when a group already exists (the script called
    :func:`torch.distributed.init_process_group` itself) or when the process was not started by
    a launcher (no ``RANK``/``WORLD_SIZE``, or ``WORLD_SIZE=1``), so single-process scripts are
    unaffected. ``OODUnleash.fit`` calls it, so a script written for one GPU runs unchanged under
    ``torchrun --nproc_per_node N`` or ``accelerate launch``.

    Args:
        backend: Default: NCCL for CUDA tensors plus Gloo for CPU tensors when every process
            of this node can have a GPU of its own (outputs gathered on the CPU then still
            work), else Gloo.

    Returns:
        Whether more than one process is now running.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return is_distributed()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # Decided from values every process of a node shares, so that all choose the same backend.
    # More processes than GPUs (CPU processes on a GPU machine): NCCL cannot share a GPU.
    if _gpu_per_process():
        # Every later ``.cuda()`` of this process must land on its own GPU, not on GPU 0.
        torch.cuda.set_device(local_rank())
        backend = backend or "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend or "gloo")
    return is_distributed()


# --------------------------------------------------------------------------- collectives
def _comm_device(tensor: Tensor) -> torch.device:
    """Where ``tensor`` must be to take part in a collective of the default group.

    A plain NCCL group cannot move CPU tensors; those then travel through the current GPU.
    """
    if tensor.device.type != "cpu":
        return tensor.device
    config = dist.get_backend_config() if hasattr(dist, "get_backend_config") else ""
    if "cpu:" in str(config) or dist.get_backend() in ("gloo", "mpi"):
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks (in place) and return it."""
    if is_distributed():
        device = _comm_device(tensor)
        if device == tensor.device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer).

    Used where one rank alone would otherwise raise and leave the others waiting forever in
    the next collective (a NaN loss on one rank's batch).
    """
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def check_same_on_all_ranks(value: int, what: str, device: torch.device | str = "cpu") -> None:
    """Raise on every rank (instead of hanging) when ranks disagree on ``value``.

    DDP all-reduces gradients once per step, so every rank must run the same number of steps.
    """
    if not is_distributed():
        return
    both = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=device)
    device = _comm_device(both)
    both = both.to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[0].item(), -both[1].item()
    if high != low:
        raise ValueError(
            f"The ranks disagree on {what}: from {low:g} to {high:g}. Under DistributedDataParallel "
            "every rank must run the same number of steps, or the ranks wait for each other "
            "forever. Use torch.utils.data.DistributedSampler (it gives every rank the same "
            "number of samples) and the same batch size on every rank."
        )


def _all_gather_padded(tensor: Tensor, header: list[float]) -> tuple[list[Tensor], Tensor]:
    """All-gather tensors of different lengths along dim 0, plus one small header per rank.

    Returns each rank's tensor (trimmed to its own length, on ``tensor``'s device) and the
    ``(world, 1 + len(header))`` table of ``[length, *header]`` rows, identical on every rank.
    """
    device = _comm_device(tensor)
    row = torch.tensor([float(tensor.shape[0]), *header], dtype=torch.float64, device=device)
    rows = [torch.zeros_like(row) for _ in range(world_size())]
    dist.all_gather(rows, row)
    table = torch.stack(rows).cpu()
    lengths = [int(n) for n in table[:, 0]]
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [p[:n].to(tensor.device) for p, n in zip(parts, lengths, strict=True)], table


def all_gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate along dim 0 the tensors of all ranks (rank order), which may differ in length.

    For per-sample outputs of a loader prefer :func:`gather_samples`, which restores the
    dataset order and drops a ``DistributedSampler``'s padding.
    """
    if not is_distributed():
        return tensor
    parts, _ = _all_gather_padded(tensor, [])
    return torch.cat(parts)


# --------------------------------------------------------------------------- sampler layout
def _distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` a loader draws its indices from, if any."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return inner if isinstance(inner, DistributedSampler) else None


def _shard_layout(loader: Any) -> tuple[int, int, int] | None:
    """``(rank, num_replicas, len(dataset))`` of the loader's ``DistributedSampler``, if any."""
    sampler = _distributed_sampler(loader)
    if sampler is None or not is_distributed():
        return None
    return sampler.rank, sampler.num_replicas, len(sampler.dataset)  # type: ignore[arg-type]


def real_samples(loader: Any, start: int, count: int) -> Tensor | None:
    """Which of this rank's samples ``start .. start + count - 1`` are real, not padding.

    A ``DistributedSampler`` (``drop_last=False``) makes the shards equal by repeating the first
    indices at the end of its list: local sample ``i`` of rank ``r`` sits at position
    ``i * num_replicas + r`` of that list, and the positions from ``len(dataset)`` on are the
    repeats (shuffled or not). Returns ``None`` when every sample counts (one process, or a
    loader without a ``DistributedSampler``).
    """
    layout = _shard_layout(loader)
    if layout is None:
        return None
    sampler_rank, replicas, n_data = layout
    positions = (torch.arange(start, start + count) * replicas) + sampler_rank
    real = positions < n_data
    return None if bool(real.all()) else real


def gather_samples(local: Tensor, loader: Any = None) -> Tensor:
    """Gather per-sample outputs of all ranks as one process would have computed them.

    ``local`` holds this rank's outputs (logits, features, labels, scores), one row per sample,
    in the order the rank read them from ``loader``. When ``loader`` reads a
    ``DistributedSampler``, the shards are interleaved back into the sampler's order and the
    padding the sampler added is dropped: with ``shuffle=False`` the result is in dataset order
    and has exactly ``len(dataset)`` rows, identical to a single-process pass. Otherwise (no
    sampler known, uneven shards) the shards are concatenated in rank order. In a single process
    ``local`` is returned as is. Every rank receives the full result.

    Example (under ``torchrun --nproc_per_node 2``, 5 samples, ``shuffle=False``): rank 0 reads
    samples 0, 2, 4 and rank 1 reads 1, 3, 0 (0 is padding); the gather returns rows for
    0, 1, 2, 3, 4.
    """
    if not is_distributed():
        return local
    sampler = _distributed_sampler(loader)
    header = (
        [1.0, float(sampler.rank), float(sampler.num_replicas), float(len(sampler.dataset))]  # type: ignore[arg-type]
        if sampler is not None
        else [0.0, 0.0, 0.0, 0.0]
    )
    parts, table = _all_gather_padded(local, header)
    lengths = table[:, 0]
    interleavable = (
        bool((table[:, 1] == 1).all())
        and bool((table[:, 3] == world_size()).all())
        # Rank r must hold shard r, so that row i of part r is position i * world + r.
        and bool((table[:, 2] == torch.arange(world_size(), dtype=table.dtype)).all())
        and bool((lengths == lengths[0]).all())
    )
    if not interleavable:
        return torch.cat(parts)
    n_data = int(table[0, 4])
    ordered = torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])
    return ordered[:n_data]


# --------------------------------------------------------------------------- loaders
def _is_distributed_sampler(sampler: Any) -> bool:
    # Duck typing admits rank-aware samplers of other libraries (e.g. a distributed weighted
    # sampler), which all carry ``num_replicas`` and ``rank``.
    return isinstance(sampler, DistributedSampler) or (
        hasattr(sampler, "num_replicas") and hasattr(sampler, "rank")
    )


def shard_loader(loader: Iterable, *, name: str = "loader") -> Iterable:
    """The loader as this rank should read it under ``torch.distributed``.

    * One process, or a loader that already uses a ``DistributedSampler`` (or another sampler
      with ``num_replicas``/``rank``): returned unchanged.
    * A plain ``DataLoader`` over a map-style dataset with the default sampler
      (``shuffle=False`` or ``True``): rebuilt with the same settings and a
      ``DistributedSampler(dataset, shuffle=<same>)``, so each rank reads ``1/world_size`` of the
      data with the same per-rank ``batch_size``.
    * A ``DataLoader`` over an ``IterableDataset``, or any other iterable: returned unchanged
      with a warning (on rank 0): oodunleash cannot tell whether it is sharded. Unsharded data
      is not wrong, every rank then computes the same thing, but the work is repeated.
    * A ``DataLoader`` with a custom sampler or batch sampler: ``ValueError`` asking for a
      ``DistributedSampler``, because silently replacing the sampler would change the data.
    """
    if not is_distributed():
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        if is_main_process():
            warnings.warn(
                f"Running under torch.distributed with a {name} that is not a DataLoader over a "
                "map-style dataset; oodunleash cannot shard it. If every rank reads all the data "
                "the results are right but the work is repeated on every rank: shard it by "
                "torch.distributed.get_rank() yourself, or pass a DataLoader.",
                stacklevel=3,
            )
        return loader
    if _is_distributed_sampler(loader.sampler) or _is_distributed_sampler(
        getattr(loader.batch_sampler, "sampler", None)
    ):
        return loader
    sampler = loader.sampler
    plain_batches = type(loader.batch_sampler) is BatchSampler and loader.batch_size is not None
    shuffle = type(sampler) is RandomSampler and not sampler.replacement
    if not (plain_batches and (type(sampler) is SequentialSampler or shuffle)):
        raise ValueError(
            f"Running under torch.distributed, but the {name}'s sampler is "
            f"{type(sampler).__name__} (batch sampler {type(loader.batch_sampler).__name__}), "
            "which oodunleash cannot shard, so every rank would read the same data. Build the "
            "loader with sampler=torch.utils.data.DistributedSampler(dataset, shuffle=...)."
        )
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    # Same seed on every rank (DistributedSampler's default 0): the ranks must draw the same
    # permutation to split it without overlap. The fine-tune calls set_epoch every epoch.
    return DataLoader(
        loader.dataset,
        sampler=DistributedSampler(loader.dataset, shuffle=shuffle, drop_last=False),
        **kwargs,
    )


def check_distributed_sampler(loader: Iterable) -> None:
    """Refuse a ``DataLoader`` whose plain sampler would give every rank the same data.

    :func:`shard_loader` fixes the common cases automatically; this is the strict check for
    callers of :func:`oodunleash.finetune.loop.train` that pass the loader themselves.
    """
    if not is_distributed() or not isinstance(loader, DataLoader):
        return
    if isinstance(loader.dataset, IterableDataset):
        return
    if not (
        _is_distributed_sampler(loader.sampler)
        or _is_distributed_sampler(getattr(loader.batch_sampler, "sampler", None))
    ):
        raise ValueError(
            "Running under torch.distributed, but the DataLoader's sampler is "
            f"{type(loader.sampler).__name__}, so every rank would see the same data. Build the "
            "loader with sampler=torch.utils.data.DistributedSampler(dataset, shuffle=True), "
            "or pass it through oodunleash.runtime.distributed.shard_loader()."
        )


# --------------------------------------------------------------------------- models
@torch.no_grad()
def sync_module(module: torch.nn.Module) -> None:
    """Prepare ``module`` for a multi-process fit: own GPU, rank 0's weights.

    * A model left on a GPU other than this rank's ``LOCAL_RANK`` (typically every rank called
      ``model.cuda()`` before the process group set the device, so all sit on GPU 0) is moved to
      ``cuda:LOCAL_RANK``; DDP cannot put two ranks on one GPU.
    * Rank 0's parameters and buffers are copied to every rank, so that ξ, estimated before DDP
      wraps the model, is measured on the same model everywhere (DDP itself only syncs at
      wrapping time).
    """
    if not is_distributed():
        return
    device = model_device(module)
    if (
        device.type == "cuda"
        and "LOCAL_RANK" in os.environ
        and device.index != local_rank()
        and _gpu_per_process()
    ):
        torch.cuda.set_device(local_rank())
        module.to(torch.device("cuda", local_rank()))
    for tensor in [*module.parameters(), *module.buffers()]:
        device = _comm_device(tensor)
        data = tensor.data if device == tensor.device else tensor.data.to(device)
        dist.broadcast(data, src=0)
        if data is not tensor.data:
            tensor.data.copy_(data)


@torch.no_grad()
def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward pass, but the pass itself then updates them from
    the rank's own batch, so after the last step they differ slightly between ranks. Synced,
    every rank holds the same model, and evaluation on the ranks' shards reads one model.
    """
    if not is_distributed():
        return
    for tensor in module.buffers():
        device = _comm_device(tensor)
        data = tensor.data if device == tensor.device else tensor.data.to(device)
        dist.broadcast(data, src=0)
        if data is not tensor.data:
            tensor.data.copy_(data)
