"""slimfit's graph passes, in the order they run.

JOINT_PASSES rewrite AOTAutograd's joint forward+backward graph of a region
before the partitioner decides what forward saves for backward (none today:
a region's layer weights enter detached, so its joint graph computes no weight
gradient to cut; see regions.tap_weight_grads). PARTITION_PASSES rewrite the
(forward, backward) pair it made, so the min-cut cannot save a tensor's
full-precision form next to its compressed one.
"""
from __future__ import annotations

from .compress import compress_saved
from .context import PassContext

JOINT_PASSES: tuple = ()
PARTITION_PASSES = (compress_saved,)


__all__ = ["JOINT_PASSES", "PARTITION_PASSES", "PassContext", "compress_saved"]
