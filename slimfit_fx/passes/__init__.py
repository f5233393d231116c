"""slimfit's graph passes, in the order they run.

JOINT_PASSES rewrite AOTAutograd's joint forward+backward graph before the
partitioner decides what forward saves for backward.
"""
from __future__ import annotations

from torch import fx

from .context import PassContext
from .freeze import cut_frozen_grads

JOINT_PASSES = (cut_frozen_grads,)


def run_joint_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for joint_pass in JOINT_PASSES:
        gm = joint_pass(gm, ctx)
    return gm


__all__ = ["JOINT_PASSES", "PassContext", "cut_frozen_grads", "run_joint_passes"]
