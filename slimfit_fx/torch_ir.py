"""Facts about the aten graphs torch's tracers produce, which the passes match on.

Operator names, argument positions and naming conventions, as torch 2.13 makes
them. An upgrade that changes one would make a pass match nothing, silently,
so tests/test_torch_ir.py checks every fact here against the installed torch.
Public torch only: private modules stay in capture.py.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
from torch import fx

aten = torch.ops.aten


def is_aten_op(node: fx.Node) -> bool:
    """Whether `node` calls an operator overload (`aten.mm.default`), as AOTAutograd's graphs do."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


# Dynamo's graphs: the value a node was traced with, and the modules it ran in.
DYNAMO_VALUE = "example_value"
MODULE_STACK = "nn_module_stack"

# How dynamo names the model in a module path: `self` of its forward, or the
# first positional argument when a decorator wraps forward as wrapper(*args, **kwargs)
# (transformers 5's Llama, Qwen2, Mistral: "L['args'][0].model.layers.0").
_ROOT_MODULE = re.compile(r"^L\[(?:'self'|'args'\]\[0)\]\.?")


# A submodule reached through its parent's `_modules`: `._modules['layer']`, or
# `.__dict__['_modules']['base_model']` where a wrapper's __getattr__ hands it
# out (peft's PeftModel and LoraModel forward to the model they wrap).
_SUBMODULE = re.compile(r"\.(?:__dict__\['_modules'\]|_modules)\['([^']+)'\]")


def module_name(path: str) -> str:
    """A dynamo module path (`L['self'].encoder._modules['layer']`) as a
    `named_modules()` name (`encoder.layer`); "" for the model itself."""
    return _ROOT_MODULE.sub("", _SUBMODULE.sub(r".\1", str(path)))


def module_path(node: fx.Node) -> list[str]:
    """The module paths (outermost first) that dynamo recorded for `node`, as
    `named_modules()` names. Entries rooted elsewhere are left out: dynamo also
    stacks a global function that a hub-kernel decorator made a module
    (transformers' Llama: "G['__import_transformers_...'].apply_rotary_pos_emb")."""
    return [module_name(path) for path, _ in (node.meta.get(MODULE_STACK) or {}).values()
            if _ROOT_MODULE.match(str(path))]


def dynamo_value(node: fx.Node) -> Any:
    """The (fake) value dynamo traced `node` with; None where it recorded none."""
    return node.meta.get(DYNAMO_VALUE)


def argument_position(op: torch._ops.OpOverload, name: str) -> int | None:
    """Where `op`'s schema has the argument `name`, or None if it has none by that name."""
    names = [a.name for a in op._schema.arguments]
    return names.index(name) if name in names else None


class AttentionBackwardArgs(NamedTuple):
    """Positions in a fused attention backward of q, k, v and of the forward's
    output `out` (read to form rowsum(grad_out * out))."""

    qkv: tuple[int, int, int]
    out: int


# Every fused scaled_dot_product_attention backward torch may put in a graph.
ATTENTION_BACKWARD_OPS = ("_scaled_dot_product_flash_attention_for_cpu_backward",
                          "_scaled_dot_product_efficient_attention_backward",
                          "_scaled_dot_product_flash_attention_backward",
                          "_scaled_dot_product_cudnn_attention_backward")


def _attention_backward_args(op: torch._ops.OpOverload) -> AttentionBackwardArgs | None:
    positions = [argument_position(op, name) for name in ("query", "key", "value", "out")]
    if None in positions:
        return None  # renamed: left out, which the IR test reports
    q, k, v, out = positions
    return AttentionBackwardArgs((q, k, v), out)


ATTENTION_BACKWARD: dict[torch._ops.OpOverload, AttentionBackwardArgs] = {
    getattr(aten, name).default: args
    for name in ATTENTION_BACKWARD_OPS if hasattr(aten, name)
    if (args := _attention_backward_args(getattr(aten, name).default)) is not None
}

# _safe_softmax: scaled_dot_product_attention's math path (attention dropout > 0 on CPU).
SOFTMAXES = frozenset({aten._softmax.default,
                       *([aten._safe_softmax.default] if hasattr(aten, "_safe_softmax") else [])})
# Inductor decomposes softmax(x) into exp(x - amax(x)) / sum(exp(...)): amax is
# its first op, the div by the sum its last; a decomposed _safe_softmax wraps
# that in where(row all masked, 0, softmax).
DECOMPOSED_SOFTMAX_FIRST = aten.amax.default
DECOMPOSED_SOFTMAX_EXP = aten.exp.default
DECOMPOSED_SOFTMAX_LAST = aten.div.Tensor

# native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, ...)
LAYER_NORM_BACKWARD = aten.native_layer_norm_backward.default
LAYER_NORM_BACKWARD_INPUT = argument_position(LAYER_NORM_BACKWARD, "input")
LAYER_NORM_BACKWARD_MEAN = argument_position(LAYER_NORM_BACKWARD, "mean")
LAYER_NORM_BACKWARD_RSTD = argument_position(LAYER_NORM_BACKWARD, "rstd")
LAYER_NORM_BACKWARD_WEIGHT = argument_position(LAYER_NORM_BACKWARD, "weight")
# native_layer_norm returns (output, mean, rstd)
LAYER_NORM_MEAN_OUTPUT, LAYER_NORM_RSTD_OUTPUT = 1, 2
# convolution_backward(grad_output, input, weight, ..., output_mask): with
# output_mask[1] False (no weight gradient) it reads `input` for its shape only
CONVOLUTION_BACKWARD = aten.convolution_backward.default
CONVOLUTION_BACKWARD_GRAD = argument_position(CONVOLUTION_BACKWARD, "grad_output")
CONVOLUTION_BACKWARD_INPUT = argument_position(CONVOLUTION_BACKWARD, "input")
CONVOLUTION_BACKWARD_WEIGHT = argument_position(CONVOLUTION_BACKWARD, "weight")
CONVOLUTION_BACKWARD_MASK = argument_position(CONVOLUTION_BACKWARD, "output_mask")
# max_pool2d_with_indices_backward(grad_output, self, ..., indices) reads `self`
# for its shape only: the indices say where each gradient goes
MAX_POOL2D_BACKWARD = aten.max_pool2d_with_indices_backward.default
MAX_POOL2D_BACKWARD_SELF = argument_position(MAX_POOL2D_BACKWARD, "self")
# native_batch_norm_backward(grad_out, input, weight, running_mean, running_var,
# save_mean, save_invstd, train, eps, output_mask)
BATCH_NORM_BACKWARD = aten.native_batch_norm_backward.default
BATCH_NORM_BACKWARD_INPUT = argument_position(BATCH_NORM_BACKWARD, "input")
BATCH_NORM_BACKWARD_WEIGHT = argument_position(BATCH_NORM_BACKWARD, "weight")
# native_dropout(input, p, train) returns (output, mask)
DROPOUT_P = argument_position(aten.native_dropout.default, "p")
DROPOUT_MASK_OUTPUT = 1

# AOTAutograd names a partitioned forward's inputs primals_1..N in graph-input
# order and a backward's incoming gradients tangents_1..M.
FORWARD_INPUT_PREFIX = "primals_"
TANGENT_PREFIX = "tangents"


def forward_input_index(name: str) -> int | None:
    """The graph-input position of a forward placeholder named `name`, or None."""
    if not name.startswith(FORWARD_INPUT_PREFIX):
        return None
    digits = name[len(FORWARD_INPUT_PREFIX):]
    return int(digits) - 1 if digits.isdigit() else None


def _written_arguments(node: fx.Node) -> list[object]:
    """The values `node` passes to arguments its op's schema marks as written (`Tensor(a!)`)."""
    if not is_aten_op(node):
        return []
    written = []
    for i, argument in enumerate(node.target._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.append(node.args[i] if i < len(node.args) else node.kwargs.get(argument.name))
    return written


def _view_base(node: fx.Node) -> fx.Node:
    """The tensor `node` is a view of (through view ops, whose schema returns an
    alias of their first argument without writing it), or `node` itself."""
    while is_aten_op(node) and node.args:
        schema = node.target._schema
        first = schema.arguments[0].alias_info if schema.arguments else None
        returned = schema.returns[0].alias_info if len(schema.returns) == 1 else None
        if first is None or first.is_write or returned is None or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


# Ops whose schema hides a write: batch_norm in training mode updates the
# running statistics it is handed, yet native_batch_norm declares no `Tensor(a!)`.
# Their decompositions (traced with `hidden_write_decompositions()`) end in a
# declared `copy_` into those inputs.
HIDDEN_WRITE_OPS = tuple(getattr(aten, name).default for name in
                         ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm") if hasattr(aten, name))


def hidden_write_decompositions() -> dict:
    """A make_fx decomposition table that turns HIDDEN_WRITE_OPS into ops that declare their writes."""
    from torch._decomp import get_decompositions

    return get_decompositions(list(HIDDEN_WRITE_OPS))


def mutated_inputs(gm: fx.GraphModule) -> set[int]:
    """Positions of `gm`'s inputs that an aten op in it declares it writes to,
    directly or through a view (an in-place op's first argument; the running
    statistics of a batch_norm traced with `hidden_write_decompositions()`)."""
    position = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    found = set()
    for node in gm.graph.nodes:
        for value in _written_arguments(node):
            if isinstance(value, fx.Node) and _view_base(value) in position:
                found.add(position[_view_base(value)])
    return found
