"""x > 0 as a bool tensor: all a ReLU's backward reads of its output, exact,
one byte per element.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, Packing, check_flag, numel


class PositiveMaskFormat(Format):
    name = "positive_mask"
    description = "x > 0 as bool, one byte per element: comes back as 1 where x > 0, else 0 (exact)"
    allowed = "True, False or None"
    examples = (True,)

    def check(self, field: str, value: object) -> None:
        check_flag(field, value)

    def packing(self, setting, kind, config, val=None) -> Packing | None:
        if not setting:
            return None
        return Packing(torch.ops.slimfit.positive_mask.default, (),
                       torch.ops.slimfit.from_positive_mask.default, (),
                       "bool mask x > 0 (exact)", kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return numel(shape)

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |(x > 0) - unpacked|."""
        return (unpacked.double() - (x > 0).double()).abs().max().item() if x.numel() else 0.0

    def bound(self, packing: Packing, dtype) -> float:
        return 0.0


POSITIVE_MASK = PositiveMaskFormat()
