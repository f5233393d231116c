"""A bool tensor eight elements to a byte: lossless, so backward multiplies by
exactly the mask forward drew (dropout's; a ReLU's sign where inductor saves it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, Packing, check_flag, numel


class BitPackFormat(Format):
    name = "bit_pack"
    description = "a bool tensor as one bit per element, eight to a byte (exact)"
    allowed = "True, False or None"
    examples = (True,)

    def check(self, field: str, value: object) -> None:
        check_flag(field, value)

    def packing(self, setting, kind, config, val=None) -> Packing | None:
        if not setting:
            return None
        return Packing(torch.ops.slimfit.pack_bits.default, (), torch.ops.slimfit.unpack_bits.default, (),
                       "1 bit per element (exact)", kind.stored_as, self)

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype == torch.bool

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return (numel(shape) + 7) // 8

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Elements that differ."""
        return float((x != unpacked).sum().item())

    def bound(self, packing: Packing, dtype) -> float:
        return 0.0


BIT_PACK = BitPackFormat()
