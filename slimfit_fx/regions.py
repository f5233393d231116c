"""Split a captured graph into regions, one per repeated block, and tap each
layer's weight gradient out of its region.

Pure FX: it reads the dynamo graph and the model's module tree and writes new
graphs; it never compiles or runs anything. The runtime (`engine.py`)
compiles each distinct region once and computes weight gradients outside it.
"""
from __future__ import annotations

import fnmatch
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from . import capture
from .torch_ir import DYNAMO_VALUE, dynamo_value, module_path

# Ops that only reshape or cast a weight on its way to the op that uses it
# (`self.weight.t()`, `self.weight.to(dtype)`): they stay with the weight.
_WEIGHT_ONLY_METHODS = {"t", "to", "view", "reshape", "transpose", "permute", "unsqueeze",
                        "squeeze", "contiguous", "float", "half", "bfloat16", "type_as", "flatten",
                        "expand", "__getitem__"}
_WEIGHT_ONLY_FUNCTIONS = {torch.t, torch.transpose, torch.reshape, torch.permute, torch.flatten,
                          torch.unsqueeze, torch.squeeze, operator.getitem}
# Arithmetic that is weight-only when its other operands are numbers: a norm that
# scales by 1 + w (Gemma, Nemotron) uses w where it meets the activations, so its
# weight gradient is formed outside the region like any other norm's.
_SCALAR_ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__",
                              "__mul__", "__rmul__", "__truediv__"}
_SCALAR_ARITHMETIC_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                                torch.sub, torch.mul, torch.div}


def block_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the repeated blocks: children of a ModuleList/Sequential
    that share their class with a sibling (HF `encoder.layer.N`, timm `blocks.N`)."""
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        for child_name, child in children:
            if sum(type(c) is type(child) for _, c in children) >= 2 and any(True for _ in child.parameters()):
                blocks.append(f"{name}.{child_name}" if name else child_name)
    return tuple(blocks)


def named_blocks(model: nn.Module, specs: Sequence[str | type]) -> tuple[str, ...]:
    """The blocks `specs` names: each a module's qualified name (`encoder.layer.3`),
    a pattern over qualified names (`encoder.layer.*`, each `*` within one dotted
    part), or a module class (every
    module of that class). Each spec must match a module that holds parameters,
    and no block may contain another (a region is one block's code)."""
    modules = {name: m for name, m in model.named_modules() if name}
    found: dict[str, None] = {}
    for spec in specs:
        if isinstance(spec, type):
            matches = [n for n, m in modules.items() if isinstance(m, spec)]
        elif any(c in spec for c in "*?["):
            matches = [n for n in modules if _matches(n, spec)]
        else:
            matches = [spec] if spec in modules else []
        if not matches:
            raise ValueError(
                f"blocks={spec!r:.80} names no submodule of {type(model).__name__}. Fix: name "
                "repeated blocks by qualified name as in model.named_modules() (e.g. "
                f"{_example_names(modules)}), by a pattern such as 'encoder.layer.*', or by their class")
        for name in matches:
            if not any(True for _ in modules[name].parameters()):
                raise ValueError(f"block {name!r} (from blocks={spec!r:.80}) holds no parameters, so it "
                                 "has no layer to freeze; name the modules that hold a block's layers")
            found[name] = None
    nested = [(a, b) for a in found for b in found if b.startswith(a + ".")]
    if nested:
        outer, inner = nested[0]
        raise ValueError(f"blocks {outer!r} and {inner!r} are nested: a region is one block's code, so "
                         f"name either the outer blocks or the inner ones, not both")
    return tuple(found)


def _matches(name: str, pattern: str) -> bool:
    """fnmatch per dotted part: `encoder.layer.*` is the layers, not their children."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _example_names(modules: dict[str, nn.Module]) -> str:
    names = [n for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    shown = [f"{n}.{child}" for n in names[:2] for child, _ in list(modules[n].named_children())[:1]]
    return ", ".join(repr(n) for n in (shown or list(modules)[:2]))


def block_of(node: fx.Node, blocks: set[str]) -> str | None:
    for path in reversed(module_path(node)):  # innermost block first
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in blocks:
                return prefix
    return None


def split_regions(gm: fx.GraphModule, blocks: Sequence[str]) -> fx.GraphModule:
    """`gm` split into submodules `submod_0..N` in graph order: each repeated block's
    nodes form one region, and the nodes between blocks form regions of their own."""
    blocks = set(blocks)
    region, owner, assignment = 0, object(), {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        block = block_of(node, blocks) if module_path(node) else owner
        if block != owner and assignment:
            region += 1
        owner = block
        assignment[node] = region
    return capture.split_module(gm, None, lambda node: assignment[node], keep_original_order=True,
                        keep_original_node_name=True)


def _meta_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # str: a symbolic size (dynamic shapes) is keyed by its expression (s0*s1)
        return ("tensor", tuple(map(str, value.shape)), tuple(map(str, value.stride())), str(value.dtype),
                str(value.device), value.requires_grad)
    return ("value", repr(value))


def structural_key(gm: fx.GraphModule, weight_inputs: Sequence[bool]) -> tuple:
    """Equal for two regions that compute the same thing on inputs of the same kind:
    ops, wiring, constants, input metadata and which inputs are layer weights."""
    index = {}
    rows = []
    placeholders = iter(weight_inputs)
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = fx.map_arg((node.args, node.kwargs), lambda n: ("node", index[n]))
        if node.op == "placeholder":
            rows.append(("placeholder", _meta_key(dynamo_value(node)), next(placeholders)))
        elif node.op == "get_attr":
            rows.append(("get_attr", id(getattr(gm, node.target))))
        else:
            rows.append((node.op, str(node.target), repr(args)))
    return tuple(rows)


@dataclass
class WeightTap:
    """One use of a layer weight inside a region, rewritten so that the region
    computes everything but that use's weight gradient.

    The region takes an extra input (the probe) added to the use's output, so
    its backward hands out the gradient at that output; it returns the use's
    other tensor operands (`stash`: region input positions, or extra output
    positions) so the weight gradient can be formed outside, only when the layer
    trains. `use` computes the op from (weight, *stash) for that gradient.
    """

    weight_input: int  # region input position of the weight
    probe_dtype: torch.dtype
    stash: list[tuple[str, int]]  # ("input", position) or ("output", position)
    use: fx.GraphModule
    producer: str = ""  # op that made the first stashed tensor ("gelu", ...)
    # per (autocast, operand dtypes): traced when the region compiles, or when
    # another dtype or autocast first appears
    weight_grads: dict = field(default_factory=dict, repr=False)
    trace_seconds: float = 0.0  # spent on the later ones

    def operands(self, inputs: Sequence[Any], stashed: Sequence[Any]) -> list[Any]:
        """The use's other operands, from the region's inputs and stashed outputs."""
        return [inputs[i] if where == "input" else stashed[i] for where, i in self.stash]


def _is_weight_only(node: fx.Node) -> bool:
    """An op on the weight alone (views, casts, arithmetic with numbers); callers
    check it reads no other tensor."""
    if node.op == "call_method":
        return node.target in _WEIGHT_ONLY_METHODS | _SCALAR_ARITHMETIC_METHODS
    return node.op == "call_function" and node.target in _WEIGHT_ONLY_FUNCTIONS | _SCALAR_ARITHMETIC_FUNCTIONS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(dynamo_value(a), torch.Tensor)]


def _uses(weight: fx.Node) -> list[tuple[list[fx.Node], fx.Node]]:
    """(chain of weight-only ops, the op that combines the weight with activations)."""
    found, todo = [], [(weight, [])]
    while todo:
        node, chain = todo.pop()
        for user in node.users:
            if user.op == "output":
                raise NotImplementedError("a region returns a layer weight itself")
            others = [a for a in _tensor_inputs(user) if a is not node]
            if _is_weight_only(user) and not others:
                todo.append((user, chain + [user]))
            else:
                found.append((chain, user))
    return found


def _use_module(weight: fx.Node, chain: list[fx.Node], use: fx.Node,
                operands: list[fx.Node]) -> fx.GraphModule:
    """A graph computing `use` from (weight, *operands), chain included."""
    graph = fx.Graph()
    env = {weight: graph.placeholder("weight")}
    for i, operand in enumerate(operands):
        env[operand] = graph.placeholder(f"operand_{i}")
    for node in (*chain, use):
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[use])
    return fx.GraphModule(torch.nn.Module(), graph)


# Activation functions as dynamo records them (torch.nn.functional.silu, ...).
_ACTIVATIONS = {"silu", "gelu", "relu", "sigmoid", "tanh"}


def _producer(node: fx.Node) -> str:
    """The op that made a stashed tensor; "gate_product" for act(gate) * up, the
    input of a gated FFN's down projection (SwiGLU, GeGLU); "gelu" for quick-GELU,
    x * sigmoid(1.702 x) (CLIP), whose factors share x."""
    if node.op == "placeholder":
        return "input"
    name = getattr(node.target, "__name__", str(node.target))
    args = [a for a in node.args if isinstance(a, fx.Node)]
    activations = [a for a in args if a.op != "placeholder" and getattr(a.target, "__name__", "") in _ACTIVATIONS]
    if name == "mul" and len(args) == 2 and activations:
        other = next(a for a in args if a is not activations[0])
        return "gelu" if other in _inputs_within(activations[0], 3) else "gate_product"
    return name


def _inputs_within(node: fx.Node, hops: int) -> set[fx.Node]:
    seen, frontier = set(), [node]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        seen.update(frontier)
    return seen


def tap_weight_grads(region: fx.GraphModule, weight_inputs: Sequence[bool]) -> tuple[fx.GraphModule, list[WeightTap], int]:
    """A copy of `region` whose layer weights (inputs flagged in `weight_inputs`)
    get no gradient inside it: each use gets a probe input and stashes its
    operands. Returns (graph, taps, number of the region's own outputs); the
    graph returns a flat tuple: the region's outputs, then the stashed tensors."""
    gm = fx.GraphModule(region, _copy_graph(region.graph))
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    position = {n: i for i, n in enumerate(placeholders)}
    output = graph.output_node()
    taps, stashed = [], []
    last_input = placeholders[-1]
    # Every use is found before any is rewritten: a use that reads two layer
    # weights (DeiT's two learned tokens in one cat) stashes the other one's view,
    # and that stash is no use of the other weight.
    uses = [(weight, _uses(weight)) for weight, is_weight in zip(placeholders, weight_inputs) if is_weight]
    for weight, found in uses:
        for chain, use in found:
            value = dynamo_value(use)
            if not isinstance(value, torch.Tensor):
                raise NotImplementedError(f"{use.format_node()} returns no single tensor")
            chain_set = set(chain) | {weight}
            operands = [a for a in _tensor_inputs(use) if a not in chain_set]
            with graph.inserting_after(last_input):
                probe = graph.placeholder(f"slimfit_probe_{len(taps)}")
            probe.meta[DYNAMO_VALUE] = value
            last_input = probe
            with graph.inserting_after(use):
                tapped = graph.call_function(operator.add, (use, probe))
            tapped.meta = dict(use.meta)
            tapped.meta["slimfit"] = {"tap_weight_grads": f"probe {len(taps)}"}
            use.replace_all_uses_with(tapped, delete_user_cb=lambda n: n is not tapped)
            stash = []
            for operand in operands:
                if operand.op == "placeholder":
                    stash.append(("input", position[operand]))
                else:
                    with graph.inserting_after(operand):
                        detached = graph.call_method("detach", (operand,))
                    detached.meta = dict(operand.meta)
                    stash.append(("output", len(stashed)))
                    stashed.append(detached)
            taps.append(WeightTap(
                weight_input=position[weight], probe_dtype=value.dtype,
                stash=stash, use=_use_module(weight, chain, use, operands),
                producer=_producer(operands[0]) if operands else ""))
    result = output.args[0]  # read after the taps rewired the region's outputs
    flat = list(result) if isinstance(result, (tuple, list)) else [result]
    output.args = (tuple(flat + stashed),)
    graph.lint()
    gm.recompile()
    return gm, taps, len(flat)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
