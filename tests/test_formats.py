"""The storage formats (slimfit_fx/passes/compress/formats): each one's pack ->
unpack error against the bound it states and its byte rule against the real
packed tensors, for every kind's settings; the weight-gradient stash storing
through the same registry; and a format registered from outside the package
reaching CompressionConfig validation and format lookup."""
import pytest
import torch

from slimfit_fx import engine, ops, regions
from slimfit_fx.config import COMPRESSION_PRESETS, KIND_FIELDS, CompressionConfig, compression_config_class
from slimfit_fx.passes.compress import FORMATS, KINDS, Format, Kind, Packing, format_for, formats
from slimfit_fx.passes.compress.formats.base import check_flag
from slimfit_fx.passes.compress.registry import config_fields

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# odd element counts (a 4-bit or bit-packed tensor pads its last byte), a 0-d
# tensor (one row of one), a row longer than int16 indices reach (top-k: int32)
SHAPES = ((4, 7, 33), (3, 5), (), (1, 33000))


def _input(shape, dtype, fmt: Format, seed: int = 0) -> torch.Tensor:
    """Normal values times 3 with outliers past every fixed range, a zero row, and
    negatives; bool where the format packs masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if x.dim():
        x.view(-1, x.shape[-1])[0] = 0.0  # an all-zero row
        x.view(-1)[-1] = 40.0
    if fmt.accepts(torch.bool):
        return x > 1.0
    return x.to(dtype)


def _check(packing: Packing, x: torch.Tensor) -> None:
    packed = packing.pack(x)
    assert ops.compressed_nbytes(packed) == packing.nbytes(x.shape, x.dtype), packing
    unpacked = packing.unpack(packed, x.shape, x.dtype)
    assert unpacked.shape == x.shape and unpacked.dtype == x.dtype, packing
    error, bound = packing.fidelity(x), packing.bound(x.dtype)
    assert error <= bound, (packing, x.dtype, error, bound)
    # the measure sees a wrong element
    if x.numel():
        wrong = unpacked.clone()
        if x.dtype == torch.bool:
            wrong.view(-1)[0] = ~wrong.view(-1)[0]
        else:
            wrong.view(-1)[0] += 4 * x.abs().max().item() + 1
        assert packing.format.error(packing, x, wrong) > bound, packing


def _settings(kind: Kind):
    return FORMATS[kind.format].examples


@pytest.mark.parametrize("scale", ["fixed", "row"])
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_every_kind_packs_within_its_formats_bound_and_bytes(kind, scale):
    fmt = FORMATS[kind.format]
    for setting in _settings(kind):
        config = CompressionConfig(**{kind.field: setting}, scale=scale)
        for shape in SHAPES:
            for dtype in DTYPES if not fmt.accepts(torch.bool) else (torch.bool,):
                x = _input(shape, dtype, fmt)
                packing = format_for(config, kind, x)
                assert packing is not None and packing.stored_as == kind.stored_as
                _check(packing, x)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_states_its_field_and_examples(name):
    fmt = FORMATS[name]
    assert fmt.name == name and fmt.description and fmt.allowed and fmt.examples
    for setting in fmt.examples:
        fmt.check("CompressionConfig.x", setting)
    for bad in ("8", 8.5, -1, [1]):
        with pytest.raises(ValueError, match=r"CompressionConfig\.x must be"):
            fmt.check("CompressionConfig.x", bad)


def test_fixed_point_falls_back_to_a_row_scale_where_the_kind_has_no_width():
    kind = Kind("k", "k_bits", 8, "test", format="fixed_point", fixed={8: ops.Q3_4_INT8})
    config = compression_config_class((kind,))
    fixed = format_for(config(), kind)
    assert fixed.quantize_op == torch.ops.slimfit.quantize_fixed.default and fixed.quantize_args == (8, 4, True)
    assert format_for(config(k_bits=4), kind).format is FORMATS["rowwise"]
    assert format_for(config(k_bits=8, scale="row"), kind).format is FORMATS["rowwise"]


def test_paper_formats_restore_the_papers_fixed_point_for_gelu_and_silu():
    """By default the GELU/SiLU inputs are derivative bins and the GELU output float8;
    paper_formats=True (preset "paper-exact") stores them as the paper did."""
    default, exact = CompressionConfig(), COMPRESSION_PRESETS["paper-exact"]
    assert exact == CompressionConfig(paper_formats=True)
    for kind in ("gelu_input", "silu_input"):
        assert format_for(default, kind).format is FORMATS["derivative_bins"]
        packing = format_for(exact, kind)
        assert packing.format is FORMATS["fixed_point"] and packing.quantize_args == (4, 1, True)
        assert format_for(CompressionConfig(paper_formats=True, scale="row"), kind).format is FORMATS["rowwise"]
    assert format_for(default, "gelu_output").format is FORMATS["float8"]
    packing = format_for(exact, "gelu_output")
    assert packing.format is FORMATS["fixed_point"] and packing.quantize_args == (8, 4, True)
    # every other kind is stored alike
    for kind in KINDS:
        if kind.name not in ("gelu_input", "silu_input", "gelu_output"):
            assert format_for(default, kind) == format_for(exact, kind), kind.name
    with pytest.raises(ValueError, match="paper_formats must be True or False"):
        CompressionConfig(paper_formats=1)


def test_kinds_sharing_a_field_share_its_format():
    fields = config_fields()
    assert set(fields) == set(KIND_FIELDS)
    for kind in KINDS:
        assert fields[kind.field][1] is FORMATS[kind.format], kind.name
    clash = (Kind("a", "ab_bits", 8, "test", format="rowwise"),
             Kind("b", "ab_bits", 8, "test", format="fixed_point"))
    with pytest.raises(ValueError, match="share its format"):
        config_fields(clash)


class _Tap:
    def __init__(self, producer):
        self.producer = producer


@pytest.mark.parametrize("config, expected", [
    (CompressionConfig(), {"gelu": ("gelu_output", "gelu_output"), "gate_product": ("gate_product", "gate_operand"),
                           "linear": None}),
    (CompressionConfig(scale="row", weight_input_bits=4),
     {"gelu": ("gelu_output", "gelu_output"), "gate_product": ("gate_product", "gate_operand"),
      "linear": ("weight_input", "weight_input")}),
    (CompressionConfig(gelu_output_bits=None, gate_operand_bits=None, weight_input_bits=8),
     {"gelu": ("weight_input", "weight_input"), "gate_product": ("weight_input", "weight_input"),
      "linear": ("weight_input", "weight_input")}),
    (CompressionConfig(**dict.fromkeys(KIND_FIELDS)), {"gelu": None, "gate_product": None, "linear": None}),
])
def test_weight_gradient_stash_stores_through_the_registry(config, expected):
    """What a trainable layer keeps for its weight gradient is stored in its kind's
    registry format, counted under the name of what it is."""
    assert set(regions.WeightTap.__dataclass_fields__) >= {"producer"}
    x = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(1)) * 3
    for producer, want in expected.items():
        name, packing = engine._stash_format(config, _Tap(producer))
        if want is None:
            assert (name, packing) == (None, None)
            continue
        assert name == want[0] and packing == format_for(config, want[1])
        _check(packing, x)


def test_a_stashed_operand_is_unpacked_to_what_the_format_rebuilds():
    packing = format_for(CompressionConfig(), "gelu_output")
    x = torch.randn(3, 16) * 4
    items = [(packing.pack(x), x.shape, x.dtype), "resident"]
    out, kept = engine._unpack_stashed(packing, items)
    assert kept == "resident"
    assert torch.equal(out, torch.ops.slimfit.dequantize_float8(
        torch.ops.slimfit.quantize_float8(x), list(x.shape), x.dtype))


# ---- a format defined here, registered from outside the package ---------------

class HalfStepFormat(Format):
    """int8 codes in steps of 1/2, no scale, set by a flag."""

    name = "half_step"
    description = "int8 codes in steps of 1/2 over [-64, 63.5]: within 1/4 inside it, saturating outside"
    allowed = "True, False or None"
    examples = (True,)
    at_copy_source = True

    def check(self, field, value):
        check_flag(field, value)

    def packing(self, setting, kind, config, val=None):
        if not setting:
            return None
        return Packing(torch.ops.slimfit.quantize_fixed.default, (8, 1, True),
                       torch.ops.slimfit.dequantize_fixed.default, (8, 1, True),
                       "int8, step 1/2", kind.stored_as, self)

    def nbytes(self, packing, shape, dtype):
        return torch.Size(shape).numel()

    def error(self, packing, x, unpacked):
        return (x.double().clamp(-64, 63.5) - unpacked.double()).abs().max().item() if x.numel() else 0.0

    def bound(self, packing, dtype):
        return 0.25


@pytest.fixture
def half_step():
    fmt = formats.register(HalfStepFormat())
    yield fmt
    del FORMATS[fmt.name]


def test_a_registered_format_reaches_config_validation_and_lookup(half_step):
    assert formats.lookup("half_step") is half_step
    kind = Kind("toy", "toy_half_step", True, "Stored in steps of 1/2.", format="half_step")
    config_class = compression_config_class((*KINDS, kind))
    config = config_class()
    assert config.toy_half_step is True and config.qkv_bits == 8 and config.enabled
    assert "toy_half_step (paper: True): toy: Stored in steps of 1/2." in config_class.__doc__
    with pytest.raises(ValueError, match=r"CompressionConfig\.toy_half_step must be True, False or None, got 3"):
        config_class(toy_half_step=3)
    with pytest.raises(ValueError, match=r"CompressionConfig\.qkv_bits must be 4, 8 or None"):
        config_class(qkv_bits=2)
    assert format_for(config_class(toy_half_step=False), kind) is None
    packing = format_for(config, kind)
    assert packing.format is half_step and packing.describe() == "int8, step 1/2"
    for dtype in DTYPES:
        _check(packing, _input((4, 7, 33), dtype, half_step))


def test_format_names_are_unique_and_lookups_name_the_registered_ones(half_step):
    with pytest.raises(ValueError, match="already registered"):
        formats.register(HalfStepFormat())
    assert formats.register(half_step) is half_step  # the same object again is a no-op
    with pytest.raises(KeyError, match=r"no storage format named 'int3'.*half_step"):
        formats.lookup("int3")
    with pytest.raises(KeyError, match="int3"):
        config_fields((Kind("x", "x_bits", 8, "test", format="int3"),))
