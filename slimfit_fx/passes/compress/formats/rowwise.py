"""Symmetric int8 or int4 codes with one fp32 scale per last-dim row
(scale = max|x| / qmax): for tensors with no fixed range, such as the inputs
of different layers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, Packing, check_bits, numel, rows


class RowwiseFormat(Format):
    name = "rowwise"
    description = ("codes round(x / scale) in 4 or 8 bits with an fp32 scale max|x| / qmax per row: "
                   "every element comes back within half its row's step")
    allowed = "4, 8 or None (an int)"
    examples = (4, 8)

    def check(self, field: str, value: object) -> None:
        check_bits(field, value)

    def packing(self, setting, kind, config, val=None) -> Packing:
        return Packing(torch.ops.slimfit.quantize_rowwise.default, (setting,),
                       torch.ops.slimfit.dequantize_rowwise.default, (setting,),
                       f"{setting}-bit, per-row scale", kind.stored_as, self)

    def nbytes(self, packing: Packing, shape, dtype) -> int:
        bits = packing.quantize_args[0]
        codes = numel(shape) if bits == 8 else (numel(shape) + 1) // 2
        return codes + 4 * rows(shape)[0]

    def error(self, packing: Packing, x: Tensor, unpacked: Tensor) -> float:
        """Largest |x - unpacked| in steps of its row (max |row| / qmax)."""
        qmax = 2 ** (packing.quantize_args[0] - 1) - 1
        n, length = rows(x.shape)
        if not x.numel():
            return 0.0
        x64, out64 = x.double().reshape(n, length), unpacked.double().reshape(n, length)
        step = x64.abs().amax(dim=-1, keepdim=True) / qmax
        err = (x64 - out64).abs()
        # an all-zero row comes back exactly zero
        return torch.where(step > 0, err / step.clamp_min(1e-300), err).max().item()

    def bound(self, packing: Packing, dtype) -> float:
        # half a step, plus rounding: the kernel computes in fp32 and returns
        # `dtype`, each rounding a value of at most qmax steps by half an ulp
        qmax = 2 ** (packing.quantize_args[0] - 1) - 1
        ulps = torch.finfo(dtype).eps / 2 + torch.finfo(torch.float32).eps
        return 0.5 + qmax * ulps


ROWWISE = RowwiseFormat()
