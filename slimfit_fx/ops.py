"""Saved-activation compression: quantize/dequantize and prune/unprune pairs.

Each pair is plain tensor math, also registered as a `slimfit::` custom op with a
fake kernel, so a graph pass can insert it as one opaque node that dynamo,
AOTAutograd, inductor and export all trace. It must not choose what to compress
or touch graphs (that is the passes' job), and never mutates its inputs.
"""
# torchao 0.18.0 was tried and is not used: it installs next to torch 2.13.0+cpu
# without replacing it, but `import torchao` logs "Failed to load" for its two CUDA
# extensions and a torch deprecation warning (register_constant on an Enum, "will be
# an error in a future release"), and it registers global pytree/op state on import.
# Its affine primitives also carry a zero point and block sizes this needs none of:
# the paper's scale-free fixed point, nibble packing and top-k are a few lines of torch.

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FixedPoint",
    "Q3_4_INT8",
    "SOFTMAX_UINT8",
    "GELU_INT4",
    "DerivativeBins",
    "derivative_bins",
    "fit_derivative_bins",
    "bin_codes",
    "quantize_binned",
    "dequantize_binned",
    "FLOAT8_MAX",
    "quantize_float8",
    "dequantize_float8",
    "quantize_fixed",
    "dequantize_fixed",
    "quantize_rowwise",
    "dequantize_rowwise",
    "prune_topk",
    "unprune_topk",
    "positive_mask",
    "from_positive_mask",
    "pack_nibbles",
    "unpack_nibbles",
    "kept_per_row",
    "compressed_nbytes",
]

SUPPORTED_BITS = (4, 8)
FRAC_BITS_RANGE = (-16, 16)
# keep_ratio is resolved to parts per million so the kept count is integer math,
# exact for ratios like 0.3 (0.3 * 10 is 3.0000000000000004 in floats) and valid
# for symbolic row lengths.
_PPM = 1_000_000


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")


def _check_float_dtype(field: str, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"{field}={dtype} must be a floating-point dtype")


@dataclass(frozen=True)
class FixedPoint:
    """Power-of-two fixed point with no scale: code = clamp(round(x * 2**frac_bits)).

    `step` is 2**-frac_bits; the representable values are [qmin * step, qmax * step].
    """

    bits: int
    frac_bits: int
    signed: bool

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        lo, hi = FRAC_BITS_RANGE
        if not isinstance(self.frac_bits, int) or not lo <= self.frac_bits <= hi:
            raise ValueError(f"frac_bits={self.frac_bits!r} must be an int in [{lo}, {hi}]")

    @property
    def step(self) -> float:
        return 2.0 ** -self.frac_bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def lo(self) -> float:
        return self.qmin * self.step

    @property
    def hi(self) -> float:
        return self.qmax * self.step


# The SlimFit paper's formats (arXiv 2305.18513 and its authors' code).
Q3_4_INT8 = FixedPoint(bits=8, frac_bits=4, signed=True)  # Q, K, V, FFN-output input: +-8, step 1/16
SOFTMAX_UINT8 = FixedPoint(bits=8, frac_bits=8, signed=False)  # probabilities: [0, 255/256]
# GELU input: [-4, 3.5], step 0.5. slimfit_fx stores 4-bit GELU and SiLU inputs as
# derivative bins instead (below); this is the paper's, for comparison.
GELU_INT4 = FixedPoint(bits=4, frac_bits=1, signed=True)


def pack_nibbles(nibbles: Tensor) -> Tensor:
    """Pack uint8 values in [0, 15], flattened, two per byte: element 2i in the low
    nibble of byte i, 2i+1 in the high one. An odd count gets a zero pad nibble."""
    flat = _padded(nibbles.reshape(-1), 2)
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """The first `numel` nibbles of `packed`, as a flat uint8 tensor (inverse of pack_nibbles)."""
    packed = packed.reshape(-1)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1)[:numel]


def _padded(flat: Tensor, multiple: int) -> Tensor:
    """`flat` with zeros appended up to a multiple of `multiple` elements.

    A symbolic count (the kernel traced for inductor under dynamic shapes) is
    padded by one gather over the padded length, with no tensor of the pad's
    own size: a branch on the pad, or a size-`pad` tensor (its contiguity is
    checked against 0 and 1), would guard on the count's remainder, so the
    graph would be recompiled for each remainder or pack one byte short."""
    numel = flat.numel()
    pad = -numel % multiple
    if isinstance(pad, torch.SymInt):
        where = torch.arange(numel + pad, device=flat.device)
        return torch.where(where < numel, flat[where.clamp(max=numel - 1)], 0)
    return torch.cat((flat, flat.new_zeros(pad))) if pad else flat


def _packed_numel(numel):
    return (numel + 1) // 2


def _code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def _check_codes(q: Tensor, bits: int, shape: Sequence[int]) -> None:
    numel = math.prod(shape)
    want = _packed_numel(numel) if bits == 4 else numel
    if q.numel() != want:
        raise ValueError(
            f"q has {q.numel()} elements; a {bits}-bit tensor of shape {list(shape)} has {want}"
        )



# ---- boolean masks ------------------------------------------------------------
# A dropout mask is one bit of information per element stored in a byte: eight
# to a byte is lossless, so backward multiplies by exactly the mask forward drew.

def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor, flattened, eight elements to a uint8 (element 8i + j is bit j
    of byte i); a count that is not a multiple of 8 is padded with False."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_bits packs bool masks; got dtype {mask.dtype}")
    flat = _padded(mask.reshape(-1).to(torch.uint8), 8)
    # Shifts of column slices, not a weights tensor: the kernel is traced into the
    # graph for inductor, where a constant tensor would be a dangling attribute.
    columns = flat.view(-1, 8)
    packed = columns[:, 0]
    for j in range(1, 8):
        packed = packed | (columns[:, j] << j)
    return packed


def unpack_bits(packed: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """Inverse of pack_bits: the bool mask of `shape` (`dtype` must be torch.bool)."""
    if dtype != torch.bool:
        raise ValueError(f"unpack_bits rebuilds bool masks; got dtype {dtype}")
    numel = math.prod(shape)
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed has {packed.numel()} bytes; a mask of shape {list(shape)} needs {(numel + 7) // 8}")
    # Bit i is (byte i // 8) >> (i % 8): one gather and shift per element, so
    # inductor fuses the unpacking into the kernel that reads the mask (a stack of
    # eight shifted copies was concatenated, compared with 0 and sliced by three
    # separate calls instead: 1.7x slower for dropout's backward on a CPU).
    i = torch.arange(numel, device=packed.device)
    return ((packed.reshape(-1)[i // 8] >> (i % 8)) & 1 != 0).reshape(shape)

# ---- fixed point ------------------------------------------------------------


def quantize_fixed(x: Tensor, bits: int, frac_bits: int, signed: bool) -> Tensor:
    """Codes clamp(round(x * 2**frac_bits), qmin, qmax); see FixedPoint.

    8 bits: int8 (signed) or uint8 codes, shape of x. 4 bits: uint8 of
    ceil(numel / 2) bytes, the flattened codes offset by -qmin (signed codes
    -8..7 are stored as 0..15) and packed two per byte by pack_nibbles.
    +-inf saturate to qmax / qmin; nan becomes code 0 (dequantizes to 0.0).
    Rounding is half to even (torch.round).
    """
    fmt = FixedPoint(bits, frac_bits, signed)
    _check_float_dtype("x.dtype", x.dtype)
    # In x's own dtype: scaling by a power of two is exact, and every code fits
    # exactly in fp16/bf16 (at most 8 significant bits), so no fp32 copy is needed.
    # An fp16 overflow gives inf, which saturates as it should.
    codes = x.contiguous() * (2.0**frac_bits)
    codes.nan_to_num_(nan=0.0).round_().clamp_(fmt.qmin, fmt.qmax)
    if bits == 4:
        return pack_nibbles((codes - fmt.qmin).to(torch.uint8))
    return codes.to(_code_dtype(signed))


def dequantize_fixed(
    q: Tensor, bits: int, frac_bits: int, signed: bool, shape: list[int], dtype: torch.dtype
) -> Tensor:
    """Inverse of quantize_fixed: codes * 2**-frac_bits as `dtype`, shaped `shape`
    (the original tensor's shape; 4-bit codes are flat and padded)."""
    fmt = FixedPoint(bits, frac_bits, signed)
    _check_float_dtype("dtype", dtype)
    _check_codes(q, bits, shape)
    if bits == 4:
        codes = unpack_nibbles(q, math.prod(shape)).to(dtype) + fmt.qmin
    else:
        codes = q.reshape(-1).to(dtype)
    # Exact in fp16/bf16 too: an at-most-8-bit code times a power of two.
    return (codes * fmt.step).reshape(shape)


# ---- derivative bins ------------------------------------------------------------
# Backward reads a GELU's or SiLU's input only through the derivative act'(x). So
# 4 bits store which of 16 intervals x lies in, with the intervals and one value
# of act' per interval chosen to minimize the L2 error of that piecewise-constant
# act' (few-bit backward: Novikov et al., ICML 2023). Unpacking gives, for each
# interval, a point x_hat inside it where act'(x_hat) is that value, so the
# graph's own backward (gelu_backward, or its decomposition) reads x_hat and
# multiplies by the optimal value: no op of backward changes. The paper's 4-bit
# fixed point (steps of 0.5 over [-4, 3.5]) rounds x to the nearest step, which
# misses GELU' by up to 0.195; these bins by at most 0.064, for the same bytes.


def _gelu_derivative(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x * 0.5**0.5)) + x * torch.exp(-0.5 * x * x) * (2 * math.pi) ** -0.5


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


# act' by activation name, as registry.Kind.derivative names it.
DERIVATIVES = {"gelu": _gelu_derivative, "silu": _silu_derivative}
# Both derivatives are within 1e-5 of their limits 0 and 1 outside +-12 (GELU's
# outside +-5): the grid covers where they change.
_BIN_GRID = (-12.0, 12.0, 2401)


@dataclass(frozen=True)
class DerivativeBins:
    """A 16-interval codebook for act'(x), act one of DERIVATIVES.

    boundaries: 15 increasing float32 values; x's code is how many are < x.
    levels: act' on each interval (its mean over the interval: the L2-optimal constant).
    representatives: per interval, a float32 x_hat inside it with act'(x_hat) nearest its level.
    max_error: sup over x of |act'(x) - act'(x_hat of x's interval)|, on a grid of step 1e-3.
    """

    activation: str
    boundaries: tuple[float, ...]
    levels: tuple[float, ...]
    representatives: tuple[float, ...]
    max_error: float

    def codes(self, x: Tensor) -> Tensor:
        """Each element's interval (bin_codes)."""
        return bin_codes(x, self.boundaries)


def bin_codes(x: Tensor, boundaries: Sequence[float]) -> Tensor:
    """How many of `boundaries` (increasing) each element of x exceeds, nan: 0, as
    int64: what quantize_binned stores, computed with exact float64 comparisons."""
    bounds = torch.tensor(boundaries, dtype=torch.float64, device=x.device)
    return torch.bucketize(x.double().nan_to_num(nan=-math.inf), bounds)


def fit_derivative_bins(activation: str, levels: int = 16) -> DerivativeBins:
    """The L2-optimal `levels`-interval piecewise-constant fit of act' over the
    line (uniform weight: nothing assumes the data's range), by dynamic
    programming over a grid of step 0.01 on [-12, 12] (about a second).
    DERIVATIVE_BINS holds its result for each of DERIVATIVES, so that nothing
    runs it while a graph is traced (tests/test_ops.py checks they agree)."""
    if activation not in DERIVATIVES:
        raise ValueError(f"no derivative for activation {activation!r}; known: {sorted(DERIVATIVES)}")
    derivative = DERIVATIVES[activation]
    lo, hi, n = _BIN_GRID
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    d = derivative(grid)
    # Prefix sums of d and d^2 give any run's squared error about its mean in O(1).
    zero = torch.zeros(1, dtype=torch.float64)
    total, squares = torch.cat((zero, d.cumsum(0))), torch.cat((zero, (d * d).cumsum(0)))
    starts, ends = torch.arange(n + 1)[:, None], torch.arange(n + 1)[None, :]
    runs = (ends - starts).clamp_min(1).double()
    cost = squares[ends] - squares[starts] - (total[ends] - total[starts]) ** 2 / runs
    cost = torch.where(starts < ends, cost, math.inf)
    # best[j]: least error of points [0, j) in m runs; cut[m][j]: where the last run starts
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    cuts = []
    for _ in range(levels):
        best, start = (best[:, None] + cost).min(0)
        cuts.append(start)
    edges, j = [n], n
    for start in reversed(cuts):
        j = int(start[j])
        edges.append(j)
    edges = edges[::-1]
    step = (hi - lo) / (n - 1)
    boundaries = tuple(float(torch.tensor(float(grid[e]) - step / 2, dtype=torch.float32)) for e in edges[1:-1])
    means = [float((total[b] - total[a]) / (b - a)) for a, b in zip(edges[:-1], edges[1:])]
    # Representatives on a grid 10x finer, inside each interval (the end ones up to +-12).
    fine = torch.linspace(lo, hi, 10 * (n - 1) + 1, dtype=torch.float32).double()
    fine_codes = bin_codes(fine, boundaries)
    fine_d = derivative(fine)
    representatives = []
    for code, mean in enumerate(means):
        inside = fine_codes == code
        miss = torch.where(inside, (fine_d - mean).abs(), math.inf)
        representatives.append(float(fine[miss.argmin()]))
    check = torch.linspace(lo, hi, int((hi - lo) / 1e-3) + 1, dtype=torch.float64)
    rep_d = derivative(torch.tensor(representatives, dtype=torch.float64))
    max_error = float((derivative(check) - rep_d[bin_codes(check, boundaries)]).abs().max())
    return DerivativeBins(activation, boundaries, tuple(means), tuple(representatives), max_error)


# fit_derivative_bins(name) for each of DERIVATIVES; levels and max_error to 1e-6.
DERIVATIVE_BINS = {
    "gelu": DerivativeBins(
        "gelu",
        boundaries=(-2.694999933242798, -2.055000066757202, -0.9350000023841858, -0.6850000023841858,
                    -0.48500001430511475, -0.3149999976158142, -0.1550000011920929, 0.004999999888241291,
                    0.1550000011920929, 0.3149999976158142, 0.48500001430511475, 0.6850000023841858,
                    0.9350000023841858, 2.055000066757202, 2.694999933242798),
        levels=(-0.001019, -0.049204, -0.109421, -0.02178, 0.083791, 0.197948, 0.316288, 0.440397,
                0.563576, 0.683712, 0.802052, 0.916209, 1.02178, 1.109421, 1.049204, 1.001019),
        representatives=(-3.804999589920044, -2.357999563217163, -1.1339994668960571, -0.8049994707107544,
                         -0.5829994678497314, -0.3989994525909424, -0.23399944603443146, -0.07499943673610687,
                         0.07999943196773529, 0.23399944603443146, 0.3989994525909424, 0.5829994678497314,
                         0.8049994707107544, 1.1339994668960571, 2.357999563217163, 3.804999589920044),
        max_error=0.062958),
    "silu": DerivativeBins(
        "silu",
        boundaries=(-5.304999828338623, -3.755000114440918, -1.5049999952316284, -1.0850000381469727,
                    -0.7649999856948853, -0.4950000047683716, -0.24500000476837158, -0.004999999888241291,
                    0.23499999940395355, 0.48500001430511475, 0.7649999856948853, 1.0850000381469727,
                    1.5049999952316284, 3.755000114440918, 5.304999828338623),
        levels=(-0.003902, -0.038478, -0.083365, -0.001427, 0.097167, 0.205444, 0.319584, 0.437811,
                0.557237, 0.675748, 0.792449, 0.902833, 1.001427, 1.083365, 1.038478, 1.003902),
        representatives=(-7.400999546051025, -4.477999687194824, -3.1399996280670166, -1.2849994897842407,
                         -0.9209994673728943, -0.627999484539032, -0.3689994513988495, -0.12499943375587463,
                         0.1149994358420372, 0.35899946093559265, 0.6229994893074036, 0.9209994673728943,
                         1.2849994897842407, 3.1399996280670166, 4.477999687194824, 7.400999546051025),
        max_error=0.059837),
}


def derivative_bins(activation: str) -> DerivativeBins:
    """The 16-interval codebook of act' for `activation` (a key of DERIVATIVES)."""
    if activation not in DERIVATIVE_BINS:
        raise ValueError(f"no derivative bins for activation {activation!r}; known: {sorted(DERIVATIVE_BINS)}")
    return DERIVATIVE_BINS[activation]


def quantize_binned(x: Tensor, boundaries: list[float]) -> Tensor:
    """4-bit codes, how many of `boundaries` (increasing, at most 15) each element
    of x exceeds (nan: 0), flattened and packed two per byte by pack_nibbles.
    Compared in float32 or wider, so codes are exact for float32 boundaries."""
    _check_float_dtype("x.dtype", x.dtype)
    if len(boundaries) > 15:
        raise ValueError(f"4-bit codes hold at most 15 boundaries, got {len(boundaries)}")
    wide = x.contiguous().to(torch.promote_types(x.dtype, torch.float32))
    # Counted in int32: inductor's CPU code adds uint8 tensors element by element
    # (tiny BERT's GELU input: 4.8 ms), int32 in vector lanes (86 us).
    codes = torch.zeros_like(wide, dtype=torch.int32)
    for bound in boundaries:
        codes = codes + (wide > bound).to(torch.int32)
    return pack_nibbles(codes.to(torch.uint8))


def dequantize_binned(q: Tensor, values: list[float], shape: list[int], dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_binned as backward reads it: `values[code]` as `dtype`, shaped `shape`."""
    _check_float_dtype("dtype", dtype)
    _check_codes(q, 4, shape)
    if not 1 <= len(values) <= 16:
        raise ValueError(f"4-bit codes index 1 to 16 values, got {len(values)}")
    # Compared as float32, for the same reason as quantize_binned (1.2 ms as uint8, 83 us).
    codes = unpack_nibbles(q, math.prod(shape)).to(torch.float32)
    out = torch.full_like(codes, values[-1])
    for code, value in enumerate(values[:-1]):
        out = torch.where(codes == code, value, out)
    return out.to(dtype).reshape(shape)


# ---- float8 ---------------------------------------------------------------------
# One byte as float8 e4m3 (torch.float8_e4m3fn): 3 mantissa bits, so values keep
# their relative precision whatever their size. A GELU's output is mostly small
# with a tail past 20: the paper's Q3.4 clips the tail at 7.94 and rounds the
# bulk to 1/16 (MiniLM's GELU outputs come back at 16-24 dB), e4m3 keeps both
# (31.5 dB), in the same byte and with no scale. Stored as its bits in uint8.

FLOAT8_MAX = 448.0  # e4m3fn's largest finite value; it has no inf


def quantize_float8(x: Tensor) -> Tensor:
    """x as float8 e4m3, rounded to nearest even, as uint8 bits of x's shape.
    Values past +-448 and +-inf saturate to +-448; nan stays nan."""
    _check_float_dtype("x.dtype", x.dtype)
    return x.contiguous().clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize_float8(q: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_float8: the e4m3 values as `dtype` (exact in fp32, fp16 and bf16)."""
    _check_float_dtype("dtype", dtype)
    _check_codes(q, 8, shape)
    return q.reshape(shape).view(torch.float8_e4m3fn).to(dtype)


# ---- row-wise scale -----------------------------------------------------------
# Symmetric, one fp32 scale per last-dim row, scale = max|x| / qmax (not rounded
# to a power of two): rounding the scale up would cost ~3 dB of SQNR on average
# and up to 6 dB (one bit) on some rows, and the point of this option is numerics better than the
# scale-free format. The scale is fp32 (4 bytes a row) because fp16 cannot hold
# max|x| / 127 for the tiny or huge rows an fp32 model can produce. Codes span
# -qmax..qmax (the most negative code stays unused) so zero and sign are exact.


def _rowwise_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _rows_shape(shape: Sequence[int]) -> tuple[int, ...]:
    # A 0-d tensor is one row of one element.
    return tuple(shape) if len(shape) else (1,)


def _scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (*_rows_shape(shape)[:-1], 1)


def quantize_rowwise(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row codes and fp32 scales: q = round(x / scale), scale = max|x| / qmax.

    Returns (q, scale). 8 bits: int8 codes in [-127, 127], shape of x. 4 bits:
    codes in [-7, 7] offset by +8 and packed flat two per byte (uint8,
    ceil(numel / 2) bytes). scale is fp32 of shape (*x.shape[:-1], 1); a 0-d x
    is one row, scale shape (1,). The row maximum ignores nan and inf; +-inf
    saturate to +-qmax (so they come back as +-max finite |x| of the row), nan
    becomes code 0. An all-zero row keeps scale 2**-126 and codes 0.
    """
    _check_bits(bits)
    _check_float_dtype("x.dtype", x.dtype)
    qmax = _rowwise_qmax(bits)
    # fp32 arithmetic: an fp16 max|x| / 127 can underflow.
    rows = x.contiguous().to(torch.float32).reshape(_rows_shape(x.shape))
    if rows.shape[-1]:
        finite_abs = rows.abs().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        amax = finite_abs.amax(dim=-1, keepdim=True)
    else:
        amax = rows.new_zeros(_scale_shape(x.shape))
    scale = (amax / qmax).clamp_min_(torch.finfo(torch.float32).tiny)
    codes = (rows / scale).nan_to_num_(nan=0.0).round_().clamp_(-qmax, qmax)
    if bits == 4:
        return pack_nibbles((codes + 8).to(torch.uint8)), scale
    return codes.to(torch.int8).reshape(x.shape), scale


def dequantize_rowwise(
    q: Tensor, scale: Tensor, bits: int, shape: list[int], dtype: torch.dtype
) -> Tensor:
    """Inverse of quantize_rowwise: codes * scale, computed in fp32, as `dtype`."""
    _check_bits(bits)
    _check_float_dtype("dtype", dtype)
    _check_codes(q, bits, shape)
    if bits == 4:
        codes = unpack_nibbles(q, math.prod(shape)).to(torch.float32) - 8
    else:
        codes = q.to(torch.float32)
    out = codes.reshape(_rows_shape(shape)) * scale
    return out.to(dtype).reshape(shape)


# ---- top-k pruning ------------------------------------------------------------
# Per last-dim row, not global: topk over rows is cheaper than one topk over the
# whole tensor, row indices always fit int32, and the kept count depends only on
# the row length. The paper prunes LayerNorm outputs, whose rows are normalized
# to the same scale, so per-row and global keep nearly the same entries.


def kept_per_row(row_length, keep_ratio: float):
    """ceil(keep_ratio * row_length), with keep_ratio taken to 1e-6; works on SymInts."""
    ppm = round(keep_ratio * _PPM)
    return (ppm * row_length + _PPM - 1) // _PPM


def _check_keep_ratio(keep_ratio: float) -> None:
    if not 1 / _PPM <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio!r} must be in [{1 / _PPM}, 1]")


# Indices count within a row. The caller picks their width (index_bits 16 or 32)
# rather than the kernel from the row length, so the fake kernel never guards on
# a symbolic row length; a row too long for the width is refused, never wrapped.
INDEX_DTYPES = {16: torch.int16, 32: torch.int32}
MAX_PRUNED_ROW = {bits: torch.iinfo(dtype).max + 1 for bits, dtype in INDEX_DTYPES.items()}


def index_bits_for(row_length: int) -> int:
    """The narrowest index width prune_topk accepts for rows of `row_length`."""
    return next((bits for bits, most in sorted(MAX_PRUNED_ROW.items()) if row_length <= most), 32)


def _check_index_bits(index_bits: int) -> None:
    if index_bits not in INDEX_DTYPES:
        raise ValueError(f"index_bits={index_bits!r} must be one of {tuple(INDEX_DTYPES)}")


def prune_topk(x: Tensor, keep_ratio: float, index_bits: int = 32) -> tuple[Tensor, Tensor]:
    """The kept_per_row(n, keep_ratio) largest-|x| entries of each last-dim row.

    Returns (values, indices), both of shape (*x.shape[:-1], k): values in x's
    dtype, indices into the row as int16 or int32 (`index_bits`; rows of up to
    2**15 or 2**31 elements), in no particular order within a row.
    A 0-d x is one row. nan ranks above every number (torch.topk's order) and
    is kept as nan, inf as inf; ties are broken arbitrarily.
    """
    _check_keep_ratio(keep_ratio)
    _check_index_bits(index_bits)
    _check_float_dtype("x.dtype", x.dtype)
    rows = x.contiguous().reshape(_rows_shape(x.shape))
    n = rows.shape[-1]
    if n > MAX_PRUNED_ROW[index_bits]:
        raise ValueError(f"x.shape[-1]={n} is too long to prune with index_bits={index_bits}; "
                         f"at most {MAX_PRUNED_ROW[index_bits]} (index_bits=32 takes up to "
                         f"{MAX_PRUNED_ROW[32]})")
    _, indices = rows.abs().topk(kept_per_row(n, keep_ratio), dim=-1, sorted=False)
    return rows.gather(-1, indices), indices.to(INDEX_DTYPES[index_bits])


def unprune_topk(
    values: Tensor, indices: Tensor, shape: list[int], dtype: torch.dtype
) -> Tensor:
    """Inverse of prune_topk: a `dtype` tensor of `shape`, zero except at the kept entries."""
    _check_float_dtype("dtype", dtype)
    out = values.new_zeros(_rows_shape(shape), dtype=dtype)
    out.scatter_(-1, indices.contiguous().to(torch.int64), values.contiguous().to(dtype))
    return out.reshape(shape)


def positive_mask(x: Tensor) -> Tensor:
    """x > 0, packed eight elements to a byte as pack_bits packs it: all a ReLU's
    backward reads of its output (its gradient passes where the output is
    positive), a thirty-second of fp32's bytes."""
    _check_float_dtype("x.dtype", x.dtype)
    return pack_bits(x > 0)


def from_positive_mask(packed: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """Inverse of positive_mask as a ReLU's backward sees it: 1 where x > 0, else 0."""
    _check_float_dtype("dtype", dtype)
    return unpack_bits(packed, shape, torch.bool).to(dtype)


def compressed_nbytes(tensors: Tensor | Sequence[Tensor]):
    """Bytes held by what a quantize_*/prune_* returned (real or fake tensors;
    a SymInt expression for symbolic sizes). Compare with x.numel() * x.element_size()."""
    if isinstance(tensors, Tensor):
        tensors = (tensors,)
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- custom ops -----------------------------------------------------------------
# torch.ops.slimfit.<name> is what a graph pass inserts: one opaque node whose
# output metadata comes from the fake kernel below, so inductor calls the eager
# kernel above instead of tracing into it. No autograd is registered: the ops
# run inside already-partitioned forward/backward graphs, and every output
# except dequantized/unpruned tensors is integer.


# Each op's plain-torch kernel, by overload: compiling for inductor, the passes'
# nodes are traced into these aten ops so inductor fuses them into their
# neighbours' kernels (an opaque op would run this Python once per call, with a
# full pass over memory per line). The graphs users print keep the slimfit ops.
KERNELS: dict = {}


def _register(fn, fake) -> None:
    op = torch.library.custom_op(f"slimfit::{fn.__name__}", fn, mutates_args=())
    op.register_fake(fake)
    KERNELS[getattr(torch.ops.slimfit, fn.__name__).default] = fn


def _fake_quantize_fixed(x, bits, frac_bits, signed):
    FixedPoint(bits, frac_bits, signed)
    if bits == 4:
        return x.new_empty((_packed_numel(x.numel()),), dtype=torch.uint8)
    return x.new_empty(x.shape, dtype=_code_dtype(signed))


def _fake_dequantize_fixed(q, bits, frac_bits, signed, shape, dtype):
    FixedPoint(bits, frac_bits, signed)
    return q.new_empty(shape, dtype=dtype)


def _fake_quantize_binned(x, boundaries):
    return x.new_empty((_packed_numel(x.numel()),), dtype=torch.uint8)


def _fake_dequantize_binned(q, values, shape, dtype):
    return q.new_empty(shape, dtype=dtype)


def _fake_quantize_float8(x):
    return x.new_empty(x.shape, dtype=torch.uint8)


def _fake_dequantize_float8(q, shape, dtype):
    return q.new_empty(shape, dtype=dtype)


def _fake_quantize_rowwise(x, bits):
    _check_bits(bits)
    if bits == 4:
        q = x.new_empty((_packed_numel(x.numel()),), dtype=torch.uint8)
    else:
        q = x.new_empty(x.shape, dtype=torch.int8)
    return q, x.new_empty(_scale_shape(x.shape), dtype=torch.float32)


def _fake_dequantize_rowwise(q, scale, bits, shape, dtype):
    _check_bits(bits)
    return q.new_empty(shape, dtype=dtype)


def _fake_prune_topk(x, keep_ratio, index_bits=32):
    _check_keep_ratio(keep_ratio)
    _check_index_bits(index_bits)
    rows_shape = _rows_shape(x.shape)
    kept_shape = (*rows_shape[:-1], kept_per_row(rows_shape[-1], keep_ratio))
    return x.new_empty(kept_shape), x.new_empty(kept_shape, dtype=INDEX_DTYPES[index_bits])


def _fake_unprune_topk(values, indices, shape, dtype):
    return values.new_empty(shape, dtype=dtype)


def _fake_positive_mask(x):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _fake_from_positive_mask(packed, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _fake_pack_bits(mask):
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


def _fake_unpack_bits(packed, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


_register(pack_bits, _fake_pack_bits)
_register(unpack_bits, _fake_unpack_bits)
_register(quantize_fixed, _fake_quantize_fixed)
_register(dequantize_fixed, _fake_dequantize_fixed)
_register(quantize_binned, _fake_quantize_binned)
_register(dequantize_binned, _fake_dequantize_binned)
_register(quantize_float8, _fake_quantize_float8)
_register(dequantize_float8, _fake_dequantize_float8)
_register(quantize_rowwise, _fake_quantize_rowwise)
_register(dequantize_rowwise, _fake_dequantize_rowwise)
_register(prune_topk, _fake_prune_topk)
_register(unprune_topk, _fake_unprune_topk)
_register(positive_mask, _fake_positive_mask)
_register(from_positive_mask, _fake_from_positive_mask)
