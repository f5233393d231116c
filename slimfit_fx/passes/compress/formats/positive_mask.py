"""x > 0, one bit per element (eight to a byte, as bit_pack stores a bool
mask): all a ReLU's backward reads of its output, exact.
"""
from __future__ import annotations

from torch import Tensor

from .base import ExactFlagFormat, Packing, numel


class PositiveMaskFormat(ExactFlagFormat):
    name = "positive_mask"
    description = "x > 0 as one bit per element, eight to a byte: comes back as 1 where x > 0, else 0 (exact)"
    ops = ("positive_mask", "from_positive_mask")
    text = "mask x > 0, 1 bit per element (exact)"

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return (numel(shape) + 7) // 8

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |(x > 0) - unpacked|."""
        return (unpacked.double() - (x > 0).double()).abs().max().item() if x.numel() else 0.0


POSITIVE_MASK = PositiveMaskFormat()
