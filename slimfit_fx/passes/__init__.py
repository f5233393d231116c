"""slimfit's graph passes, in the order they run.

JOINT_PASSES rewrite AOTAutograd's joint forward+backward graph before the
partitioner decides what forward saves for backward.
"""
from __future__ import annotations

from .context import PassContext
from .freeze import cut_frozen_grads

JOINT_PASSES = (cut_frozen_grads,)


__all__ = ["JOINT_PASSES", "PassContext", "cut_frozen_grads"]
