"""Facts about the aten graphs torch's tracers produce, which the passes match on.

Operator names, argument positions and naming conventions, as torch 2.13 makes
them. An upgrade that changes one would make a pass match nothing, silently,
so tests/test_torch_ir.py checks every fact here against the installed torch.
Public torch only: private modules stay in capture.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

aten = torch.ops.aten


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
