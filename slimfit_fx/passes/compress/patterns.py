"""Recognise saved activations by what the graph computes around them.

Pure matchers over the partitioned graphs: each looks at a saved tensor's
producers in the forward and its readers in the backward, and answers whether
it is one kind of static activation (registry.py says how each kind is stored).
They never change a graph.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx

from ... import capture
from ...torch_ir import (ATTENTION_BACKWARD, BATCH_NORM_BACKWARD, BATCH_NORM_BACKWARD_INPUT,
                         DECOMPOSED_SOFTMAX_EXP, DECOMPOSED_SOFTMAX_FIRST,
                         DECOMPOSED_SOFTMAX_LAST, LAYER_NORM_BACKWARD, LAYER_NORM_BACKWARD_INPUT,
                         LAYER_NORM_BACKWARD_WEIGHT, SOFTMAXES, argument_position, is_aten_op)
from .registry import KINDS

aten = torch.ops.aten


class Site(NamedTuple):
    """A saved tensor as the matchers see it: `node` saves it in the forward,
    `placeholder` receives it in the backward; `frozen` / `trainable` are the
    forward placeholders' names of frozen and trainable layers' weights."""

    node: fx.Node
    placeholder: fx.Node | None = None
    frozen: frozenset[str] = frozenset()
    trainable: frozenset[str] = frozenset()

    @property
    def backward_users(self) -> list[fx.Node]:
        return list(self.placeholder.users) if self.placeholder is not None else []


def _reads_qkv(user: fx.Node, names: set[str]) -> bool:
    """`user` is a fused attention backward reading one of `names` as q, k or v."""
    return user.target in ATTENTION_BACKWARD \
        and any(getattr(user.args[i], "name", None) in names for i in ATTENTION_BACKWARD[user.target].qkv)


def _reads_out(user: fx.Node, names: set[str]) -> bool:
    """`user` is a fused attention backward reading one of `names` as its `out`."""
    return user.target in ATTENTION_BACKWARD \
        and getattr(user.args[ATTENTION_BACKWARD[user.target].out], "name", None) in names


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.permute.default, aten.transpose.int, aten.t.default, aten.detach.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default}


def _view_root(node: fx.Node) -> fx.Node:
    """The node whose storage `node` views (itself if it is no view)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


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


def _numel(node: fx.Node) -> int | None:
    """Elements of `node`'s value (for a dynamic shape, at the sizes it was traced
    with: patterns compare sizes to tell what a tensor is, and must add no guard
    on them), or None for a non-tensor."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    sizes = [capture.size_hint(d) for d in val.shape]
    return None if None in sizes else math.prod(sizes)


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
    # the tanh approximation (GPT-2's gelu_new): 0.5x(1 + tanh(c(x + 0.044715x^3)));
    # or quick-GELU (CLIP): x * sigmoid(1.702x)
    for n in _through_copies_down(node):
        for user in n.users:
            if user.target == aten.gelu.default:
                return True
            if user.target in (aten.mul.Tensor, aten.pow.Tensor_Scalar) and _reaches(
                    user, {aten.erf.default, aten.tanh.default, aten.sigmoid.default}, 5, _GELU_ARITHMETIC):
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


def _is_softmax_output(node: fx.Node) -> bool:
    root = _through_copies_up(node)
    if root.target in SOFTMAXES:
        return True
    if root.target == aten.where.self:  # _safe_softmax decomposed: where(row all masked, 0, softmax)
        return any(isinstance(a, fx.Node) and _is_softmax_output(a) for a in root.args[1:])
    return root.target == DECOMPOSED_SOFTMAX_LAST and isinstance(root.args[0], fx.Node) \
        and root.args[0].target == DECOMPOSED_SOFTMAX_EXP


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
# Between Q @ K^T and its softmax: scaling, the additive mask or a boolean one
# (masked_fill, decomposed to where), views and casts, and the gather that picks
# each query's relative-position scores from a query-by-position product
# (DeBERTa's disentangled attention: its c2p and p2c terms).
_SCORE_ARITHMETIC = _SAME_VALUES | {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor,
                                    aten.masked_fill.Scalar, aten.where.self, aten.gather.default}
# Ops from a query-by-position product to the softmax: gather, its transpose
# (p2c), the scale, the sum of the score terms, a view to heads, the mask.
_SCORE_HOPS = 8


def _is_attention_operand(node: fx.Node) -> bool:
    """Q, K or V of attention written out as matmuls (eager attention, or fused
    attention's math path): an operand of a matmul whose product reaches a softmax
    (Q, K, and the projected relative positions a disentangled attention's score
    terms multiply them by), or whose other operand holds the probabilities (V). Both operands of
    such a matmul are activations: a matmul with a weight (a graph input) is a
    layer, such as a classifier or LM head whose logits reach a log-softmax."""
    for user, _, others in _activation_matmuls(node):
        if any(_holds_probabilities(o) for o in others) \
                or _reaches(user, SOFTMAXES | {DECOMPOSED_SOFTMAX_FIRST}, _SCORE_HOPS, _SCORE_ARITHMETIC):
            return True
    return False


def _activation_matmuls(node: fx.Node):
    """(matmul, operand, other operands) for each matmul `node` (or a copy of it)
    is an operand of whose operands are all activations: a matmul with a graph
    input (a weight) is a layer, not attention."""
    for n in _through_copies_down(_through_copies_up(node)):
        for user in n.users:
            if user.target not in _MATMULS:
                continue
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not n]
            if any(_view_root(_through_copies_up(a)).op == "placeholder" for a in (n, *others)):
                continue
            yield user, n, others



def _scales(node: fx.Node) -> bool:
    """`node` multiplies or divides by a scalar other than 1: a number, or a 0-dim
    tensor (sqrt(d) made at run time). The math path of scaled_dot_product_attention
    multiplies Q and K by the square root of its `scale`, 1.0 for T5."""
    if node.op != "call_function" or node.target not in (aten.mul.Tensor, aten.div.Tensor,
                                                         aten.mul.Scalar, aten.div.Scalar):
        return False
    return any((not isinstance(a, fx.Node) and a != 1) or (isinstance(a, fx.Node) and isinstance(
        a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 0) for a in node.args)


def _is_unscaled_score_operand(node: fx.Node) -> bool:
    """Q or K of attention whose scores reach the softmax with no scale: neither
    the product's way to the softmax (through _SCORE_ARITHMETIC) nor either
    operand (Q pre-scaled, as BART does) multiplies or divides by a scalar."""
    for user, n, others in _activation_matmuls(node):
        seen, frontier, reached = [], [user], False
        for _ in range(_SCORE_HOPS):
            frontier = [u for f in frontier for u in f.users]
            reached = reached or any(u.target in SOFTMAXES | {DECOMPOSED_SOFTMAX_FIRST} for u in frontier)
            frontier = [u for u in frontier if u.target in _SCORE_ARITHMETIC]
            seen += frontier
        if reached and not any(_scales(s) for s in seen) \
                and not any(_scales(_through_copies_up(a)) for a in (n, *others)):
            return True
    return False


def _is_rsqrt(node) -> bool:
    return isinstance(node, fx.Node) and node.target == aten.rsqrt.default


def _weight_names(node, forward: fx.Graph | None = None) -> frozenset[str]:
    """The graph inputs a norm's weight argument is made of: itself, or w plus
    constants and the tap's probe through casts (Nemotron's and Gemma's norms
    scale by 1 + w). A backward input is looked up as the forward node saved
    under its name (`forward`: the forward graph)."""
    if not isinstance(node, fx.Node):
        return frozenset()
    if node.op == "placeholder" and forward is not None and node.graph is not forward:
        node = next((n for n in forward.nodes if n.name == node.name), None)
        if node is None:
            return frozenset()
    scale = _pointwise_ancestors(node, hops=4, through=_SAME_VALUES | {aten.add.Tensor})
    return frozenset(p.name for p in scale if p.op == "placeholder")


def _layernorm_xhat_weight(node: fx.Node) -> frozenset[str]:
    """For x_hat = (x - mean) * rsqrt(var + eps) of a decomposed LayerNorm, the
    names of the graph inputs its `mul` user scales it by (the LayerNorm's weight)."""
    if node.target != aten.mul.Tensor or not any(_is_rsqrt(a) for a in node.args):
        return frozenset()
    centred = next(a for a in node.args if not _is_rsqrt(a))
    if not (isinstance(centred, fx.Node) and centred.target == aten.sub.Tensor):
        return frozenset()
    return frozenset().union(*(_weight_names(a) for user in node.users if user.target == aten.mul.Tensor
                               for a in user.args if a is not node))


def _layernorm_input_weight(placeholder: fx.Node, forward: fx.Graph) -> frozenset[str]:
    """Backward reads this saved tensor only as the input of one
    native_layer_norm_backward (undecomposed graphs: aot_eager): the names its
    weight is made of."""
    users = list(placeholder.users)
    if len(users) == 1 and users[0].target == LAYER_NORM_BACKWARD \
            and users[0].args[LAYER_NORM_BACKWARD_INPUT] is placeholder:
        return _weight_names(users[0].args[LAYER_NORM_BACKWARD_WEIGHT], forward)
    return frozenset()


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



def _rmsnorm_weights(node: fx.Node) -> frozenset[str]:
    """For the input x of an RMSNorm written out in ops, w * (x * rsqrt(mean(x^2) + eps))
    (HF's Llama/Qwen2/Mistral/T5 norms; Gemma's scales by 1 + w): the names of the
    graph inputs the scale is made of, w among them. Empty when `node` is no such
    input, or anything but the norm reads x in a way backward needs (a residual
    add or a copy does not)."""
    copies = _through_copies_down(node)
    readers = [u for n in copies for u in n.users if not _holds_same_values(u)]
    normalized = [u for u in readers if u.target == aten.mul.Tensor and any(_is_rsqrt(a) for a in u.args)]
    squares = [u for u in readers if u.target == aten.pow.Tensor_Scalar and u.args[1] == 2]
    if len(normalized) != 1 or len(squares) != 1:
        return frozenset()
    rsqrt = next(a for a in normalized[0].args if _is_rsqrt(a))
    mean = _through_copies_up(rsqrt.args[0])
    if mean.target == aten.add.Tensor:  # + eps
        mean = _through_copies_up(mean.args[0])
    if mean.target != aten.mean.dim or _through_copies_up(mean.args[0]) is not squares[0]:
        return frozenset()
    if any(u not in normalized and u not in squares and u.op != "output" and u.target != aten.add.Tensor
           for u in readers):
        return frozenset()
    for n in _through_copies_down(normalized[0]):
        for user in n.users:
            if user.target != aten.mul.Tensor:
                continue
            for a in user.args:
                if isinstance(a, fx.Node) and a is not n:
                    # the weight, through casts and adds (Gemma's 1 + w, and the
                    # probe a region adds to that use's output)
                    scale = _pointwise_ancestors(a, hops=4, through=_SAME_VALUES | {aten.add.Tensor})
                    weights = frozenset(p.name for p in scale if p.op == "placeholder")
                    if weights:
                        return weights
    return frozenset()


# Pointwise work between a gated FFN's projections and its gate product: the
# activation (SiLU, GELU and their decompositions) and casts.
# exp: inductor's SiLU is x / (1 + exp(-x)).
_NONLINEAR = {aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.erf.default,
              aten.tanh.default, aten.relu.default, aten.exp.default}
_ACTIVATION_ARITHMETIC = _GELU_ARITHMETIC | _SAME_VALUES | _NONLINEAR | {aten.sub.Tensor, aten.div.Tensor,
                                                                       aten.neg.default}
_LINEAR_OUTPUTS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _pointwise_ancestors(node: fx.Node, hops: int = 8, through: set | None = None) -> set[fx.Node]:
    """`node` and what it is computed from by `through` ops (default
    _ACTIVATION_ARITHMETIC), up to `hops` ops up; the nodes where the walk stops
    (matmuls, inputs) included."""
    through = _ACTIVATION_ARITHMETIC if through is None else through
    seen, frontier = {node}, [node]
    for _ in range(hops):
        frontier = [a for n in frontier if n.op == "call_function" and n.target in through
                    for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _gate_product_sides(mul: fx.Node) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """For act(x @ W_gate) * (x @ W_up), a SwiGLU/GeGLU gate product: the nodes
    each factor is computed from (gate side, other side). Both factors are
    projections of their own (no shared pointwise ancestry: a GELU's own
    x * (1 + erf(x)) is no gate product), only the gate side has a nonlinearity,
    and both are the product's shape (a dropout mask is no projection)."""
    if mul.target != aten.mul.Tensor or len(mul.args) != 2 \
            or not all(isinstance(a, fx.Node) and _is_float(a) for a in mul.args):
        return None
    a, b = mul.args
    if a.meta["val"].shape != mul.meta["val"].shape or b.meta["val"].shape != mul.meta["val"].shape:
        return None
    up_a, up_b = _pointwise_ancestors(a), _pointwise_ancestors(b)
    if up_a & up_b:
        return None
    for gate, other in ((up_a, up_b), (up_b, up_a)):
        if any(n.target in _NONLINEAR for n in gate) and not any(n.target in _NONLINEAR for n in other) \
                and any(n.target in _LINEAR_OUTPUTS for n in gate) \
                and any(n.target in _LINEAR_OUTPUTS for n in other):
            return gate, other
    return None


def _is_gate_operand(node: fx.Node) -> bool:
    """`node` is one of the values a gate product is computed from: the gate's
    projection or activation, or the other projection."""
    frontier = [node]
    for _ in range(8):
        frontier = [u for n in frontier for u in n.users
                    if u.op == "call_function" and u.target in _ACTIVATION_ARITHMETIC]
        for user in frontier:
            sides = _gate_product_sides(user)
            if sides is not None and (node in sides[0] or node in sides[1]):
                return True
    return False


def _is_silu_input(node: fx.Node) -> bool:
    # aten.silu; x * sigmoid(x); or inductor's decomposition x / (1 + exp(-x))
    for n in _through_copies_down(node):
        for user in n.users:
            if user.target == aten.silu.default:
                return True
            if user.target == aten.sigmoid.default and any(
                    u.target == aten.mul.Tensor and n in u.args for u in user.users):
                return True
            if user.target == aten.neg.default and any(
                    u.target == aten.div.Tensor and u.args[0] is n and _reaches(user, {aten.div.Tensor}, 3, {
                        aten.exp.default, aten.add.Tensor}) for u in n.users):
                return True
    return False


# The ops of HF's repeat_kv (x[:, :, None].expand(...).reshape(...)) and their copies.
_REPEAT_OPS = _VIEWS | {aten.clone.default, aten.slice.Tensor}


def _repeat_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """For grouped-query K or V repeated to every query head (repeat_kv), the
    tensor before the repeat and the ops from it to `node` in graph order; None
    when `node` is no expansion of a smaller tensor."""
    chain, source = [], node
    while source.op == "call_function" and source.target in _REPEAT_OPS \
            and source.all_input_nodes == [source.args[0]]:
        chain.append(source)
        source = source.args[0]
    if not any(n.target == aten.expand.default for n in chain):
        return None
    small, big = source.meta.get("val"), node.meta.get("val")
    if not isinstance(small, torch.Tensor) or not all(isinstance(d, int) for d in (*small.shape, *big.shape)) \
            or small.numel() >= big.numel():
        return None
    return source, chain[::-1]



def norm_has_bypass(site: Site) -> bool:
    """Whether the input of the norm `site` belongs to (its saved input, or a
    decomposed LayerNorm's x_hat) also feeds an add outside the norm: a residual
    path around it (pre-LN blocks), so the gradient of what comes before does not
    pass through the norm alone."""
    x = site.node
    if _layernorm_xhat_weight(x):  # x_hat = (x - mean) * rstd
        x = next(a for a in x.args if not _is_rsqrt(a)).args[0]
    return any(u.target == aten.add.Tensor for n in _through_copies_down(x) for u in n.users)


# ---- the matchers, one per kind in registry.KINDS --------------------------------

def _frozen_layernorm(site: Site) -> bool:
    return bool(_layernorm_xhat_weight(site.node) & site.frozen)


def _frozen_layernorm_input(site: Site) -> bool:
    return site.placeholder is not None \
        and bool(_layernorm_input_weight(site.placeholder, site.node.graph) & site.frozen)


def _qkv(site: Site) -> bool:
    users = site.backward_users
    if users and all(_reads_qkv(u, {site.node.name}) for u in users):
        return True
    return _is_attention_operand(site.node) and not _holds_probabilities(site.node)


def _unscaled_fused_qk(site: Site) -> bool:
    """Backward reads this saved tensor only as fused attention backwards' Q/K/V,
    and in the forward it is Q or K of fused attentions that take scale=1.0 and
    whose Q and K were not scaled before (T5's cross-attention; OPT multiplies Q
    by 1/sqrt(d) before a fused attention with scale=1.0)."""
    users = site.backward_users
    if not users or not all(_reads_qkv(u, {site.node.name}) for u in users):
        return False
    root = _through_copies_up(site.node)
    attentions = [u for n in _through_copies_down(root) for u in n.users
                  if is_aten_op(u) and argument_position(u.target, "query") is not None
                  and argument_position(u.target, "key") is not None
                  and argument_position(u.target, "scale") is not None]
    if not attentions:
        return False
    for attention in attentions:
        values = {name: attention.kwargs.get(name, attention.args[i] if i < len(attention.args) else None)
                  for name in ("query", "key", "scale")
                  for i in [argument_position(attention.target, name)]}
        q, k = (_through_copies_up(values[n]) if isinstance(values[n], fx.Node) else None for n in ("query", "key"))
        if values["scale"] != 1.0 or root not in (q, k) or any(n is None or _scales(n) for n in (q, k)):
            return False
    return True


def _qkv_unscaled(site: Site) -> bool:
    return _qkv(site) and (_unscaled_fused_qk(site) or _is_unscaled_score_operand(site.node))


def _attention_out(site: Site) -> bool:
    users = site.backward_users
    return bool(users) and all(_reads_out(u, {site.node.name}) for u in users)


def _relu_sign_only(site: Site) -> bool:
    # threshold_backward(grad, out, 0): a ReLU's backward reads its output only as
    # out > 0 (inductor's partitioner already saves that bool itself), through copies
    if site.placeholder is None:
        return False
    copies = _through_copies_down(site.placeholder)
    readers = [u for n in copies for u in n.users if not _holds_same_values(u)]
    return bool(readers) and all(u.target == aten.threshold_backward.default and u.args[1] in copies
                                 and u.args[0] not in copies and u.args[2] == 0 for u in readers)


def _frozen_rmsnorm_input(site: Site) -> bool:
    return bool(_rmsnorm_weights(site.node) & site.frozen)


def _grouped_kv(site: Site) -> bool:
    return _qkv(site) and _repeat_source(site.node) is not None


def _weight_input(site: Site) -> bool:
    # A trainable LayerNorm's normalized input: its weight gradient reads it (and
    # so does its input gradient, as for a frozen one); or what only weight
    # gradients read.
    return bool(_layernorm_xhat_weight(site.node) & site.trainable) or (
        site.placeholder is not None and _read_for_weight_gradients(site.placeholder))


def _trainable_layernorm_input(site: Site) -> bool:
    return site.placeholder is not None \
        and bool(_layernorm_input_weight(site.placeholder, site.node.graph) & site.trainable)


def _batchnorm_input(site: Site) -> bool:
    # undecomposed (aot_eager): read only as native_batch_norm_backward's input
    users = site.backward_users
    if users and all(u.target == BATCH_NORM_BACKWARD and u.args[BATCH_NORM_BACKWARD_INPUT] is site.placeholder
                     and u.args[0] is not site.placeholder for u in users):
        return True
    # decomposed (inductor): x - mean, the mean from var_mean over every dim but
    # channels; or x itself where backward recomputes x - mean and reads nothing else
    node = site.node
    if node.target == aten.sub.Tensor and all(isinstance(a, fx.Node) for a in node.args):
        x, mean = node.args
        mean = _view_root(mean)
        stats = mean.args[0] if mean.target is operator.getitem and mean.args[1] == 1 else None
        return isinstance(stats, fx.Node) and _is_batch_statistics(stats, x)
    readers = site.backward_users
    return bool(readers) and all(u.target == aten.sub.Tensor and u.args[0] is site.placeholder for u in readers) \
        and any(_is_batch_statistics(u, node) for n in _through_copies_down(node) for u in n.users)


def _is_batch_statistics(stats: fx.Node, x: fx.Node) -> bool:
    """`stats` is var_mean of `x` over every dim but the channels (dim 1): a BatchNorm's."""
    val = x.meta.get("val")
    return stats.target == aten.var_mean.correction and _view_root(stats.args[0]) is _view_root(x) \
        and isinstance(val, torch.Tensor) and val.dim() >= 3 and sorted(stats.args[1]) == [0, *range(2, val.dim())]


def _is_relu_squared(site: Site) -> bool:
    """relu(x) that the forward squares (x ** 2, x * x), saved as it is, or its
    input x where backward recomputes the relu (inductor's partitioner)."""
    root = _through_copies_up(site.node)
    relus = [root] if root.target == aten.relu.default else \
        [u for n in _through_copies_down(site.node) for u in n.users if u.target == aten.relu.default]
    return any((u.target == aten.pow.Tensor_Scalar and u.args[1] == 2)
               or (u.target == aten.mul.Tensor and u.args[0] is n and u.args[1] is n)
               for relu in relus for n in _through_copies_down(relu) for u in n.users)


def _is_bool_mask(site: Site) -> bool:
    val = site.node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


MATCHERS: dict[str, Callable[[Site], bool]] = {
    "mask": _is_bool_mask,
    "layernorm_8bit": _frozen_layernorm,
    "layernorm_input_8bit": _frozen_layernorm_input,
    "rmsnorm_input_8bit": _frozen_rmsnorm_input,
    "layernorm": _frozen_layernorm,
    "layernorm_input": _frozen_layernorm_input,
    "rmsnorm_input": _frozen_rmsnorm_input,
    "kv_grouped": _grouped_kv,
    "qkv_unscaled": _qkv_unscaled,
    "qkv": _qkv,
    "attention_out": _attention_out,
    "softmax": lambda site: _is_softmax_output(site.node),
    "gate_operand": lambda site: _is_gate_operand(site.node),
    "batchnorm_input": _batchnorm_input,
    "relu_squared": _is_relu_squared,
    "relu_output": _relu_sign_only,
    "gelu_input": lambda site: _is_gelu_input(site.node),
    "silu_input": lambda site: _is_silu_input(site.node),
    "gelu_output": lambda site: _is_gelu_output(site.node),
    "weight_input": _weight_input,
    "weight_input_layernorm_input": _trainable_layernorm_input,
}


def classify_saved(site: Site) -> list[str]:
    """Which kinds of saved activation `site` is, in registry.KINDS' precedence
    order (a trainable FFN output dense's input is both gelu_output and weight_input)."""
    return [kind.name for kind in KINDS if MATCHERS[kind.name](site)]
