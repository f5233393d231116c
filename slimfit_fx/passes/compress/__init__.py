"""Compress static activations: recognise them (patterns.py, recompute.py), pick
their format (registry.py, one entry per kind) and rewrite the partitioned
graphs to save them packed (rewrite.py). A new kind is one matcher in
patterns.MATCHERS plus one registry entry.
"""
from __future__ import annotations

from .patterns import MATCHERS, Site, classify_saved
from .registry import KINDS, Format, Kind, format_for
from .rewrite import compress_saved

__all__ = ["KINDS", "MATCHERS", "Format", "Kind", "Site", "classify_saved", "compress_saved", "format_for"]
