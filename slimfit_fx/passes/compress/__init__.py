"""Compress static activations: recognise them (patterns.py, recompute.py), pick
their format (registry.py, one entry per kind, naming a format in formats/)
and rewrite the partitioned graphs to save them packed (rewrite.py). A new kind
is one matcher in patterns.MATCHERS plus one registry entry; a new format is
one module in formats/.
"""
from __future__ import annotations

from .formats import FORMATS, Format, Packing
from .patterns import MATCHERS, Site, classify_saved
from .registry import KINDS, Kind, format_for
from .rewrite import compress_saved

__all__ = ["FORMATS", "KINDS", "MATCHERS", "Format", "Kind", "Packing", "Site", "classify_saved",
           "compress_saved", "format_for"]
