"""What a pass may read about the graph it rewrites, and where it counts its work.

Passes get this context instead of the model or the runtime, so they stay pure
functions of (graph, context).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import CompressionConfig


@dataclass
class PassContext:
    """input_names[i]: canonical parameter name of graph input i, or None for
    buffers and user inputs. frozen: the frozen set this variant is built for. compression: how
    saved activations are stored (None: as they are)."""

    input_names: tuple[str | None, ...]
    frozen: frozenset[str]
    counters: Counter = field(default_factory=Counter)
    compression: "CompressionConfig | None" = None
