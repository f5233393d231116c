"""slimfit's graph passes, in the order they run.

JOINT_PASSES rewrite AOTAutograd's joint forward+backward graph before the
partitioner decides what forward saves for backward; PARTITION_PASSES rewrite
the (forward, backward) pair it made, so the min-cut cannot save a tensor's
full-precision form next to its compressed one.
"""
from __future__ import annotations

from .compress import compress_saved
from .context import PassContext
from .freeze import cut_frozen_grads

JOINT_PASSES = (cut_frozen_grads,)
PARTITION_PASSES = (compress_saved,)


__all__ = ["JOINT_PASSES", "PARTITION_PASSES", "PassContext", "compress_saved", "cut_frozen_grads"]
