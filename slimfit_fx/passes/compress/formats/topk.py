"""Top-k pruning per last-dim row: the given share of each row's largest-|x|
entries and their int16 or int32 indices; the rest come back as zero (the
paper's pruning of a frozen LayerNorm's x_hat).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .... import ops
from .base import Format, Packing, rows


class TopKFormat(Format):
    name = "topk"
    description = ("the largest-|x| share of each row, kept exactly with its indices; "
                   "every other entry comes back as zero")
    allowed = "None or in (0.0, 1.0]"
    prunes = True
    examples = (0.1, 0.5, 1.0)

    def check(self, field: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{field} must be None or in (0.0, 1.0], got {value!r}")

    def packing(self, setting, kind, config, val=None) -> Packing:
        # int16 indices where the rows are static and short enough
        row = val.shape[-1] if val is not None and val.dim() else None
        index_bits = ops.index_bits_for(row) if isinstance(row, int) else 32
        return Packing(torch.ops.slimfit.prune_topk.default, (float(setting), index_bits),
                       torch.ops.slimfit.unprune_topk.default, (),
                       f"top {setting:.0%} per row of x_hat, int{index_bits} indices", kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        keep, index_bits = packing.quantize_args
        n, length = rows(shape)
        return n * ops.kept_per_row(length, keep) * (dtype.itemsize + index_bits // 8)

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Per row, the largest |x - unpacked| less the largest |x| it may drop
        (the row's (k+1)-th largest): 0 when the k largest are kept exactly."""
        keep = packing.quantize_args[0]
        n, length = rows(x.shape)
        if not x.numel():
            return 0.0
        x64, out64 = x.double().reshape(n, length), unpacked.double().reshape(n, length)
        k = ops.kept_per_row(length, keep)
        dropped = x64.abs().sort(dim=-1, descending=True).values[:, k] if k < length else x64.new_zeros(n)
        return ((x64 - out64).abs().amax(dim=-1) - dropped).max().item()

    def bound(self, packing: Packing, dtype) -> float:
        return 0.0


TOPK = TopKFormat()
