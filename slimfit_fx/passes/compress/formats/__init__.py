"""Every format a tensor slimfit_fx keeps for backward is stored in, by name:
the activations compress_saved packs in graphs and the inputs kept for
trainable layers' weight gradients (engine.StepInProgress.stash) alike. A kind
(../registry.py) names its format; a new format is one module here (a
base.Format subclass) plus one line in FORMATS.
"""
from __future__ import annotations

from .base import Format, Packing
from .bit_pack import BIT_PACK
from .derivative_bins import DERIVATIVE_BINS
from .fixed_point import FIXED_POINT
from .float8 import FLOAT8
from .positive_mask import POSITIVE_MASK
from .rowwise import ROWWISE
from .topk import TOPK

FORMATS: dict[str, Format] = {f.name: f for f in (
    FIXED_POINT,
    ROWWISE,
    TOPK,
    POSITIVE_MASK,
    BIT_PACK,
    DERIVATIVE_BINS,
    FLOAT8,
)}


def register(fmt: Format) -> Format:
    """Make `fmt` known by its name, for kinds to name; returns it."""
    if not isinstance(fmt, Format) or not fmt.name:
        raise TypeError(f"register takes a named formats.Format instance, got {fmt!r}")
    if FORMATS.get(fmt.name, fmt) is not fmt:
        raise ValueError(f"a format named {fmt.name!r} is already registered ({FORMATS[fmt.name]!r}); "
                         "give the new one another name")
    FORMATS[fmt.name] = fmt
    return fmt


def lookup(name: str) -> Format:
    """The format registered as `name`."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"no storage format named {name!r}; registered: {sorted(FORMATS)}. "
                       "Fix: register it with slimfit_fx.passes.compress.formats.register") from None


__all__ = ["FORMATS", "Format", "Packing", "lookup", "register"]
