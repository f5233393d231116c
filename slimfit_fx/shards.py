"""Tensors sharded by FSDP2 (`fully_shard`): DTensors whose elements are spread
over ranks. Per-rank work (ILS's change sums, packing optimizer state) reads a
DTensor's local shard, which needs no collective."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


@functools.cache
def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> bool:
    # Called per optimizer-state entry every step: the class is looked up once.
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The elements of `t` this process holds: its shard of a DTensor, else `t`, detached."""
    t = t.detach()
    return t.to_local() if is_dtensor(t) else t
