"""Data parallelism over prompts with torch.distributed (``torchrun --nproc-per-node N -m attnscan scan ...``).

Each rank takes a deterministic shard of every prompt set (prompt ``i`` goes to rank ``i % world``), accumulates it,
and the collectors are summed across ranks: float64 sums and counts add, and each prompt's summaries come from the
one rank that owns it (the others contribute zeros). Every rank ends with the same accumulators; rank 0 writes.
Backends: gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .accumulate import GridCollector

_PER_PROMPT = ("lengths", "blocks", "sink", "entropy")


def requested() -> bool:
    """Whether this process was started by a launcher for more than one process (torchrun, accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group if a launcher asked for one; return ``(rank, world_size)`` (``(0, 1)`` otherwise)."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if not requested():
            return 0, 1
        cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This rank's CUDA device under a launcher (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(n: int, rank: int, world: int) -> list[int]:
    """The prompt indices of ``rank``: ``rank, rank + world, ...``."""
    return list(range(rank, n, world))


def reduce_collector(collector: GridCollector) -> None:
    """Sum a collector's state across ranks in place; afterwards every rank holds the whole set's accumulators."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    all_reduce_state(collector)


def all_reduce_state(collector: GridCollector) -> None:
    """The reduction of :func:`reduce_collector` in the initialised process group, whatever its size (a group of
    one leaves the state as it is: how the nccl path is checked on a single GPU, see ``bench/gpu_check.py``).

    nccl reduces CUDA tensors only, so its state travels through the current CUDA device; booleans travel as int64.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = collector.seen.clone()
    state = collector.state()
    for key, tensor in state.items():
        work = tensor.to(device=device, dtype=torch.int64 if tensor.dtype == torch.bool else tensor.dtype)
        if key in _PER_PROMPT:
            shape = (-1,) + (1,) * (work.dim() - 1)
            work = torch.where(mine.to(device).view(shape), work, torch.zeros((), dtype=work.dtype, device=device))
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        tensor.copy_(work.to(device=tensor.device, dtype=tensor.dtype) if tensor.dtype != torch.bool else work > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
