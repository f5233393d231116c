"""What an activation's backward reads of its input, act'(x), in 4 bits: which
of 16 intervals x lies in, the intervals and each one's value of act' fitted to
act' (ops.derivative_bins), unpacked to a point of the interval where act' takes
that value. At 8 bits, or under paper_formats, the kind's fixed point.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .... import ops
from .base import Packing, numel
from .fixed_point import OneWidthFormat


class DerivativeBinsFormat(OneWidthFormat):
    name = "derivative_bins"
    description = ("4 bits naming which of 16 intervals of x it lies in, fitted so a constant act' per "
                   "interval is closest to act' (L2); comes back as the interval's point where act' is "
                   "that constant. 8 bits: the kind's fixed point (codes clamp(round(x * 2^f)))")
    width = 4

    def own_packing(self, kind) -> Packing:
        bins = ops.derivative_bins(kind.derivative)
        return Packing(torch.ops.slimfit.quantize_binned.default, (bins.boundaries,),
                       torch.ops.slimfit.dequantize_binned.default, (bins.representatives,),
                       f"4-bit bins of {kind.derivative}' (max error {bins.max_error:.3f})",
                       kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        return (numel(shape) + 1) // 2

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |unpacked - the representative of x's interval, in x's dtype|:
        what the format promises is the interval, not a distance in x."""
        if not x.numel():
            return 0.0
        boundaries, = packing.quantize_args
        representatives, = packing.dequantize_args
        want = torch.tensor(representatives, dtype=x.dtype, device=x.device)[ops.bin_codes(x, boundaries)]
        return (unpacked.double() - want.double()).abs().max().item()

    def bound(self, packing: Packing, dtype) -> float:
        return 0.0


DERIVATIVE_BINS = DerivativeBinsFormat()
