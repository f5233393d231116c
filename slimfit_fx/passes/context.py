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
    buffers and user inputs. frozen: the parameters whose gradients this graph does
    not compute (layer weights, whose gradients are tapped out of it, and
    parameters with requires_grad=False). compression: how saved activations are
    stored (None: as they are)."""

    input_names: tuple[str | None, ...]
    frozen: frozenset[str]
    counters: Counter = field(default_factory=Counter)
    compression: "CompressionConfig | None" = None
    # The forward's last `stashed_outputs` user outputs are layer inputs handed
    # out for weight gradients (regions.tap_weight_grads), kept only while their
    # layer trains: not outputs the user holds, so they do not stop packing.
    stashed_outputs: int = 0
    # Input positions that carry activations from an earlier region (not resident
    # like parameters and model inputs, so worth packing); None: every input is resident.
    activation_inputs: frozenset[int] | None = None
    # Whether the graph is one of the model's repeated blocks (False: the regions
    # between them, such as the embedding or the final norm and head).
    in_block: bool = True
