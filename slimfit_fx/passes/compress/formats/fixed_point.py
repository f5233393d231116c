"""Power-of-two fixed point with no scale (the paper's formats): a kind gives
its format per width (registry.Kind.fixed); under scale="row", or at a width it
has none for, it is stored with a per-row scale (rowwise.py) instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .... import ops
from .base import Format, Packing, check_bits, numel
from .rowwise import ROWWISE


class FixedPointFormat(Format):
    name = "fixed_point"
    description = ("codes clamp(round(x * 2^f)) in 4 or 8 bits, no scale: values in the format's "
                   "range come back within half a step, values outside saturate to its ends")
    allowed = "4, 8 or None (an int)"
    at_copy_source = True
    examples = (4, 8)

    def check(self, field: str, value: object) -> None:
        check_bits(field, value)

    def packing(self, setting, kind, config, val=None) -> Packing:
        if config.scale == "row" or setting not in kind.fixed:
            return ROWWISE.packing(setting, kind, config, val)
        fixed = kind.fixed[setting]
        args = (fixed.bits, fixed.frac_bits, fixed.signed)
        sign = "int" if fixed.signed else "uint"
        return Packing(torch.ops.slimfit.quantize_fixed.default, args,
                       torch.ops.slimfit.dequantize_fixed.default, args,
                       f"{sign}{setting} fixed point, step 2^-{fixed.frac_bits}", kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        bits = packing.quantize_args[0]
        return numel(shape) if bits == 8 else (numel(shape) + 1) // 2

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |clamp(x) - unpacked|, x clamped to the format's range."""
        fixed = ops.FixedPoint(*packing.quantize_args)
        clamped = x.double().clamp(fixed.lo, fixed.hi)
        return (clamped - unpacked.double()).abs().max().item() if x.numel() else 0.0

    def bound(self, packing: Packing, dtype) -> float:
        # half a step: scaling by a power of two and back is exact in every float
        # dtype, and codes of at most 8 bits fit fp16's and bf16's significands
        return ops.FixedPoint(*packing.quantize_args).step / 2


FIXED_POINT = FixedPointFormat()


class OneWidthFormat(FixedPointFormat):
    """Takes the fixed point's settings and stores one width, `width`, its own way
    (`own_packing`); the other width, and every width under paper_formats, as
    the kind's fixed point."""

    width: int = 0

    def keeps_fixed(self, setting, config) -> bool:
        return setting != self.width or config.paper_formats

    def own_packing(self, kind) -> Packing:
        raise NotImplementedError

    def packing(self, setting, kind, config, val=None) -> Packing:
        if self.keeps_fixed(setting, config):
            return FIXED_POINT.packing(setting, kind, config, val)
        return self.own_packing(kind)

