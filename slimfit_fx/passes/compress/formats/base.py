"""What a storage format is: one object that validates its config field, picks
the custom ops (and their arguments) that pack and unpack a tensor, and states
the bytes and the error that costs. It must not decide which tensors are packed
(the kinds in ../registry.py and the matchers in ../patterns.py do).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Format:
    """A way to store a tensor for backward, set by a CompressionConfig field.

    name: the key the format is registered under (formats.FORMATS) and that a
        kind names (registry.Kind.format).
    description: what is stored and what is lost, for people.
    allowed: the values its config field takes, for people (`check` refuses
        the others with a message naming them).
    prunes: it drops entries (CompressionConfig.norm_guard decides where a
        norm's input may be pruned).
    at_copy_source: a saved view, copy or repeat of a tensor is stored as that
        tensor packed, the ops rerun on it in backward (compress_saved); only
        an elementwise format may say so (fixed point does).

    A subclass defines `check` (the field's validation), `packing` (the ops for
    one setting), `nbytes` (the bytes its packed tensors hold, by its own rule)
    and `error` and `bound` (the error measure it promises and the bound on it),
    and `accepts` the dtypes it stores.
    """

    name: str = ""
    description: str = ""
    allowed: str = ""
    prunes: bool = False
    at_copy_source: bool = False
    # settings its fidelity and bytes are tested at (tests/test_formats.py)
    examples: tuple = ()

    def check(self, field: str, value: object) -> None:
        """Raise ValueError naming `field` if `value` (not None) is not a setting of this format."""
        raise NotImplementedError

    def packing(self, setting: object, kind, config, val: Tensor | None = None) -> "Packing | None":
        """How `kind` (a registry.Kind) is stored when its field is `setting`
        (checked, not None) under `config`; None keeps it whole. `val`, the
        tensor or its fake value, may size the format (index widths)."""
        raise NotImplementedError

    def accepts(self, dtype: torch.dtype) -> bool:
        """Whether it stores tensors of `dtype`."""
        return dtype.is_floating_point

    def nbytes(self, packing: "Packing", shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes the packed form of a `shape`, `dtype` tensor holds."""
        raise NotImplementedError

    def error(self, packing: "Packing", x: Tensor, unpacked: Tensor) -> float:
        """The error measure the format promises, of `unpacked` (x packed and
        unpacked) against `x`."""
        raise NotImplementedError

    def bound(self, packing: "Packing", dtype: torch.dtype) -> float:
        """What `error` never exceeds for finite inputs of `dtype`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"


@dataclass(frozen=True)
class Packing:
    """One setting of a format: the custom op that packs a tensor and the one that
    unpacks it, with their arguments, as graphs call them (quantize_op(x, *quantize_args);
    dequantize_op(*packed, *dequantize_args, shape, dtype)) and as eager code does
    (`pack`, `unpack`). Equal packings store a tensor identically, whatever the kind."""

    quantize_op: object
    quantize_args: tuple
    dequantize_op: object
    dequantize_args: tuple
    text: str
    stored_as: str = "self"
    format: Format = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return self.text

    def pack(self, x: Tensor) -> tuple[Tensor, ...]:
        """x packed: the tensors the quantize op returns, as a tuple."""
        out = self.quantize_op(x, *self.quantize_args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def unpack(self, packed: Sequence[Tensor], shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """The tensor of `shape` and `dtype` rebuilt from `pack`'s tensors."""
        return self.dequantize_op(*packed, *self.dequantize_args, list(shape), dtype)

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes `pack` returns for a `shape`, `dtype` tensor, by the format's rule."""
        return self.format.nbytes(self, shape, dtype)

    def fidelity(self, x: Tensor) -> float:
        """x packed and unpacked, measured against x as the format promises
        (never above `bound(x.dtype)`)."""
        return self.format.error(self, x, self.unpack(self.pack(x), x.shape, x.dtype))

    def bound(self, dtype: torch.dtype) -> float:
        return self.format.bound(self, dtype)


class ExactFlagFormat(Format):
    """A lossless format switched on by a flag (True) and off by False or None:
    the torch.ops.slimfit ops named `ops` (pack, unpack; no arguments), `text`
    for the report. Ops are looked up when used: slimfit_fx.ops registers them."""

    allowed = "True, False or None"
    examples = (True,)
    ops: tuple[str, str]
    text: str

    def check(self, field: str, value: object) -> None:
        check_flag(field, value)

    def packing(self, setting, kind, config, val=None) -> "Packing | None":
        if not setting:
            return None
        pack, unpack = (getattr(torch.ops.slimfit, name).default for name in self.ops)
        return Packing(pack, (), unpack, (), self.text, kind.stored_as, self)

    def bound(self, packing: "Packing", dtype: torch.dtype) -> float:
        return 0.0


def check_bits(field: str, value: object) -> None:
    # 8.0 == 8, but a float width would reach the packing ops and fail at the first forward
    if isinstance(value, bool) or not isinstance(value, int) or value not in (4, 8):
        raise ValueError(f"{field} must be 4, 8 or None (an int), got {value!r} "
                         f"of type {type(value).__name__}")


def check_flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be True, False or None, got {value!r}")


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def rows(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row length) of a tensor of `shape` read by its last dim; a 0-d tensor is one row of one."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


def max_abs(t: Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0
