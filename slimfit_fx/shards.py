"""Tensors sharded by FSDP2 (`fully_shard`): DTensors whose elements are spread
over ranks. Per-rank work (ILS's change sums, packing optimizer state) reads a
DTensor's local shard, which needs no collective."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dtensor(t: object) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The elements of `t` this process holds: its shard of a DTensor, else `t`, detached."""
    t = t.detach()
    return t.to_local() if is_dtensor(t) else t
