"""Placement pass: steer the partitioner to save the static activations compression knows.

It runs on a region's joint graph before partitioning and only writes
`node.meta["recompute"]` tags the min-cut partitioner honours; it never adds or
removes a node. Where saving one tensor or another costs the same bytes, the
min-cut breaks the tie arbitrarily: inside a region it would save a GELU's
derivative (computed in forward) instead of its input, and attention scores
instead of the probabilities. Neither is a format the paper stores, so
compress_saved would leave them fp32.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from ..torch_ir import TANGENT_PREFIX
from .compress.patterns import _is_gelu_input, _is_softmax_output
from .context import PassContext


def _closure(starts: list[fx.Node], step) -> set[fx.Node]:
    """Every node reached from `starts` by repeatedly following `step(node)`."""
    seen, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def _is_pointwise(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and torch.Tag.pointwise in node.target.tags


def place_static_saves(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Tag softmax outputs MUST_SAVE, and the backward-only pointwise work on a
    GELU's input (its derivative) MUST_RECOMPUTE, so the forward saves the
    probabilities and the GELU input, which compress_saved stores 8/4-bit."""
    graph = gm.graph
    tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith(TANGENT_PREFIX)]
    from_tangents = _closure(tangents, lambda n: n.users)
    outputs = [o for o in graph.output_node().args[0] if isinstance(o, fx.Node)]
    forward_outputs = [o for o in outputs if o not in from_tangents]
    forward = _closure(forward_outputs, lambda n: n.all_input_nodes)
    for node in graph.nodes:
        if node.op != "call_function" or node not in forward:
            continue
        if _is_softmax_output(node) and node.target != torch.ops.aten.where.self:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            node.meta.setdefault("slimfit", {})["place_static_saves"] = "must save"
            ctx.counters["placed_softmax_saves"] += 1
        elif _is_gelu_input(node):
            todo = list(node.users)
            marked = 0
            while todo:
                user = todo.pop()
                if user in forward or user in from_tangents or not _is_pointwise(user) \
                        or user.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE:
                    continue
                user.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                marked += 1
                todo.extend(user.users)
            if marked:
                ctx.counters["placed_gelu_input_saves"] += 1
    return gm


__all__ = ["place_static_saves"]
