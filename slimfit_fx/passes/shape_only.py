"""Drop saved tensors backward reads for their shape only.

A region's layer weights enter detached (regions.tap_weight_grads), so its
convolution backwards compute the input gradient alone: with output_mask[1]
False, convolution_backward reads its `input` for the shape, never the values.
Max pooling's backward reads its input for the shape too (the saved indices say
where each gradient goes). Autograd still saves those inputs (eager does too);
here the forward stops saving them and backward passes zeros of their shape
and dtype, expanded from one element. Exact: the gradient does not depend on them.
"""
from __future__ import annotations

import torch
from torch import fx

from .. import capture
from ..torch_ir import (CONVOLUTION_BACKWARD, CONVOLUTION_BACKWARD_GRAD, CONVOLUTION_BACKWARD_INPUT,
                        CONVOLUTION_BACKWARD_MASK, CONVOLUTION_BACKWARD_WEIGHT, MAX_POOL2D_BACKWARD,
                        MAX_POOL2D_BACKWARD_SELF)
from .context import PassContext

aten = torch.ops.aten


def _reads_shape_only(user: fx.Node, placeholder: fx.Node) -> str | None:
    """What `user` is if it reads `placeholder` for its shape only: "conv_input" (a
    convolution backward computing no weight gradient) or "pool_input"; else None."""
    if user.target == MAX_POOL2D_BACKWARD:
        others = [a for i, a in enumerate(user.args) if i != MAX_POOL2D_BACKWARD_SELF]
        return "pool_input" if user.args[MAX_POOL2D_BACKWARD_SELF] is placeholder \
            and placeholder not in others else None
    if user.target != CONVOLUTION_BACKWARD:
        return None
    args = user.args
    mask = args[CONVOLUTION_BACKWARD_MASK] if len(args) > CONVOLUTION_BACKWARD_MASK \
        else user.kwargs.get("output_mask")
    shape_only = args[CONVOLUTION_BACKWARD_INPUT] is placeholder and mask is not None and not mask[1] \
        and args[CONVOLUTION_BACKWARD_GRAD] is not placeholder and args[CONVOLUTION_BACKWARD_WEIGHT] is not placeholder
    return "conv_input" if shape_only else None


def drop_shape_only_saves(graphs: tuple[fx.GraphModule, fx.GraphModule], num_forward_outputs: int,
                          ctx: PassContext) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Rewrite (forward, backward) so backward reads zeros where it reads a saved
    tensor for its shape only, and the forward stops saving tensors read no other
    way; counted as dropped_shape_only_<what read it>."""
    forward, backward = graphs
    out_node = forward.graph.output_node()
    outputs = list(out_node.args[0])
    placeholders = {n.name: n for n in backward.graph.nodes if n.op == "placeholder"}
    graph = backward.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    kept = []
    saved_names = {n.name for n in outputs[num_forward_outputs:] if isinstance(n, fx.Node)}
    # dynamic shapes: sizes read from backward's SymInt inputs and gradients, never
    # from a saved tensor (this pass may drop it)
    producers = capture.size_producers([p for name, p in placeholders.items() if name not in saved_names
                                        or isinstance(p.meta.get("val"), torch.SymInt)])
    for saved in outputs[num_forward_outputs:]:
        placeholder = placeholders.get(getattr(saved, "name", None))
        val = None if placeholder is None else placeholder.meta.get("val")
        if placeholder is None or not isinstance(val, torch.Tensor) or not hasattr(val, "fake_mode") \
                or not capture.can_materialize(val.shape, producers):
            kept.append(saved)
            continue
        readers = {u: _reads_shape_only(u, placeholder) for u in placeholder.users}
        readers = {u: what for u, what in readers.items() if what is not None}
        if readers:
            with graph.inserting_before(min(readers, key=order.__getitem__)):
                # full, not zeros: inductor lowers full and rejects a graph holding aten.zeros
                zero = graph.call_function(aten.full.default, ([], 0.0), {"dtype": val.dtype, "device": val.device})
                shape = capture.materialize_sizes(graph, val.shape, producers)
                shaped = graph.call_function(aten.expand.default, (zero, shape))
            with val.fake_mode:
                zero.meta["val"] = torch.full([], 0.0, dtype=val.dtype, device=val.device)
                shaped.meta["val"] = zero.meta["val"].expand(val.shape)
            shaped.meta["slimfit"] = {"drop_shape_only_saves": f"zeros shaped like {placeholder.name}"}
            for user in readers:
                user.replace_input_with(placeholder, shaped)
        if placeholder.users or not readers:  # still read for its values (a ReLU's sign): kept
            kept.append(saved)
            continue
        graph.erase_node(placeholder)
        ctx.counters[f"dropped_shape_only_{'_'.join(sorted(set(readers.values())))}"] += 1
        ctx.counters["bytes_dropped_shape_only"] += capture.size_hint(val.numel()) * val.element_size()
    out_node.args = (tuple(outputs[:num_forward_outputs] + kept),)
    for gm in (forward, backward):
        gm.graph.lint()
        gm.recompile()
    return forward, backward


__all__ = ["drop_shape_only_saves"]
