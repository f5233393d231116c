"""The kinds of tensor slimfit_fx stores for backward, one entry each: the
CompressionConfig field that sets it, the format it is stored in (formats/),
and why that keeps the gradient. A new kind is one entry here plus one matcher
in patterns.py; a new format is one module in formats/.

CompressionConfig's fields, their validation and presets are derived from this
table and the formats, so it imports nothing from the passes or the config.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ... import ops
from . import formats
from .formats import Format, Packing

# 4-bit signed, step 0.5: the nearest 4-bit format to Q3.4 for kinds whose
# paper width is 8.
_Q2_1_INT4 = ops.FixedPoint(4, 1, True)


@dataclass(frozen=True)
class Kind:
    """One kind of saved activation.

    field: the CompressionConfig field that sets it; None keeps the tensor whole.
        Several kinds may share a field (and then share its format).
    paper: the field's value in the "paper" preset, which is its default.
    format: the name of the format it is stored in (formats.FORMATS), which
        validates the field's values: "fixed_point" (bits 4 or 8, per-row scale
        under scale="row"), "rowwise" (bits 4 or 8, always a per-row scale),
        "topk" (share of each row kept), "positive_mask" or "bit_pack" (True or False),
        "derivative_bins" (bits 4 or 8: 4 bits fitted to an activation's derivative,
        8 bits the kind's fixed point), "float8" (bits 8: float8 e4m3; 4: the
        kind's fixed point).
    fixed: for "fixed_point" (and "derivative_bins" and "float8" where they store
        the fixed point: at the other width, or under paper_formats), the
        power-of-two format per width; a width with none is stored with a per-row scale.
    stored_as: "self" (the saved tensor), or "layernorm_x_hat" (the normalized
        x_hat of the native_layer_norm reading it, rebuilt to its input in backward).
    derivative: for "derivative_bins", the activation (ops.DERIVATIVES) whose
        derivative is all backward reads of the tensor.
    why: the numerics argument for the format.
    when_returned: packed even where the forward also returns the tensor (handed
        to the next region): a format this small adds little if something
        downstream keeps the tensor, and frees it if nothing does. Other kinds are
        left whole there (skipped_<kind>_also_returned).
    """

    name: str
    field: str
    paper: int | float | None
    why: str
    format: str = field(kw_only=True)
    fixed: Mapping[int, ops.FixedPoint] = field(default_factory=dict)
    stored_as: str = "self"
    when_returned: bool = False
    derivative: str | None = None


# In precedence order: a saved tensor matching several kinds is stored as the
# first one its config compresses.
KINDS: tuple[Kind, ...] = (
    Kind("mask", "mask_packed", True,
         "A boolean mask saved for backward (dropout's; a ReLU's sign where inductor saves "
         "it) holds one bit per element in a byte: eight to a byte is lossless, so backward "
         "multiplies by exactly the mask forward drew. Not in the paper.",
         format="bit_pack"),
    Kind("layernorm_8bit", "layernorm_bits", None,
         "A norm's x_hat in float8 e4m3 instead of its top 10%: x_hat has unit variance per "
         "row, so e4m3 needs no scale and keeps every entry within 1/16 of itself, outliers "
         "(MiniLM's reach 19) included (31.5 dB, where the top 10% keep 3 dB of x_hat) for "
         "1 byte an entry against the pruning's 0.6 (fp32 values and int16 indices). Not in "
         "the paper; set, it is stored so in place of layernorm_keep's pruning, and as no "
         "entry is dropped, norm_guard does not apply.",
         format="float8"),
    Kind("layernorm_input_8bit", "layernorm_bits", None,
         "The same where aten keeps the LayerNorm's input (undecomposed graphs): x_hat in "
         "float8, rebuilt to its input in backward.",
         format="float8", stored_as="layernorm_x_hat"),
    Kind("rmsnorm_input_8bit", "layernorm_bits", None,
         "A frozen RMSNorm's input in float8: x_hat is x times a positive per-row scalar, "
         "and e4m3's error is relative, so x_hat read from it is as close.",
         format="float8"),
    Kind("layernorm", "layernorm_keep", 0.1,
         "A frozen LayerNorm's input gradient reads x_hat only in the term "
         "x_hat * mean(g * w * x_hat); the largest 10% of |x_hat| carry most of that "
         "sum (the paper's pruning, as in DropIT).",
         format="topk"),
    Kind("layernorm_input", "layernorm_keep", 0.1,
         "The same pruning where aten keeps the LayerNorm's input and statistics "
         "(undecomposed graphs): x_hat is pruned, backward rebuilds the input from it.",
         format="topk", stored_as="layernorm_x_hat"),
    Kind("rmsnorm_input", "layernorm_keep", 0.1,
         "A frozen RMSNorm's input gradient is r * (g * w - x_hat * mean(g * w * x_hat)), "
         "x_hat = x * r: x enters only in the second term, as x_hat does for LayerNorm. "
         "x_hat is x times a positive per-row scalar, so the top 10% of |x| per row are "
         "x_hat's top 10%: x is stored pruned and backward reads it as it is (the rsqrt "
         "stays whole).",
         format="topk"),
    Kind("kv_grouped", "qkv_bits", 8,
         "Grouped-query K or V, saved after repeat_kv copied each kv head to its query "
         "heads: qkv's format, stored once per kv head (before the repeat, as every "
         "fixed-point format is stored at the tensor it copies) and repeated again in backward.",
         format="fixed_point", fixed={8: ops.Q3_4_INT8, 4: _Q2_1_INT4}),
    Kind("qkv_unscaled", "qkv_bits", 8,
         "Q and K of attention whose scores reach the softmax unscaled (T5 and its "
         "lineage fold 1/sqrt(d) into W_q's initialisation instead): Q is about "
         "sqrt(d) times smaller than where the scores are scaled, and Q3.4's fixed step "
         "of 1/16 rounds much of it away (tiny T5, every layer training, only Q/K/V "
         "packed: gradient cosine 0.9980 with Q3.4, 0.99984 with Q and K per row; "
         "tests/test_compress_pass.py). int8 with a per-row scale; V keeps qkv's format.",
         format="fixed_point"),
    Kind("qkv", "qkv_bits", 8,
         "Attention matmul operands: the paper's int8 Q3.4 (range +-8, step 1/16).",
         format="fixed_point", fixed={8: ops.Q3_4_INT8, 4: _Q2_1_INT4}),
    Kind("attention_out", "attention_out_bits", 8,
         "A fused attention's output, a convex combination of V's rows: V's format "
         "covers its range at V's step.",
         format="fixed_point", fixed={8: ops.Q3_4_INT8, 4: _Q2_1_INT4}),
    Kind("softmax", "softmax_bits", 8,
         "Probabilities lie in [0, 1]: uint8 in steps of 1/256 (the paper's).",
         format="fixed_point", fixed={8: ops.SOFTMAX_UINT8, 4: ops.FixedPoint(4, 4, False)}),
    Kind("gate_operand", "gate_operand_bits", 8,
         "Both factors of a SwiGLU/GeGLU gate product act(g) * u: backward reads act(g) as "
         "a value (u's gradient is grad * act(g)) and u likewise, so the coarse 4-bit "
         "input a plain activation gets is not enough. int8 like the paper's matmul "
         "operands, with a per-row scale: projections in LLM FFNs share no range and "
         "have outliers far past Q3.4's +-8.",
         format="rowwise"),
    Kind("batchnorm_input", "batchnorm_input_bits", 8,
         "What a BatchNorm's input gradient reads besides its statistics: its input "
         "(undecomposed graphs) or the input less the batch mean (inductor's "
         "decomposition). dx = w * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) with "
         "x_hat rebuilt from it and the exact saved mean and invstd: int8 with a per-row "
         "scale (a conv output has no fixed range) moves x_hat by at most half a step of "
         "its row's largest value / 127. Not in the paper (it fine-tunes no conv nets); "
         "needed whether or not the norm trains, so it is static.",
         format="rowwise"),
    Kind("relu_squared", "relu_squared_bits", 8,
         "A ReLU whose output is squared (ReLU^2 FFNs: Primer, Nemotron): backward reads "
         "relu(x) as a value (d relu(x)^2 = 2 relu(x)) and as a sign. int8 with a per-row "
         "scale keeps zero exact and positives positive but for those under half a step, "
         "whose gradient 2 relu(x) g is that small too. Not in the paper.",
         format="rowwise"),
    Kind("relu_output", "relu_output_mask", True,
         "A ReLU's backward reads its saved output only as out > 0: stored as that "
         "mask, one bit per element, exact, a thirty-second of fp32's bytes (ReLU FFNs: "
         "OPT; conv nets); the layer reading the output keeps it whole only while it "
         "trains (its weight gradient's input). Packed "
         "also where the output is handed to the next region (a conv net's blocks), "
         "which keeps it only if its layer trains.",
         format="positive_mask", when_returned=True),
    Kind("gelu_input", "gelu_input_bits", 4,
         "Backward reads a GELU's input only through GELU'(x), which varies over about "
         "[-3, 3] and is flat outside. The paper's 4 bits as 16 intervals fitted to GELU' "
         "(few-bit backward), each read back as its point where GELU' is the interval's "
         "best constant: GELU' off by at most 0.063, where the paper's steps of 0.5 over "
         "[-4, 3.5] miss it by up to 0.195. The tanh approximation and quick-GELU read "
         "the same points (their derivatives differ from GELU's by little).",
         format="derivative_bins", fixed={4: ops.GELU_INT4, 8: ops.Q3_4_INT8}, derivative="gelu"),
    Kind("silu_input", "silu_input_bits", 4,
         "SiLU's derivative s(x)(1 + x(1 - s(x))) changes over about [-6, 6] like GELU's: "
         "16 intervals fitted to SiLU' as GELU's are to GELU' (SiLU' off by at most 0.060). "
         "Only where backward needs the derivative alone (a gate product's SiLU input is a "
         "gate_operand).",
         format="derivative_bins", fixed={4: ops.GELU_INT4, 8: ops.Q3_4_INT8}, derivative="silu"),
    Kind("gelu_output", "gelu_output_bits", 8,
         "The FFN output dense's input, read for its weight gradient when it trains. "
         "Mostly small, with a tail past 20 in pretrained models: the paper's int8 Q3.4 "
         "clips the tail at 7.94 and rounds the rest to 1/16 (MiniLM's GELU outputs: "
         "16-24 dB); float8 e4m3 keeps every value within 1/16 of itself (31.5 dB), in "
         "the same byte.",
         format="float8", fixed={8: ops.Q3_4_INT8, 4: _Q2_1_INT4}),
    Kind("weight_input", "weight_input_bits", None,
         "What trainable layers' weight gradients read; inputs of different layers "
         "share no range, so always a per-row scale.",
         format="rowwise"),
    Kind("weight_input_layernorm_input", "weight_input_bits", None,
         "A trainable LayerNorm's input (undecomposed graphs), stored as x_hat like "
         "a weight input and rebuilt to its input in backward.",
         format="rowwise", stored_as="layernorm_x_hat"),
)

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}


def config_fields(kinds: tuple[Kind, ...] = KINDS) -> dict[str, tuple[int | float | None, Format]]:
    """CompressionConfig's per-kind fields in table order, with their "paper"
    values and the format that validates them."""
    fields: dict[str, tuple[int | float | None, Format]] = {}
    for kind in kinds:
        fmt = formats.lookup(kind.format)
        paper, shared = fields.setdefault(kind.field, (kind.paper, fmt))
        if shared is not fmt:
            raise ValueError(f"kinds sharing CompressionConfig.{kind.field} share its format: {kind.name} "
                             f"names {fmt.name!r}, an earlier kind {shared.name!r}; give it a field of its own")
    return fields


def format_for(config, kind: str | Kind, val: torch.Tensor | None = None) -> Packing | None:
    """How `kind` (its name or a Kind) is stored under `config` (a
    CompressionConfig), or None to keep it whole; `val` (the saved tensor's fake
    value) may size the format (prune indices: int16 when its rows are static
    and short enough)."""
    entry = kind if isinstance(kind, Kind) else BY_NAME[kind]
    setting = getattr(config, entry.field)
    if setting is None:
        return None
    return formats.lookup(entry.format).packing(setting, entry, config, val)


def first_format(config, kinds: list[str], val) -> tuple[str | None, Packing | None]:
    """The first of `kinds` that `config` stores compressed, with its format."""
    for kind in kinds:
        fmt = format_for(config, kind, val)
        if fmt is not None:
            return kind, fmt
    return (kinds[0] if kinds else None), None
