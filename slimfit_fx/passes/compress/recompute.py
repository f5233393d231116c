"""Saved tensors backward can rebuild from other saved tensors instead of keeping.

Pure matchers, like patterns.py: each returns a plan (which saved tensors to
read, which forward ops to rerun) that rewrite.py carries out. They never
change a graph.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

from ...torch_ir import DROPOUT_MASK_OUTPUT
from .patterns import (_GELU_ARITHMETIC, _SAME_VALUES, _dropout_of, _is_float, _is_gelu_input,
                       _is_softmax_output, _through_copies_up)

aten = torch.ops.aten


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


# The nonlinearity inside a GELU approximation written out in ops, by rebuild kind.
_GELU_INNER = {aten.tanh.default: "gelu_tanh", aten.sigmoid.default: "gelu_sigmoid"}


def _gelu_inner_recompute(node: fx.Node, saved: dict[str, fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """For t = tanh(c * (x + 0.044715 x^3)) of a tanh-approximation GELU (GPT-2's
    gelu_new) or t = sigmoid(1.702 x) of quick-GELU (CLIP), written out in aten ops
    (aot_eager saves t for its backward): the GELU input x, itself among `saved`,
    and the ops from x to t in graph order: backward can rebuild t from x instead
    of keeping it."""
    inner = _through_copies_up(node).target
    if inner not in _GELU_INNER:
        return None
    # the decompositions have 6 ops and a copy or two
    found = _pointwise_from_saved(node, saved, _GELU_ARITHMETIC | _SAME_VALUES | {inner})
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
        elif root.target is operator.getitem and root.args[0] is dropout and root.args[1] == DROPOUT_MASK_OUTPUT \
                and s.meta["val"].shape == root.meta["val"].shape:
            sources.setdefault("mask", s)
    if len(sources) != 2:
        return None
    return [sources["p"], sources["mask"]]

class Rebuild(NamedTuple):
    """How backward rebuilds a saved tensor from other saved tensors (`sources`)."""

    kind: str
    sources: list[fx.Node]
    chain: list[fx.Node]  # forward ops to rerun in graph order, on the sources or on...
    dropout_output: fx.Node | None = None  # ...native_dropout's output, rebuilt from [P, mask]


def rebuild_plan(saved: fx.Node, saved_nodes: dict[str, fx.Node]) -> Rebuild | None:
    """How backward can rebuild `saved` instead of keeping it, or None."""
    inner = _gelu_inner_recompute(saved, saved_nodes)
    if inner is not None:
        x, chain = inner
        return Rebuild(_GELU_INNER[_through_copies_up(saved).target], [x], chain)
    decomposed = _decomposed_dropout_recompute(saved, saved_nodes)
    if decomposed is not None:
        return Rebuild("attention_dropout", *decomposed)
    dropped = _dropped_probabilities(saved, saved_nodes)
    if dropped is not None:
        copies = []
        node = saved
        while node.target is not operator.getitem:  # the copies between dropout and `saved`
            copies.append(node)
            node = node.args[0]
        return Rebuild("attention_dropout", dropped, copies[::-1], dropout_output=node)
    return None
