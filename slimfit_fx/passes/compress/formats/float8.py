"""One byte as float8 e4m3: relative precision at any size, no scale. At 4
bits, under scale="row" or under paper_formats, the kind's fixed point (or a
per-row scale).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .... import ops
from .base import Packing, numel
from .fixed_point import OneWidthFormat

# e4m3's smallest normal: below it values are subnormal, with an absolute step of 2^-9
_SMALLEST_NORMAL = 2.0**-6


class Float8Format(OneWidthFormat):
    """Under scale="row" too, the kind's fixed point (a per-row scale where it has none)."""

    name = "float8"
    description = ("8 bits as float8 e4m3 (3 mantissa bits): values within +-448 come back within 1/16 "
                   "of themselves (within 2^-10 below 2^-6), values past it saturate; no scale. "
                   "4 bits: the kind's fixed point")
    width = 8

    def keeps_fixed(self, setting, config) -> bool:
        return super().keeps_fixed(setting, config) or config.scale == "row"

    def own_packing(self, kind) -> Packing:
        return Packing(torch.ops.slimfit.quantize_float8.default, (),
                       torch.ops.slimfit.dequantize_float8.default, (), "float8 e4m3", kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return numel(shape)

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |clamp(x) - unpacked| / max(|clamp(x)|, 2^-6), x clamped to +-448
        (nan where x is nan counts as exact)."""
        if not x.numel():
            return 0.0
        clamped = x.double().clamp(-ops.FLOAT8_MAX, ops.FLOAT8_MAX)
        miss = (clamped - unpacked.double()).abs() / clamped.abs().clamp_min(_SMALLEST_NORMAL)
        return miss.nan_to_num(nan=0.0).max().item()

    def bound(self, packing: Packing, dtype) -> float:
        # half a step of 3 mantissa bits; the subnormals' half step 2^-10 is 2^-4 of 2^-6
        return 2.0**-4


FLOAT8 = Float8Format()
