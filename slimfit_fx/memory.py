"""Count the bytes autograd holds from forward to backward, as it runs.

Used by the runtime after every training forward and by the benchmarks on
eager models, so both sides of a comparison are measured the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def run_counting_saved_bytes(
    fn: Callable[..., Any], *args: Any, resident: tuple[torch.Tensor, ...] = (),
    record: list[tuple[int, bool]] | None = None, **kwargs: Any
) -> tuple[Any, int]:
    """Run `fn(*args, **kwargs)`; return its result and the bytes saved for backward.

    Counts each distinct storage autograd packs once, except storages of tensor
    `args` and `resident` (parameters, model inputs): those are held anyway.
    `record`, if given, receives (storage bytes, is resident) per packed tensor.
    """
    skip = {x.untyped_storage().data_ptr() for x in (*args, *resident) if isinstance(x, torch.Tensor)}
    held: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        is_resident = storage.data_ptr() in skip
        if not is_resident:
            held[storage.data_ptr()] = storage.nbytes()
        if record is not None:
            record.append((storage.nbytes(), is_resident))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        result = fn(*args, **kwargs)
    return result, sum(held.values())


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
