"""torch.distributed helpers: make what initialization computed agree across ranks.

Each rank initializes ranges, masks, scales and BatchNorm statistics from its own data
shard; these helpers average them or take rank 0's values so every rank trains the same
compressed model. They are no-ops in a single process. Tensors travel on the device the
process group's backend needs (CUDA for NCCL) and come back to where they live.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "is_rank0", "broadcast_from_rank0", "average_across_ranks"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    """True in a single process and on rank 0: the process that writes files every rank would write alike."""
    return not is_distributed() or dist.get_rank() == 0


def _communication_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU (and CUDA) tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _collective(t: torch.Tensor, op):
    """Run ``op`` on ``t`` (in place), through a copy on the backend's device when needed."""
    device = _communication_device(t)
    if device == t.device:
        op(t.data)
    else:
        moved = t.data.to(device)
        op(moved)
        t.data.copy_(moved.to(t.device))


@torch.no_grad()
def broadcast_from_rank0(tensors: Iterable[torch.Tensor]):
    """Every rank gets rank 0's values (masks, chosen bit widths, RNG states), in place."""
    if not is_distributed():
        return
    for t in tensors:
        _collective(t, lambda x: dist.broadcast(x, src=0))


@torch.no_grad()
def average_across_ranks(tensors: Iterable[torch.Tensor]):
    """Every rank gets the mean over ranks (floating point: statistics, scales), in place;
    other dtypes (counters, flags) get rank 0's values."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for t in tensors:
        if t.dtype.is_floating_point:
            def mean(x):
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                x.div_(world)
            _collective(t, mean)
        else:
            _collective(t, lambda x: dist.broadcast(x, src=0))
