"""Freeze pass: cut frozen parameters' weight-gradient work out of the joint graph.

It runs on AOTAutograd's joint forward+backward graph before partitioning, so
the partitioner no longer saves tensors that only those gradients read. It
must not touch the forward outputs or any gradient of a trainable input.
"""
from __future__ import annotations

import operator
from collections import Counter

from torch import fx

from ..errors import SlimFitError
from .context import PassContext

PASS_NAME = "cut_frozen_grads"


def _primal_placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.find_nodes(op="placeholder") if n.name.startswith("primals")]


def _has_output_mask(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.arguments and schema.arguments[-1].name == "output_mask")


def narrow_output_masks(graph: fx.Graph, counters: Counter) -> None:
    """Turn off results of multi-output backward ops (conv, norms) nobody reads.

    After the frozen weight gradient is gone, e.g. `convolution_backward` would
    still compute grad_weight unless its output_mask says otherwise.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or not _has_output_mask(node):
            continue
        mask = node.args[-1] if len(node.args) == len(node.target._schema.arguments) else None
        if mask is None:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        narrowed = [bool(keep) and i in used for i, keep in enumerate(mask)]
        if narrowed == list(mask):
            continue
        node.args = (*node.args[:-1], narrowed)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            node.meta["val"] = type(val)(v if keep else None for v, keep in zip(val, narrowed))
        node.meta.setdefault("slimfit", {})[PASS_NAME] = {
            "output_mask": (tuple(mask), tuple(narrowed))
        }
        counters["output_masks_narrowed"] += 1


def cut_frozen_grads(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace the gradient outputs of frozen parameters with None and drop dead work.

    The joint graph's outputs are the forward outputs followed by one gradient
    per primal input, in input order; `ctx.input_names` names those inputs.
    """
    graph = gm.graph
    primals = _primal_placeholders(graph)
    if len(primals) != len(ctx.input_names):
        raise SlimFitError(
            f"joint graph has {len(primals)} primal inputs but the captured graph has "
            f"{len(ctx.input_names)} inputs; this torch version lays out AOTAutograd's joint "
            "graph differently from what slimfit_fx supports"
        )
    output = graph.output_node()
    outputs = list(output.args[0])
    num_inputs = len(primals)
    forward_outputs, grads = outputs[:-num_inputs], outputs[-num_inputs:]
    cut = []
    for index, name in enumerate(ctx.input_names):
        if name is not None and name in ctx.frozen and grads[index] is not None:
            grads[index] = None
            cut.append(name)
    output.args = ((*forward_outputs, *grads),)
    output.meta.setdefault("slimfit", {})[PASS_NAME] = {"grads_cut": tuple(sorted(cut))}

    before = Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
    graph.eliminate_dead_code()
    narrow_output_masks(graph, ctx.counters)
    graph.eliminate_dead_code()
    after = Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
    removed = before - after

    ctx.counters["grads_cut"] += len(cut)
    ctx.counters["nodes_removed"] += sum(removed.values())
    ctx.counters["matmuls_removed"] += sum(
        count for target, count in removed.items() if _is_matmul(target)
    )
    gm.recompile()
    return gm


_MATMULS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.convolution", "aten.embedding_dense_backward")


def _is_matmul(target: str) -> bool:
    return target.startswith(_MATMULS)


__all__ = ["cut_frozen_grads", "narrow_output_masks", "PASS_NAME"]
