"""compress_saved: store static activations packed, unpack them where backward reads them.

Runs after partitioning on the (forward, backward) pair: a saved tensor is
recognised by what produces or consumes it (attention Q/K/V and output, softmax output,
GELU input and output, a frozen LayerNorm's normalized input, what only a
trainable layer's weight gradient reads, and boolean dropout masks), replaced in the
forward's saved outputs by its quantized or pruned form, and unpacked in the
backward right before its first use.
The tanh output of a tanh-approximation GELU, saved next to its input, is not
kept at all: backward reruns the GELU's ops on the input as it holds it.
It never compresses primals (parameters, inputs) and never changes what the
forward returns to the user; what it skips, it counts with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx

from .. import ops
from ..config import CompressionConfig
from .context import PassContext

aten = torch.ops.aten

# The paper's power-of-two formats, and the nearest 4/8-bit one for other widths.
FIXED_POINT = {
    ("qkv", 8): ops.Q3_4_INT8, ("qkv", 4): ops.FixedPoint(4, 1, True),
    ("softmax", 8): ops.SOFTMAX_UINT8, ("softmax", 4): ops.FixedPoint(4, 4, False),
    ("gelu_input", 4): ops.GELU_INT4, ("gelu_input", 8): ops.Q3_4_INT8,
    ("gelu_output", 8): ops.Q3_4_INT8, ("gelu_output", 4): ops.FixedPoint(4, 1, True),
    # A convex combination of V's rows: V's format covers its range at V's step.
    ("attention_out", 8): ops.Q3_4_INT8, ("attention_out", 4): ops.FixedPoint(4, 1, True),
}

# q, k, v are args 1, 2, 3 of every fused attention backward; the value is the
# position of the forward's output `out` (read to form rowsum(grad_out * out)).
_ATTENTION_BACKWARD = {
    getattr(aten, name).default: out_index
    for name, out_index in (("_scaled_dot_product_flash_attention_for_cpu_backward", 4),
                            ("_scaled_dot_product_efficient_attention_backward", 5),
                            ("_scaled_dot_product_flash_attention_backward", 4),
                            ("_scaled_dot_product_cudnn_attention_backward", 4))
    if hasattr(aten, name)
}


def _reads_qkv(user: fx.Node, names: set[str]) -> bool:
    """`user` is a fused attention backward reading one of `names` as q, k or v."""
    return user.target in _ATTENTION_BACKWARD \
        and any(getattr(user.args[i], "name", None) in names for i in (1, 2, 3))


def _reads_out(user: fx.Node, names: set[str]) -> bool:
    """`user` is a fused attention backward reading one of `names` as its `out`."""
    return user.target in _ATTENTION_BACKWARD \
        and getattr(user.args[_ATTENTION_BACKWARD[user.target]], "name", None) in names


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.permute.default, aten.transpose.int, aten.t.default, aten.detach.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default}


# Ops whose output holds its input's values: views, copies and float casts. Mixed
# precision puts casts between a saved tensor and what identifies it: under
# autocast the matmul after an fp32 softmax reads a bf16 copy of the
# probabilities, and inductor's GELU decomposition upcasts a bf16 input to fp32
# before the erf (`_to_copy`, or `convert_element_type` once decomposed). Dropout
# with p=0 is a clone.
_SAME_VALUES = _VIEWS | {aten.clone.default, aten._to_copy.default,
                         torch.ops.prims.convert_element_type.default}


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _holds_same_values(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SAME_VALUES and _is_float(node) \
        and isinstance(node.args[0], fx.Node)


def _through_copies_down(node: fx.Node) -> list[fx.Node]:
    """`node` and every node reached from it through _SAME_VALUES ops only."""
    seen, stack = [], [node]
    while stack:
        n = stack.pop()
        seen.append(n)
        stack += [u for u in n.users if _holds_same_values(u)]
    return seen


def _through_copies_up(node: fx.Node) -> fx.Node:
    """The node whose values `node` holds, found up through _SAME_VALUES ops."""
    while _holds_same_values(node):
        node = node.args[0]
    return node


# The ops between a GELU's input and its erf/tanh in the decompositions below.
_GELU_ARITHMETIC = {aten.mul.Tensor, aten.add.Tensor, aten.pow.Tensor_Scalar,
                    aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def _reaches(node: fx.Node, targets: set, hops: int, through: set) -> bool:
    """Whether a `targets` op is at most `hops` uses below `node`, through `through` ops."""
    frontier = [node]
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users]
        if any(u.target in targets for u in frontier):
            return True
        # Not through matmuls or indexing: a LayerNorm output feeding a
        # Linear and then a tanh (BERT's pooler) is no GELU input.
        frontier = [u for u in frontier if u.target in through]
    return False


def _is_gelu_input(node: fx.Node) -> bool:
    # aten.gelu; its decomposition (inductor): x * 0.5 * (1 + erf(x * 0.7071...));
    # or the tanh approximation (GPT-2's gelu_new): 0.5x(1 + tanh(c(x + 0.044715x^3)))
    for n in _through_copies_down(node):
        for user in n.users:
            if user.target == aten.gelu.default:
                return True
            if user.target in (aten.mul.Tensor, aten.pow.Tensor_Scalar) and _reaches(
                    user, {aten.erf.default, aten.tanh.default}, 5, _GELU_ARITHMETIC):
                return True
    return False


def _is_gelu_output(node: fx.Node) -> bool:
    # aten.gelu, or the last mul of the erf decomposition: (0.5x) * (1 + erf(...)).
    # Not the tanh approximation's (GPT-2's gelu_new): on tiny GPT-2 its outputs sit
    # near Q3.4's step of 1/16 and gradient cosine fell from 0.9996 to 0.990 with it
    # stored so; "extended" stores it as a weight input, with a per-row scale.
    root = _through_copies_up(node)
    if root.target == aten.gelu.default:
        return True
    return root.target == aten.mul.Tensor and any(
        isinstance(a, fx.Node) and a.target == aten.add.Tensor
        and any(isinstance(b, fx.Node) and b.target == aten.erf.default for b in a.args)
        for a in root.args)


def _pointwise_from_saved(node: fx.Node, saved: dict[str, fx.Node], ops: set,
                          limit: int = 12) -> tuple[set[fx.Node], list[fx.Node]] | None:
    """If `node` is computed from other `saved` tensors by `ops` alone: those saved
    tensors and the ops from them to `node`, in graph order; else None."""
    chain, stack, inputs = [], [node], set()
    while stack:
        n = stack.pop()
        if n in chain:
            continue
        chain.append(n)
        if len(chain) > limit:
            return None
        for a in n.all_input_nodes:
            if a.name in saved and a is not node:
                inputs.add(a)
            elif a.op == "call_function" and a.target in ops:
                stack.append(a)
            else:
                return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return inputs, sorted(chain, key=order.__getitem__)


def _gelu_tanh_recompute(node: fx.Node, saved: dict[str, fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """For t = tanh(c * (x + 0.044715 x^3)) of a tanh-approximation GELU written out
    in aten ops (GPT-2's gelu_new; aot_eager saves t for tanh's backward), the
    GELU input x, itself among `saved`, and the ops from x to t in graph order:
    backward can rebuild t from x instead of keeping it."""
    if _through_copies_up(node).target != aten.tanh.default:
        return None
    # the decompositions have 6 ops and a copy or two
    found = _pointwise_from_saved(node, saved, _GELU_ARITHMETIC | _SAME_VALUES | {aten.tanh.default})
    if found is None or len(found[0]) != 1:
        return None
    (x,), chain = found
    return (x, chain) if _is_gelu_input(x) else None


def _decomposed_dropout_recompute(node: fx.Node, saved: dict[str, fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Attention probabilities after a decomposed dropout (inductor: P * mask * 1/(1-p)
    with a bool mask), P and the mask both saved: ([P, mask], the ops from them to
    `node`): backward rebuilds them instead of keeping them."""
    if _through_copies_up(node).target != aten.mul.Tensor:
        return None
    found = _pointwise_from_saved(node, saved, _SAME_VALUES | {aten.mul.Tensor}, limit=8)
    if found is None or len(found[0]) != 2:
        return None
    inputs, chain = found
    masks = [n for n in inputs if n.meta["val"].dtype == torch.bool]
    probabilities = [n for n in inputs if _is_float(n) and _is_softmax_output(n)]
    if len(masks) != 1 or len(probabilities) != 1:
        return None
    return [probabilities[0], masks[0]], chain


# _safe_softmax: scaled_dot_product_attention's math path (attention dropout > 0 on CPU)
_SOFTMAXES = {aten._softmax.default, *([aten._safe_softmax.default] if hasattr(aten, "_safe_softmax") else [])}


def _is_softmax_output(node: fx.Node) -> bool:
    root = _through_copies_up(node)
    if root.target in _SOFTMAXES:
        return True
    if root.target == aten.where.self:  # _safe_softmax decomposed: where(row all masked, 0, softmax)
        return any(isinstance(a, fx.Node) and _is_softmax_output(a) for a in root.args[1:])
    return root.target == aten.div.Tensor and isinstance(root.args[0], fx.Node) \
        and root.args[0].target == aten.exp.default


def _dropout_of(node: fx.Node) -> fx.Node | None:
    """The native_dropout call whose output (getitem 0) `node` holds, through copies."""
    root = _through_copies_up(node)
    if root.target is operator.getitem and root.args[1] == 0 and isinstance(root.args[0], fx.Node) \
            and root.args[0].target == aten.native_dropout.default:
        return root.args[0]
    return None


def _holds_probabilities(node: fx.Node) -> bool:
    """Softmax output, or its dropout (attention dropout; decomposed, a product of
    the probabilities with a mask and 1/(1-p)), through copies."""
    dropout = _dropout_of(node)
    if dropout is not None:
        return _is_softmax_output(dropout.args[0])
    root = _through_copies_up(node)
    if root.target == aten.mul.Tensor:
        return any(isinstance(a, fx.Node) and _is_float(a) and _holds_probabilities(a) for a in root.args)
    return _is_softmax_output(node)


_MATMULS = {aten.bmm.default, aten.mm.default}
# Between Q @ K^T and its softmax: scaling, the additive mask, views and casts.
_SCORE_ARITHMETIC = _SAME_VALUES | {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor}


def _is_attention_operand(node: fx.Node) -> bool:
    """Q, K or V of attention written out as matmuls (eager attention, or fused
    attention's math path): an operand of a matmul whose product reaches a softmax
    (Q, K), or whose other operand holds the probabilities (V). Both operands of
    such a matmul are activations: a matmul with a weight (a graph input) is a
    layer, such as a classifier or LM head whose logits reach a log-softmax."""
    for n in _through_copies_down(_through_copies_up(node)):
        for user in n.users:
            if user.target not in _MATMULS:
                continue
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not n]
            if any(_view_root(_through_copies_up(a)).op == "placeholder" for a in (n, *others)):
                continue
            # amax: the first op of a decomposed softmax (inductor)
            if any(_holds_probabilities(o) for o in others) \
                    or _reaches(user, _SOFTMAXES | {aten.amax.default}, 6, _SCORE_ARITHMETIC):
                return True
    return False


def _dropped_probabilities(node: fx.Node, saved: dict[str, fx.Node]) -> list[fx.Node] | None:
    """For attention probabilities after dropout, P * mask / (1 - p), with P and
    the mask both saved too: [P's saved node, the mask's saved node]. Backward
    rebuilds them as native_dropout_backward(P, mask, scale)."""
    dropout = _dropout_of(node)
    if dropout is None or not _is_softmax_output(dropout.args[0]):
        return None
    probabilities = _through_copies_up(dropout.args[0])
    sources = {}
    for s in saved.values():
        root = _through_copies_up(s)
        if root is probabilities and s.meta["val"].shape == probabilities.meta["val"].shape:
            sources.setdefault("p", s)
        elif root.target is operator.getitem and root.args[0] is dropout and root.args[1] == 1 \
                and s.meta["val"].shape == root.meta["val"].shape:
            sources.setdefault("mask", s)
    if len(sources) != 2:
        return None
    return [sources["p"], sources["mask"]]


def _is_rsqrt(node) -> bool:
    return isinstance(node, fx.Node) and node.target == aten.rsqrt.default


def _layernorm_xhat_weight(node: fx.Node) -> str | None:
    """For x_hat = (x - mean) * rsqrt(var + eps) of a decomposed LayerNorm, the
    name of the graph input its `mul` user scales it by (the LayerNorm's weight)."""
    if node.target != aten.mul.Tensor or not any(_is_rsqrt(a) for a in node.args):
        return None
    centred = next(a for a in node.args if not _is_rsqrt(a))
    if not (isinstance(centred, fx.Node) and centred.target == aten.sub.Tensor):
        return None
    for user in node.users:
        if user.target == aten.mul.Tensor:
            for a in user.args:
                if a is not node and isinstance(a, fx.Node) and a.op == "placeholder":
                    return a.name
    return None


def _layernorm_input_weight(placeholder: fx.Node) -> str | None:
    """Backward reads this saved tensor only as the input of one
    native_layer_norm_backward (undecomposed graphs: aot_eager): its weight's name."""
    users = list(placeholder.users)
    if len(users) == 1 and users[0].target == aten.native_layer_norm_backward.default \
            and users[0].args[1] is placeholder and isinstance(users[0].args[5], fx.Node):
        return users[0].args[5].name
    return None


_WEIGHT_GRAD_MATMULS = {aten.mm.default, aten.bmm.default}


def _returned_as_is(node: fx.Node) -> bool:
    """`node`'s values reach nothing but the graph's output, through copies only."""
    return all(u.op == "output" or _holds_same_values(u)
               for n in _through_copies_down(node) for u in n.users)


def _read_for_weight_gradients(placeholder: fx.Node) -> bool:
    """Backward reads this saved tensor (through copies) only as a matmul operand
    whose product is returned as is, a weight gradient (x^T @ grad_y of a Linear),
    and perhaps as the `out` a fused attention backward reads."""
    copies = _through_copies_down(placeholder)
    names = {n.name for n in copies}
    readers = [u for n in copies for u in n.users if not _holds_same_values(u)]
    return bool(readers) and any(u.target in _WEIGHT_GRAD_MATMULS for u in readers) and all(
        (u.target in _WEIGHT_GRAD_MATMULS and _returned_as_is(u))
        or (_reads_out(u, names) and not _reads_qkv(u, names))
        for u in readers)


def classify_saved(node: fx.Node, backward_users: list[fx.Node],
                   frozen_primals: set[str] = frozenset(), placeholder: fx.Node | None = None,
                   trainable_primals: set[str] = frozenset()) -> list[str]:
    """Which kinds of saved activation a forward node is, most specific first
    (a trainable FFN output dense's input is both gelu_output and weight_input)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        return ["mask"]  # a dropout mask: stored bit-packed, whatever reads it
    kinds = []
    weight = _layernorm_xhat_weight(node)
    ln_input_weight = _layernorm_input_weight(placeholder) if placeholder is not None else None
    if weight in frozen_primals:
        kinds.append("layernorm")
    if ln_input_weight in frozen_primals:
        kinds.append("layernorm_input")
    if backward_users and all(_reads_qkv(u, {node.name}) for u in backward_users):
        kinds.append("qkv")
    elif _is_attention_operand(node) and not _holds_probabilities(node):
        kinds.append("qkv")
    if backward_users and all(_reads_out(u, {node.name}) for u in backward_users):
        kinds.append("attention_out")
    if _is_softmax_output(node):
        kinds.append("softmax")
    if _is_gelu_input(node):
        kinds.append("gelu_input")
    if _is_gelu_output(node):
        kinds.append("gelu_output")
    # A trainable LayerNorm's normalized input: its weight gradient reads it
    # (and so does its input gradient, as for a frozen one).
    if weight in trainable_primals:
        kinds.append("weight_input")
    if ln_input_weight in trainable_primals:
        kinds.append("weight_input_layernorm_input")
    if placeholder is not None and _read_for_weight_gradients(placeholder):
        kinds.append("weight_input")
    return kinds


@dataclass(frozen=True)
class Format:
    """How one kind of saved tensor is stored: a quantize op and its mirror."""

    quantize_op: object
    quantize_args: tuple
    dequantize_op: object
    dequantize_args: tuple
    text: str

    def describe(self) -> str:
        return self.text


def format_for(config: CompressionConfig, kind: str, val: torch.Tensor | None = None) -> Format | None:
    """How `kind` is stored under `config`; `val` (the saved tensor's fake value)
    sizes the prune indices: int16 when its rows are static and short enough."""
    if kind == "mask":
        return Format(torch.ops.slimfit.pack_bits.default, (), torch.ops.slimfit.unpack_bits.default, (),
                      "1 bit per element") if config.pack_masks else None
    if kind == "weight_input_layernorm_input":
        kind = "weight_input"
    if kind in ("layernorm", "layernorm_input"):
        keep = config.layernorm_keep
        if keep is None:
            return None
        row = val.shape[-1] if val is not None and val.dim() else None
        index_bits = ops.index_bits_for(row) if isinstance(row, int) else 32
        return Format(torch.ops.slimfit.prune_topk.default, (float(keep), index_bits),
                      torch.ops.slimfit.unprune_topk.default, (),
                      f"top {keep:.0%} per row of x_hat, int{index_bits} indices")
    bits = config.bits_for(kind)
    if bits is None:
        return None
    if config.scale == "row" or kind == "weight_input":  # no fixed step fits every layer's input
        return Format(torch.ops.slimfit.quantize_rowwise.default, (bits,),
                      torch.ops.slimfit.dequantize_rowwise.default, (bits,), f"{bits}-bit, per-row scale")
    fixed = FIXED_POINT[kind, bits]
    args = (fixed.bits, fixed.frac_bits, fixed.signed)
    sign = "int" if fixed.signed else "uint"
    return Format(torch.ops.slimfit.quantize_fixed.default, args,
                  torch.ops.slimfit.dequantize_fixed.default, args,
                  f"{sign}{bits} fixed point, step 2^-{fixed.frac_bits}")


def _first_format(config: CompressionConfig, kinds: list[str], val) -> tuple[str | None, Format | None]:
    """The first of `kinds` that `config` stores compressed, with its format."""
    for kind in kinds:
        fmt = format_for(config, kind, val)
        if fmt is not None:
            return kind, fmt
    return (kinds[0] if kinds else None), None


def _fake(fn, *args, **kwargs):
    vals = fx.map_arg(args, lambda a: a.meta["val"])
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"))
    with mode:
        return fn(*vals, **fx.map_arg(kwargs, lambda a: a.meta["val"]))


def _view_root(node: fx.Node) -> fx.Node:
    """The node whose storage `node` views (itself if it is no view)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


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
    if not all(isinstance(d, int) for d in val.shape):
        return "dynamic_shape"
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
    # How backward reads each saved tensor after the rewrite: its packed form, or as is.
    packed_inputs: dict[str, tuple[list[fx.Node], Format]] = {}
    kept: dict[str, fx.Node] = {}
    recomputed = []
    new_saved: list[object] = []
    for saved in outputs[num_forward_outputs:]:
        placeholder = placeholders.get(getattr(saved, "name", None))
        if not isinstance(saved, fx.Node) or placeholder is None:
            new_saved.append(saved)
            continue
        plan = _rebuild_plan(saved, saved_nodes)
        if plan is not None and all(n.name in placeholders for n in plan.sources) \
                and placeholder.users and _skip_reason(saved, user_outputs, resident) is None:
            recomputed.append((saved, placeholder, plan))  # no longer saved
            continue
        kinds = classify_saved(saved, list(placeholder.users), frozen_primals, placeholder,
                               trainable_primals)
        kind, fmt = _first_format(config, kinds, saved.meta.get("val"))
        reason = _skip_reason(saved, user_outputs, resident) if fmt else None
        if fmt is None or reason is not None or not placeholder.users:
            if fmt is not None and reason is not None:
                ctx.counters[f"skipped_{kind}_{reason}"] += 1
            new_saved.append(saved)
            kept[saved.name] = placeholder
            continue
        first_use = min(placeholder.users, key=order.__getitem__)
        if kind in ("layernorm_input", "weight_input_layernorm_input"):
            packed = _pack(forward, _normalized(forward, saved), fmt)
            _unpack(backward, placeholder, packed, fmt, first_use,
                    finish=lambda x_hat: _denormalized(backward, x_hat, first_use))
        else:
            packed = _pack(forward, saved, fmt)
            packed_inputs[saved.name] = (_unpack(backward, placeholder, packed, fmt, first_use), fmt)
        new_saved += packed
        before = saved.meta["val"].numel() * saved.meta["val"].element_size()
        after = sum(ops.compressed_nbytes(p.meta["val"]) for p in packed)
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
                 kept, packed_inputs)
        ctx.counters[f"recomputed_{plan.kind}"] += 1
        ctx.counters["bytes_recomputed"] += saved.meta["val"].numel() * saved.meta["val"].element_size()
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


class _Rebuild(NamedTuple):
    """How backward rebuilds a saved tensor from other saved tensors (`sources`)."""

    kind: str
    sources: list[fx.Node]
    chain: list[fx.Node]  # forward ops to rerun in graph order, on the sources or on...
    dropout_output: fx.Node | None = None  # ...native_dropout's output, rebuilt from [P, mask]


def _rebuild_plan(saved: fx.Node, saved_nodes: dict[str, fx.Node]) -> _Rebuild | None:
    """How backward can rebuild `saved` instead of keeping it, or None."""
    tanh = _gelu_tanh_recompute(saved, saved_nodes)
    if tanh is not None:
        x, chain = tanh
        return _Rebuild("gelu_tanh", [x], chain)
    decomposed = _decomposed_dropout_recompute(saved, saved_nodes)
    if decomposed is not None:
        return _Rebuild("attention_dropout", *decomposed)
    dropped = _dropped_probabilities(saved, saved_nodes)
    if dropped is not None:
        copies = []
        node = saved
        while node.target is not operator.getitem:  # the copies between dropout and `saved`
            copies.append(node)
            node = node.args[0]
        return _Rebuild("attention_dropout", dropped, copies[::-1], dropout_output=node)
    return None


def _rebuild(backward: fx.GraphModule, placeholder: fx.Node, plan: _Rebuild, first_use: fx.Node,
             kept: dict[str, fx.Node], packed: dict[str, tuple[list[fx.Node], Format]]) -> None:
    """Replace the saved `placeholder` by a rebuild from `plan.sources` as backward
    holds them (unpacked from their packed form, or kept): dropped attention
    probabilities as native_dropout_backward(P, mask, 1 / (1 - p)), then
    `plan.chain`, forward ops rerun on those values."""
    graph = backward.graph
    with graph.inserting_before(first_use):
        values = []
        for source in plan.sources:
            if source.name in packed:
                inputs, fmt = packed[source.name]
                values.append(_dequantize(graph, inputs, fmt, source.meta["val"]))
            elif source.name in kept:
                values.append(kept[source.name])
            else:
                raise AssertionError(f"compress_saved: {source.name} is neither packed nor kept")
        if plan.dropout_output is not None:
            probabilities, mask = values
            p = plan.dropout_output.args[0].args[1]  # native_dropout(input, p, train)
            env = {plan.dropout_output: _call(graph, aten.native_dropout_backward.default,
                                              probabilities, mask, 1.0 / (1.0 - p))}
        else:  # the chain reads the sources themselves
            env = dict(zip(plan.sources, values))
        for n in plan.chain:
            env[n] = _call(graph, n.target, *fx.map_arg(n.args, env.__getitem__),
                           **fx.map_arg(n.kwargs, env.__getitem__))
    value = env[plan.chain[-1]] if plan.chain else next(iter(env.values()))
    value.meta["slimfit"] = {"compress_saved": f"rebuild {placeholder.name} from "
                                               f"{', '.join(s.name for s in plan.sources)}"}
    placeholder.replace_all_uses_with(value)
    graph.erase_node(placeholder)


def _dequantize(graph: fx.Graph, inputs: list[fx.Node], fmt: Format, val: torch.Tensor) -> fx.Node:
    """A dequantize call rebuilding a tensor shaped and typed like `val` from its packed parts."""
    return _call(graph, fmt.dequantize_op, *inputs, *fmt.dequantize_args, list(val.shape), val.dtype)


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
    mean, rstd = first_use.args[3], first_use.args[4]
    graph = backward.graph
    with graph.inserting_before(first_use):
        scaled = _call(graph, aten.div.Tensor, x_hat, rstd)
        return _call(graph, aten.add.Tensor, scaled, mean)


def _unpack(backward: fx.GraphModule, placeholder: fx.Node, packed: list[fx.Node], fmt,
            first_use: fx.Node, finish=None) -> list[fx.Node]:
    graph = backward.graph
    val = placeholder.meta["val"]
    new_inputs = []
    with graph.inserting_before(placeholder):
        for i, p in enumerate(packed):
            node = graph.placeholder(f"{placeholder.name}_packed{i}")
            node.meta["val"] = p.meta["val"]
            new_inputs.append(node)
    with graph.inserting_before(first_use):
        unpacked = _dequantize(graph, new_inputs, fmt, val)
    unpacked.meta["slimfit"] = {"compress_saved": f"unpack {placeholder.name} ({fmt.describe()})"}
    if finish is not None:
        unpacked = finish(unpacked)
    placeholder.replace_all_uses_with(unpacked)
    graph.erase_node(placeholder)
    return new_inputs
