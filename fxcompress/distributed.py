"""torch.distributed helpers for ``ctrl.distributed()``: make initialization results agree across ranks.

After ``DistributedDataParallel`` wrapping, each rank initializes ranges/masks from its own
data shard; these helpers average statistics or take rank 0's values so every rank trains
the same compressed model. They are no-ops in a single process.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "broadcast_from_rank0", "average_across_ranks"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_from_rank0(tensors: Iterable[torch.Tensor]):
    """Every rank gets rank 0's values (masks, chosen bit widths)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_across_ranks(tensors: Iterable[torch.Tensor]):
    """Every rank gets the mean over ranks (range statistics, scales)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for t in tensors:
        if t.dtype.is_floating_point:
            dist.all_reduce(t.data, op=dist.ReduceOp.SUM)
            t.data.div_(world)
        else:
            dist.broadcast(t.data, src=0)
