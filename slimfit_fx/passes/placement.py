"""Placement pass: steer the partitioner to save the static activations compression knows.

It runs on a region's joint graph before partitioning and only writes
`node.meta["recompute"]` tags the min-cut partitioner honours; it never adds or
removes a node. Where saving one tensor or another costs the same bytes, the
min-cut breaks the tie arbitrarily: inside a region it would save a GELU's
derivative (computed in forward) instead of its input, and attention scores
instead of the probabilities. Neither is a format the paper stores, so
compress_saved would leave them fp32.

It also tags a loss head's logits over a vocabulary (a matmul at least twice as
wide as its input, whose output reaches a log-softmax) MUST_RECOMPUTE, so the
forward saves the head's input instead of the log-softmax over the vocabulary
(the largest tensor a language model saves: 125 MiB fp32 for 32000 words at
bs 8, seq 128) and backward reruns the head's matmul. Exact: the same ops on the
same values; it costs that matmul again.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from ..torch_ir import TANGENT_PREFIX, is_aten_op
from .compress.patterns import _LINEAR_OUTPUTS, _is_gelu_input, _is_softmax_output, _numel
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
    return is_aten_op(node) and torch.Tag.pointwise in node.target.tags


# How far below the head's matmul its log-softmax may sit: views, the tap's probe
# add, a cast to fp32, and HF's reshape for the loss.
_HEAD_HOPS = 8


def _is_log_softmax(node: fx.Node) -> bool:
    """aten._log_softmax, or its decomposition's log(sum(exp(x - amax)))."""
    if node.target == torch.ops.aten._log_softmax.default:
        return True
    if node.target != torch.ops.aten.log.default or not isinstance(node.args[0], fx.Node):
        return False
    total = node.args[0]
    return total.target == torch.ops.aten.sum.dim_IntList and isinstance(total.args[0], fx.Node) \
        and total.args[0].target == torch.ops.aten.exp.default


def _vocabulary_logits(node: fx.Node, forward: set[fx.Node]) -> list[fx.Node]:
    """If `node` is a loss head's matmul over a vocabulary, it and every forward node
    below it holding as many elements (the logits, their views and casts, the
    log-softmax); else []."""
    if node.target not in _LINEAR_OUTPUTS:
        return []
    size, operand = _numel(node), node.args[-2] if node.target == torch.ops.aten.addmm.default else node.args[0]
    if size is None or not isinstance(operand, fx.Node) or (_numel(operand) or size) * 2 > size:
        return []
    below, wide, frontier, widest = [node], [node], [node], [node]
    for _ in range(_HEAD_HOPS):
        frontier = [u for n in frontier for u in n.users if u in forward and u.op == "call_function"]
        widest = [u for n in widest for u in n.users if u in forward and u.op == "call_function"
                  and _numel(u) == size]
        below += frontier
        wide += widest
    reaches = any(_is_log_softmax(n) for n in below)
    return list(dict.fromkeys(wide)) if reaches else []


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
        if "ac_graph_id" in node.meta:
            continue  # inside the user's activation checkpoint: recomputed, as they asked
        logits = _vocabulary_logits(node, forward)
        if logits:
            for each in logits:
                each.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                each.meta.setdefault("slimfit", {})["place_static_saves"] = "recompute the loss head"
            ctx.counters["placed_loss_head_recomputes"] += 1
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
