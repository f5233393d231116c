"""A bool tensor eight elements to a byte: lossless, so backward multiplies by
exactly the mask forward drew (dropout's; a ReLU's sign where inductor saves it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ExactFlagFormat, Packing, numel


class BitPackFormat(ExactFlagFormat):
    name = "bit_pack"
    description = "a bool tensor as one bit per element, eight to a byte (exact)"
    ops = ("pack_bits", "unpack_bits")
    text = "1 bit per element (exact)"

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype == torch.bool

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return (numel(shape) + 7) // 8

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Elements that differ."""
        return float((x != unpacked).sum().item())


BIT_PACK = BitPackFormat()
