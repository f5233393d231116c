"""slimfit's graph passes, in the order they run.

JOINT_PASSES rewrite AOTAutograd's joint forward+backward graph of a region
before the partitioner decides what forward saves for backward (a region's
layer weights enter detached, so there is no weight gradient to cut there, see
regions.tap_weight_grads; what is left is steering ties in the min-cut toward
tensors compression stores). PARTITION_PASSES rewrite the
(forward, backward) pair it made, so the min-cut cannot save a tensor's
full-precision form next to its compressed one. drop_shape_only_saves runs
whatever the compression: it only removes saves backward never reads the values of.
"""
from __future__ import annotations

from .compress import compress_saved
from .context import PassContext
from .placement import place_static_saves
from .shape_only import drop_shape_only_saves

JOINT_PASSES = (place_static_saves,)
PARTITION_PASSES = (drop_shape_only_saves, compress_saved)


__all__ = ["JOINT_PASSES", "PARTITION_PASSES", "PassContext", "compress_saved", "drop_shape_only_saves", "place_static_saves"]
