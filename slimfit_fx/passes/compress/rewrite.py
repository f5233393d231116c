"""compress_saved: store static activations packed, unpack them where backward reads them.

Runs after partitioning on the (forward, backward) pair. Each saved tensor gets
the kinds patterns.py recognises; the first one its config compresses
(registry.py, formats/) decides the format; the forward saves the packed form instead and
the backward unpacks it right before its first use. Saved tensors recompute.py
can rebuild are dropped and rebuilt in backward. It never compresses primals
(parameters, inputs) and never changes what the forward returns to the user;
what it skips, it counts with the reason.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ... import capture, ops
from ...torch_ir import DROPOUT_P, LAYER_NORM_BACKWARD_MEAN, LAYER_NORM_BACKWARD_RSTD
from ..context import PassContext
from .patterns import Site, _numel, _through_copies_up, _view_root, classify_saved, norm_has_bypass
from .recompute import Rebuild, rebuild_plan
from .formats import Packing, lookup
from .registry import BY_NAME, first_format

aten = torch.ops.aten


def _fake(fn, *args, **kwargs):
    vals = fx.map_arg(args, lambda a: a.meta["val"])
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"))
    with mode:
        return fn(*vals, **fx.map_arg(kwargs, lambda a: a.meta["val"]))


def _op_name(node: fx.Node) -> str:
    root = _through_copies_up(node)
    if root.op != "call_function":
        return "input"
    return getattr(root.target, "__name__", str(root.target)).split(".")[0]


def _guard_norms(kinds: list[str], site: Site, config, ctx: PassContext) -> list[str]:
    """`kinds` less the norm prunings config.norm_guard keeps whole here, each
    counted as kept_whole_<kind>_<why> (see CompressionConfig.norm_guard)."""
    pruned = [k for k in kinds if lookup(BY_NAME[k].format).prunes]
    if not pruned or config.norm_guard == "none" or getattr(config, BY_NAME[pruned[0]].field) is None:
        return kinds
    if first_format(config, kinds, site.node.meta.get("val"))[0] not in pruned:
        return kinds  # a kind ahead of the pruning stores it whole-shaped (layernorm_bits)
    if not ctx.in_block:
        why = "outside_blocks"
    elif config.norm_guard == "bypass" and not norm_has_bypass(site):
        why = "no_bypass"
    else:
        return kinds
    ctx.counters[f"kept_whole_{pruned[0]}_{why}"] += 1
    return [k for k in kinds if k not in pruned]


def _skip_reason(node: fx.Node, user_outputs: set[str], resident: set[str] | None = None) -> str | None:
    """Why `node` is saved as it is; `user_outputs` are the view roots of what the
    forward returns to the user (held anyway, so a packed copy would only add bytes)."""
    val = node.meta.get("val")
    root = _view_root(node)
    # a parameter or model input (or a view of one) is resident; an activation an
    # earlier region handed in is not (`resident`: the resident placeholders' names)
    if root.op == "placeholder" and (resident is None or root.name in resident):
        return "primal"
    if _view_root(node).name in user_outputs:
        return "also_returned"
    if not isinstance(val, torch.Tensor) or not (val.dtype.is_floating_point or val.dtype == torch.bool):
        return "not_float"
    return None


def compress_saved(graphs: tuple[fx.GraphModule, fx.GraphModule], num_forward_outputs: int,
                   ctx: PassContext) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Rewrite `graphs` = (forward, backward) so chosen saved tensors travel packed."""
    forward, backward = graphs
    config = ctx.compression
    if config is None or not config.enabled:
        return forward, backward
    out_node = forward.graph.output_node()
    outputs = list(out_node.args[0])
    returned = outputs[:num_forward_outputs - ctx.stashed_outputs]
    user_outputs = {_view_root(n).name for n in returned if isinstance(n, fx.Node)}
    placeholders = {n.name: n for n in backward.graph.nodes if n.op == "placeholder"}
    order = {n: i for i, n in enumerate(backward.graph.nodes)}
    primals = [n for n in forward.graph.nodes if n.op == "placeholder"]
    resident = None if ctx.activation_inputs is None else {
        p.name for i, p in enumerate(primals) if i not in ctx.activation_inputs}
    named = list(zip(primals, ctx.input_names)) if len(primals) >= len(ctx.input_names) else []
    frozen_primals = {p.name for p, name in named if name in ctx.frozen}
    trainable_primals = {p.name for p, name in named if name is not None and name not in ctx.frozen}
    saved_nodes = {n.name: n for n in outputs[num_forward_outputs:] if isinstance(n, fx.Node)}
    # Where backward can read dynamo's size symbols (dynamic shapes): never from a
    # saved tensor, which this pass may replace, but from its SymInt inputs and
    # incoming gradients.
    producers = capture.size_producers([
        p for name, p in placeholders.items()
        if name not in saved_nodes or isinstance(p.meta.get("val"), torch.SymInt)])
    # How backward reads each saved tensor after the rewrite: its packed form, or as is.
    packed_inputs: dict[str, Callable[[fx.Node], fx.Node]] = {}
    # Backward inputs holding each packed forward node: a saved view or repeat of
    # a tensor already packed is read from that packed form, not saved again.
    packed_sources: dict[tuple[fx.Node, Packing], list[fx.Node]] = {}
    kept: dict[str, fx.Node] = {}
    recomputed = []
    new_saved: list[object] = []
    for saved in outputs[num_forward_outputs:]:
        placeholder = placeholders.get(getattr(saved, "name", None))
        if not isinstance(saved, fx.Node) or placeholder is None:
            new_saved.append(saved)
            continue
        plan = rebuild_plan(saved, saved_nodes)
        if plan is not None and all(n.name in placeholders for n in plan.sources) \
                and placeholder.users and _skip_reason(saved, user_outputs, resident) is None:
            recomputed.append((saved, placeholder, plan))  # no longer saved
            continue
        site = Site(saved, placeholder, frozenset(frozen_primals), frozenset(trainable_primals))
        kinds = _guard_norms(classify_saved(site), site, config, ctx)
        kind, fmt = first_format(config, kinds, saved.meta.get("val"))
        reason = _skip_reason(saved, user_outputs, resident) if fmt else None
        if reason is None and fmt is not None and not capture.can_materialize(saved.meta["val"].shape, producers):
            reason = "dynamic_shape"
        if reason == "also_returned" and BY_NAME[kind].when_returned:
            reason = None
        if fmt is None or reason is not None or not placeholder.users:
            if fmt is not None and reason is not None:
                ctx.counters[f"skipped_{kind}_{reason}"] += 1
            elif not kinds and placeholder.users and _skip_reason(saved, user_outputs, resident) is None:
                # an activation no pattern knows: say what made it, so a tensor
                # left whole is never silent (the report lists these counters)
                ctx.counters[f"skipped_unmatched_{_op_name(saved)}"] += 1
            new_saved.append(saved)
            kept[saved.name] = placeholder
            continue
        first_use = min(placeholder.users, key=order.__getitem__)
        if fmt.stored_as == "layernorm_x_hat":
            packed = _pack(forward, _normalized(forward, saved), fmt)
            inputs = _backward_inputs(backward, placeholder, packed)
            _unpack(backward, placeholder, inputs, fmt, first_use, producers,
                    finish=lambda x_hat: _denormalized(backward, x_hat, first_use))
        else:
            source, chain = _copy_source(saved, fmt, user_outputs, resident)
            if (source, fmt) in packed_sources:  # another view of a tensor already packed
                packed, inputs = [], packed_sources[source, fmt]
            else:
                packed = _pack(forward, source, fmt)
                inputs = packed_sources[source, fmt] = _backward_inputs(backward, placeholder, packed)
            packed_inputs[saved.name] = read = _reader(backward.graph, inputs, fmt, source, chain, producers)
            unpacked = read(first_use)
            unpacked.meta["slimfit"] = {"compress_saved": f"unpack {placeholder.name} ({fmt.describe()})"}
            placeholder.replace_all_uses_with(unpacked)
            backward.graph.erase_node(placeholder)
        new_saved += packed
        # counted at the sizes traced (a dynamic shape's counters stay numbers)
        before = _numel(saved) * saved.meta["val"].element_size()
        after = sum(capture.size_hint(ops.compressed_nbytes(p.meta["val"])) for p in packed)
        tag = {"kind": kind, "format": fmt.describe(), "from": saved.name,
               "bytes_before": before, "bytes_after": after}
        for p in packed:
            p.meta.setdefault("slimfit", {})["compress_saved"] = tag
        ctx.counters["tensors_compressed"] += 1
        ctx.counters[f"compressed_{kind}"] += 1
        ctx.counters["bytes_before_compression"] += before
        ctx.counters["bytes_after_compression"] += after
    for saved, placeholder, plan in recomputed:
        # the placeholder's users are the backward's own nodes, all in `order`
        _rebuild(backward, placeholder, plan, min(placeholder.users, key=order.__getitem__),
                 kept, packed_inputs, producers)
        ctx.counters[f"recomputed_{plan.kind}"] += 1
        ctx.counters["bytes_recomputed"] += _numel(saved) * saved.meta["val"].element_size()
    out_node.args = (tuple(outputs[:num_forward_outputs] + new_saved),)
    for gm in (forward, backward):
        gm.graph.lint()
        gm.recompile()
    return forward, backward


def _pack(forward: fx.GraphModule, saved: fx.Node, fmt) -> list[fx.Node]:
    graph = forward.graph
    with graph.inserting_after(saved):
        call = graph.call_function(fmt.quantize_op, (saved, *fmt.quantize_args))
    call.meta["val"] = _fake(fmt.quantize_op, saved, *fmt.quantize_args)
    call.meta["nn_module_stack"] = saved.meta.get("nn_module_stack", {})
    if not isinstance(call.meta["val"], (tuple, list)):
        return [call]
    parts = []
    with graph.inserting_after(call):
        for i, val in enumerate(call.meta["val"]):
            part = graph.call_function(operator.getitem, (call, i))
            part.meta["val"] = val
            part.meta["nn_module_stack"] = call.meta["nn_module_stack"]
            parts.append(part)
    return parts


def _call(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = _fake(target, *args, **kwargs)
    return node


def _rebuild(backward: fx.GraphModule, placeholder: fx.Node, plan: Rebuild, first_use: fx.Node,
             kept: dict[str, fx.Node], packed: dict[str, Callable[[fx.Node], fx.Node]],
             producers: dict) -> None:
    """Replace the saved `placeholder` by a rebuild from `plan.sources` as backward
    holds them (unpacked from their packed form, or kept): dropped attention
    probabilities as native_dropout_backward(P, mask, 1 / (1 - p)), then
    `plan.chain`, forward ops rerun on those values."""
    graph = backward.graph
    with graph.inserting_before(first_use):
        values = []
        for source in plan.sources:
            if source.name in packed:
                values.append(packed[source.name](first_use))
            elif source.name in kept:
                values.append(kept[source.name])
            else:
                raise AssertionError(f"compress_saved: {source.name} is neither packed nor kept")
        if plan.dropout_output is not None:
            probabilities, mask = values
            p = plan.dropout_output.args[0].args[DROPOUT_P]
            env = {plan.dropout_output: _call(graph, aten.native_dropout_backward.default,
                                              probabilities, mask, 1.0 / (1.0 - p))}
        else:  # the chain reads the sources themselves
            env = dict(zip(plan.sources, values))
        for n in plan.chain:
            read = _in_backward(graph, env, producers)
            env[n] = _call(graph, n.target, *fx.map_arg(n.args, read), **fx.map_arg(n.kwargs, read))
    value = env[plan.chain[-1]] if plan.chain else next(iter(env.values()))
    value.meta["slimfit"] = {"compress_saved": f"rebuild {placeholder.name} from "
                                               f"{', '.join(s.name for s in plan.sources)}"}
    placeholder.replace_all_uses_with(value)
    graph.erase_node(placeholder)


# Ops that copy, view or repeat values: an elementwise format commutes with them.
_COPY_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
             aten.transpose.int, aten.t.default, aten.detach.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.expand.default, aten.clone.default, aten.repeat.default}


def _copy_source(saved: fx.Node, fmt: Packing, user_outputs: set[str],
                 resident: set[str] | None) -> tuple[fx.Node, list[fx.Node]]:
    """Where to pack `saved` from: under a format stored at its copy source (fixed point), the
    tensor it views, copies or repeats (no larger than it: a grouped-query K before
    repeat_kv; the probabilities two attention-backward matmuls read as two views),
    and the ops from there to `saved` in graph order; else (saved, [])."""
    if not fmt.format.at_copy_source:
        return saved, []  # per-row scales and top-k depend on the layout
    chain, source = [], saved
    while source.op == "call_function" and source.target in _COPY_OPS \
            and source.all_input_nodes == [source.args[0]] and _numel(source.args[0]) is not None \
            and _numel(source.args[0]) <= _numel(source) \
            and source.args[0].meta["val"].dtype == source.meta["val"].dtype:
        chain.append(source)
        source = source.args[0]
    if not chain or _skip_reason(source, user_outputs, resident) is not None:
        return saved, []
    return source, chain[::-1]


def _in_backward(graph: fx.Graph, env: dict[fx.Node, fx.Node], producers: dict) -> Callable[[fx.Node], Any]:
    """How a forward op rerun in backward reads its arguments: forward values
    from `env`; a symbolic size (a view's shape, dynamic shapes) rebuilt from
    backward's own inputs."""
    def read(node: fx.Node) -> Any:
        if node in env:
            return env[node]
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and capture.can_materialize([val], producers):
            return capture.materialize_sizes(graph, [val], producers)[0]
        raise KeyError(f"compress_saved: {node.name} is not available in backward")
    return read


def _rerun(graph: fx.Graph, chain: list[fx.Node], env: dict[fx.Node, fx.Node], before: fx.Node,
           producers: dict) -> fx.Node:
    """Forward ops `chain` rerun in backward before `before`, on the values `env`
    maps their forward inputs to; the last op's new node."""
    with graph.inserting_before(before):
        for n in chain:
            read = _in_backward(graph, env, producers)
            env[n] = _call(graph, n.target, *fx.map_arg(n.args, read), **fx.map_arg(n.kwargs, read))
    return env[chain[-1]]


def _dequantize(graph: fx.Graph, inputs: list[fx.Node], fmt: Packing, val: torch.Tensor,
                producers: dict) -> fx.Node:
    """A dequantize call rebuilding a tensor shaped and typed like `val` from its
    packed parts (symbolic sizes computed from backward's inputs)."""
    shape = capture.materialize_sizes(graph, val.shape, producers)
    node = graph.call_function(fmt.dequantize_op, (*inputs, *fmt.dequantize_args, shape, val.dtype))
    node.meta["val"] = _fake(fmt.dequantize_op, *inputs, *fmt.dequantize_args, list(val.shape), val.dtype)
    return node


def _normalized(forward: fx.GraphModule, saved: fx.Node) -> fx.Node:
    """x_hat = (x - mean) * rstd for a saved LayerNorm input x, from the forward's
    own native_layer_norm statistics (added after them)."""
    norm = next(u for u in saved.users
                if u.target == aten.native_layer_norm.default and u.args[0] is saved)
    stats = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    graph = forward.graph
    for i in (1, 2):
        if i not in stats:
            with graph.inserting_after(norm):
                stats[i] = graph.call_function(operator.getitem, (norm, i))
                stats[i].meta["val"] = norm.meta["val"][i]
    with graph.inserting_after(max(stats[1], stats[2], key=lambda n: list(graph.nodes).index(n))):
        centred = _call(graph, aten.sub.Tensor, saved, stats[1])
    with graph.inserting_after(centred):
        x_hat = _call(graph, aten.mul.Tensor, centred, stats[2])
    x_hat.meta["nn_module_stack"] = saved.meta.get("nn_module_stack", {})
    return x_hat


def _denormalized(backward: fx.GraphModule, x_hat: fx.Node, first_use: fx.Node) -> fx.Node:
    """x = x_hat / rstd + mean: what native_layer_norm_backward reads as its input,
    rebuilt so that it normalizes back to the (pruned) x_hat."""
    mean, rstd = first_use.args[LAYER_NORM_BACKWARD_MEAN], first_use.args[LAYER_NORM_BACKWARD_RSTD]
    graph = backward.graph
    with graph.inserting_before(first_use):
        scaled = _call(graph, aten.div.Tensor, x_hat, rstd)
        return _call(graph, aten.add.Tensor, scaled, mean)


def _reader(graph: fx.Graph, inputs: list[fx.Node], fmt: Packing, source: fx.Node,
            chain: list[fx.Node], producers: dict) -> Callable[[fx.Node], fx.Node]:
    """What emits, before a given backward node, a saved tensor's value from the
    backward `inputs` holding its packed `source`: dequantize, then rerun `chain`."""
    def read(before: fx.Node) -> fx.Node:
        with graph.inserting_before(before):
            value = _dequantize(graph, inputs, fmt, source.meta["val"], producers)
        return _rerun(graph, chain, {source: value}, before, producers) if chain else value
    return read


def _backward_inputs(backward: fx.GraphModule, placeholder: fx.Node, packed: list[fx.Node]) -> list[fx.Node]:
    """New backward placeholders for the forward's `packed` outputs, where
    `placeholder` stands (the saved outputs and the placeholders keep one order)."""
    graph = backward.graph
    new_inputs = []
    with graph.inserting_before(placeholder):
        for i, p in enumerate(packed):
            node = graph.placeholder(f"{placeholder.name}_packed{i}")
            node.meta["val"] = p.meta["val"]
            new_inputs.append(node)
    return new_inputs


def _unpack(backward: fx.GraphModule, placeholder: fx.Node, inputs: list[fx.Node], fmt,
            first_use: fx.Node, producers: dict, finish=None, val: torch.Tensor | None = None) -> None:
    """Replace `placeholder` by `inputs` dequantized (to `val`'s shape and dtype, by
    default the placeholder's) and passed through `finish`, right before `first_use`."""
    graph = backward.graph
    val = placeholder.meta["val"] if val is None else val
    with graph.inserting_before(first_use):
        unpacked = _dequantize(graph, inputs, fmt, val, producers)
    unpacked.meta["slimfit"] = {"compress_saved": f"unpack {placeholder.name} ({fmt.describe()})"}
    if finish is not None:
        unpacked = finish(unpacked)
    placeholder.replace_all_uses_with(unpacked)
    graph.erase_node(placeholder)
