"""Optimizer state of frozen layers, held small while they stay frozen.

After each optimizer step the moments of layers frozen for the next step are
packed (bf16, blockwise int8, or moved to pinned host memory); before a step
they are unpacked for every parameter that has a gradient. The optimizer's own
math is untouched, and `optimizer.state_dict()` always returns plain tensors.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from . import host
from .errors import SlimFitError
from .shards import is_dtensor, local

# State entries packed, and the int8 code each takes (see CODES below): Adam's
# moments on log scales, SGD's momentum linear. Every other entry (Adam's `step`,
# unknown optimizers' state) stays as the optimizer keeps it.
INT8_CODE = {"exp_avg": "signed_log", "exp_avg_sq": "sqrt_log", "max_exp_avg_sq": "sqrt_log",
             "momentum_buffer": "signed_linear"}
# Small tensors stay plain (as in torchao's 8-bit optimizers): the scales and the
# per-tensor bookkeeping would outweigh what packing saves.
MIN_PACKED_NUMEL = 4096
BLOCK = 256
# Every int8 code has one float32 scale per block of 256 elements.
#
# "signed_linear" (SGD momentum, whose update is the momentum itself): codes in
# [-127, 127] times absmax / 127, the scale rounded up to 17 significant bits so
# code * scale is exact in float32 (7 + 17 <= 24 bits): packing what unpacking
# returned gives the same codes and scales, so a state that went through
# state_dict() and load_state_dict() unpacks to the same values.
SIGNED_MAX = 127
SCALE_BITS = 17
# "signed_log" (Adam's exp_avg): sign and |m| on a log scale below the block's
# absmax, SIGNED_LEVELS codes per octave. Adam's update is m / sqrt(v), which
# weighs every element alike whatever its size, so the error that matters is
# relative per element: within 2**(1 / (2 * SIGNED_LEVELS)) - 1 (4.4%) down to
# 2**(-126 / SIGNED_LEVELS) (~2e-5) of the absmax; smaller entries become 0 (their
# update shrinks, never grows). A linear code keeps only absmax / 254, so a small
# entry's update is off by up to 100%.
SIGNED_LEVELS = 8
# "sqrt_log" (exp_avg_sq): sqrt(v) on a log scale, LEVELS codes per octave below
# the block's largest sqrt(v); code 0 is exactly 0. Adam divides by sqrt(v) + eps,
# so this bounds the denominator's relative error (2**(1 / (2 * LEVELS)) - 1,
# 3.5%) whatever the block's spread, where a linear code would round small
# entries to 0 and blow their updates up. Entries more than 2**(254 / LEVELS)
# (~4e7) below the block's largest sqrt(v) take the smallest code, so they are
# only ever over-estimated: an update can shrink by it, never grow.
LEVELS = 10
# The scale is the block's absmax itself and the top code's value is exactly 1,
# so both log codes re-pack to the same codes too.
_SQRT_TABLE = torch.cat([torch.zeros(1), torch.exp2((torch.arange(1, 256, dtype=torch.float32) - 255) / LEVELS)])
_SIGNED_TABLE = torch.cat([torch.zeros(1), torch.exp2(
    (torch.arange(1, 128, dtype=torch.float32) - 127) / SIGNED_LEVELS)])
# sign(code) * _SIGNED_TABLE[|code|] by the code's byte read as uint8 (two's
# complement: 128..255 are -128..-1; -128 is never written): one lookup unpacks.
_SIGNED_BYTE_TABLE = torch.cat([_SIGNED_TABLE, torch.zeros(1), -_SIGNED_TABLE[1:].flip(0)])
_TINY = torch.finfo(torch.float32).tiny
_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A code table on `device`, copied there once."""
    key = (name, device)
    if key not in _tables:
        _tables[key] = {"sqrt": _SQRT_TABLE, "signed": _SIGNED_BYTE_TABLE}[name].to(device)
    return _tables[key]


# Packing frees the float moments it packs, and unpacking allocates them again
# when the layer trains. On the host, glibc serves those from its heap and keeps
# the pages they free resident, so over hundreds of steps the process grows past
# what keeping the state whole costs (MiniLM on BBC News, 3 epochs: peak RSS +70
# MiB on average over 6 seeds). Once this many bytes were freed by packing, the
# heap's free pages go back to the kernel (host.trim_heap; about 25 ms on that
# run's heap, every few steps). A GPU's caching allocator keeps its blocks anyway.
TRIM_AFTER_BYTES = 32 * 2**20

# Blocks per pass: packing a 90 MiB embedding's moments adds a few MiB of
# temporaries (1M elements at a time), not float32 copies of the whole tensor.
CHUNK_BLOCKS = 4096


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """A flat float tensor as rows of BLOCK, zero-padded, in float32 (a view of
    a float32 `flat` of whole blocks: the block functions never write to it)."""
    pad = -flat.numel() % BLOCK
    flat = flat.float()
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, BLOCK)


def _quantize(x: torch.Tensor, quantize_blocks, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1)
    count = -(-flat.numel() // BLOCK)
    if count <= CHUNK_BLOCKS:  # one pass: its codes and scales are the result
        return quantize_blocks(_blocks(flat))
    codes = torch.empty(count, BLOCK, dtype=code_dtype, device=x.device)
    scale = torch.empty(count, dtype=torch.float32, device=x.device)
    for first in range(0, count, CHUNK_BLOCKS):
        last = min(first + CHUNK_BLOCKS, count)
        codes[first:last], scale[first:last] = quantize_blocks(_blocks(flat[first * BLOCK:last * BLOCK]))
    return codes, scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                dequantize_blocks) -> torch.Tensor:
    numel = math.prod(shape)
    if codes.shape[0] <= CHUNK_BLOCKS and numel == codes.numel():  # one pass, no padding to cut off
        return dequantize_blocks(codes, scale).to(dtype).view(shape)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    for first in range(0, codes.shape[0], CHUNK_BLOCKS):
        last = min(first + CHUNK_BLOCKS, codes.shape[0])
        values = dequantize_blocks(codes[first:last], scale[first:last]).reshape(-1)
        out[first * BLOCK:last * BLOCK] = values[:numel - first * BLOCK]
    return out.view(shape)


def _quantize_signed_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = blocks.abs().amax(dim=1) / SIGNED_MAX
    mantissa, exponent = torch.frexp(scale)
    scale = torch.ceil(mantissa * 2**SCALE_BITS) / 2**SCALE_BITS * torch.exp2(exponent.float())
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: codes 0
    codes = torch.round(blocks / scale[:, None]).clamp_(-SIGNED_MAX, SIGNED_MAX).to(torch.int8)
    return codes, scale


# The block functions below run in place on their own temporaries: on a small
# model a step packs a few tensors of a few thousand elements, and the cost is
# the count of ops, not their arithmetic.
def _quantize_sqrt_log_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = blocks.sqrt()
    scale = root.amax(dim=1)
    ratio = root.div_(scale.clamp_min(_TINY)[:, None])
    zero = ratio == 0
    codes = ratio.log2_().mul_(LEVELS).add_(255).round_().clamp_(1, 255).masked_fill_(zero, 0)
    return codes.to(torch.uint8), scale


def _quantize_signed_log_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    magnitude = blocks.abs()
    scale = magnitude.amax(dim=1)
    ratio = magnitude.div_(scale.clamp_min(_TINY)[:, None])
    codes = ratio.log2_().mul_(SIGNED_LEVELS).add_(127).round_().clamp_(0, 127)  # log2(0) = -inf -> 0
    return codes.mul_(blocks.sign()).to(torch.int8), scale


def quantize_signed_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (blocks of 256, the last zero-padded) and one float32 scale per
    block; |x - dequantized| <= scale / 2 <= absmax(block) / 254 * (1 + 2**-16)."""
    return _quantize(x, _quantize_signed_blocks, torch.int8)


def dequantize_signed_int8(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size,
                           dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(codes, scale, shape, dtype, lambda c, s: c.float() * s[:, None])


def quantize_signed_log8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of sign(x) and log|x| (see SIGNED_LEVELS) and each block's absmax
    as its float32 scale."""
    return _quantize(x, _quantize_signed_log_blocks, torch.int8)


def dequantize_signed_log8(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size,
                           dtype: torch.dtype) -> torch.Tensor:
    table = _table("signed", codes.device)
    return _dequantize(codes, scale, shape, dtype, lambda c, s: table[c.view(torch.uint8).long()] * s[:, None])


def quantize_sqrt_log8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of sqrt(v) on a log scale (see LEVELS) and each block's largest
    sqrt(v) as its float32 scale; v must be non-negative."""
    return _quantize(v, _quantize_sqrt_log_blocks, torch.uint8)


def dequantize_sqrt_log8(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size,
                         dtype: torch.dtype) -> torch.Tensor:
    table = _table("sqrt", codes.device)
    return _dequantize(codes, scale, shape, dtype, lambda c, s: (table[c.long()] * s[:, None]).square())


INT8_CODES = {
    "signed_linear": (quantize_signed_int8, dequantize_signed_int8),
    "signed_log": (quantize_signed_log8, dequantize_signed_log8),
    "sqrt_log": (quantize_sqrt_log8, dequantize_sqrt_log8),
}


@dataclass(frozen=True)
class Sharding:
    """How a DTensor (fully_shard) spreads over ranks: a packed state holds this
    rank's shard, and unpacking wraps it back, with no collective."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]

    def wrap(self, shard: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(shard, self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=self.stride)


@dataclass
class PackedState:
    """One optimizer state tensor held small while its layer is frozen; of a
    DTensor, this rank's shard (`shape` is the shard's)."""

    format: str  # "bf16", "int8" or "offload"
    parts: tuple[torch.Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    code: str = ""  # for "int8": a key of INT8_CODES
    sharding: Sharding | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)

    @property
    def plain_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def unpack(self) -> torch.Tensor:
        if self.format == "bf16":
            shard = self.parts[0].to(self.dtype)
        elif self.format == "offload":
            shard = self.parts[0].to(self.device, non_blocking=True)
        else:
            shard = INT8_CODES[self.code][1](*self.parts, self.shape, self.dtype)
        return shard if self.sharding is None else self.sharding.wrap(shard)


def pack(t: torch.Tensor, format: str, code: str = "signed_linear") -> PackedState:
    """`t` held as `format` ("int8" in the INT8_CODES `code`); `PackedState.unpack`
    gives it back (exactly for "offload"). A DTensor packs its local shard."""
    if is_dtensor(t):
        shard = pack(t.to_local(), format, code)
        shard.sharding = Sharding(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))
        return shard
    if format == "bf16":
        parts = (t.to(torch.bfloat16),)
    elif format == "int8":
        parts = INT8_CODES[code][0](t)
    elif format == "offload":
        if t.device.type != "cuda":
            raise SlimFitError(_offload_needs_cuda(t.device))
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        parts = (host.copy_(t, non_blocking=True),)
    else:
        raise ValueError(f"no optimizer state format {format!r}; the formats are 'bf16', 'int8', 'offload'")
    return PackedState(format, parts, t.shape, t.dtype, t.device, code if format == "int8" else "")


def _offload_needs_cuda(device: torch.device) -> str:
    return (f"optimizer_state='offload' moves frozen layers' optimizer state from GPU memory to "
            f"pinned host memory, but this model's parameters are on {device.type}, whose memory is "
            "host memory already. Fix: move the model to a CUDA device before slimfit_fx.compile "
            "(model.cuda()), or use optimizer_state='int8' (or 'bf16') to shrink the state where it is")


def check_offload(parameters: Mapping[str, torch.Tensor]) -> None:
    """Refuse optimizer_state='offload' for a model with no CUDA parameter."""
    devices = {p.device for p in parameters.values()}
    if not any(d.type == "cuda" for d in devices):
        raise SlimFitError(_offload_needs_cuda(next(iter(devices), torch.device("cpu"))))


# Bytes per element a format holds; a state already that small stays as it is.
PACKED_ITEMSIZE = {"bf16": 2, "int8": 1, "offload": 0}


def _packable(key: str, value: object, format: str) -> bool:
    # Plain tensors and DTensors (fully_shard) whose shard is plain, judged by the
    # shard this rank holds; a tensor subclass an optimizer keeps (torchao's 8-bit
    # states) stays as it is.
    if key not in INT8_CODE or not isinstance(value, torch.Tensor):  # packed already, or `step`
        return False
    if is_dtensor(value):
        value = value.to_local()
    return (type(value) is torch.Tensor
            and value.is_floating_point() and value.numel() >= MIN_PACKED_NUMEL
            and value.element_size() > PACKED_ITEMSIZE[format])


def moment_nbytes(numel: int, itemsize: int, format: str) -> int:
    """Bytes one floating state tensor of `numel` elements of `itemsize` bytes is
    held in under `format` ("full" or a packing), by the rules `pack_frozen` follows."""
    if format == "full" or numel < MIN_PACKED_NUMEL or itemsize <= PACKED_ITEMSIZE[format]:
        return numel * itemsize
    if format == "int8":
        blocks = -(-numel // BLOCK)
        return blocks * BLOCK + blocks * 4  # uint8 codes padded to whole blocks, one float32 scale each
    return numel * PACKED_ITEMSIZE[format]


# Adam and AdamW keep two moments shaped like the parameter and a 0-dim float32 step.
ADAM_MOMENTS = 2
ADAM_STEP_BYTES = 4


def adam_state_nbytes(numel: int, itemsize: int, format: str = "full") -> int:
    """Bytes torch.optim.Adam/AdamW state (amsgrad off) holds for one parameter,
    its moments held as `format` ("full" or a packing)."""
    return ADAM_MOMENTS * moment_nbytes(numel, itemsize, format) + ADAM_STEP_BYTES


def unpacked(entry: Mapping[str, object]) -> dict[str, object]:
    """One parameter's optimizer state with every packed tensor unpacked (a new dict)."""
    return {k: v.unpack() if isinstance(v, PackedState) else v for k, v in entry.items()}


@dataclass(frozen=True)
class OptimizerStateBytes:
    """Bytes of one optimizer's state (`cm.slimfit.optimizer_state_bytes`).

    held: in the parameters' memory now, packed tensors at their packed size;
    plain: what the same state takes with every tensor plain ("full");
    offloaded: moved to pinned host memory ("offload"), not in `held`;
    packed, packed_plain: the packed tensors (held on device or offloaded),
    as held now and as they would be plain.
    """

    held: int
    plain: int
    offloaded: int
    packed: int
    packed_plain: int

    def __str__(self) -> str:
        mib = 2**20
        return (f"optimizer state: {self.held / mib:.2f} MiB held, {self.plain / mib:.2f} MiB plain, "
                f"{self.offloaded / mib:.2f} MiB offloaded; packed {self.packed / mib:.2f} MiB "
                f"(plain {self.packed_plain / mib:.2f} MiB)")


def state_bytes(optimizer: torch.optim.Optimizer) -> OptimizerStateBytes:
    """Count every state tensor of `optimizer`, packed or plain."""
    held = plain = offloaded = packed = packed_plain = 0
    for entry in optimizer.state.values():
        entry_held, entry_plain = entry_bytes(entry)
        held, plain = held + entry_held, plain + entry_plain
        for value in entry.values():
            if isinstance(value, PackedState):
                packed += value.nbytes
                packed_plain += value.plain_nbytes
                offloaded += value.nbytes if value.format == "offload" else 0
    return OptimizerStateBytes(held, plain, offloaded, packed, packed_plain)


def entry_bytes(entry: Mapping[str, object]) -> tuple[int, int]:
    """One parameter's state: bytes held in the parameters' memory now (packed
    tensors at their packed size, offloaded ones not at all), and plain; of a
    DTensor, this rank's shard."""
    held = plain = 0
    for value in entry.values():
        if isinstance(value, PackedState):
            held += 0 if value.format == "offload" else value.nbytes
            plain += value.plain_nbytes
        elif isinstance(value, torch.Tensor):
            value = local(value)
            held += value.numel() * value.element_size()
            plain += value.numel() * value.element_size()
    return held, plain


def holds_any(optimizer: torch.optim.Optimizer, ids: Collection[int]) -> bool:
    """Whether `optimizer` holds a parameter whose id() is in `ids`: how each
    step hook (schedule, state store, budget, outside-graph check) tells its
    model's optimizers from others."""
    return any(id(p) in ids for g in optimizer.param_groups for p in g["params"])


class FrozenLayerState:
    """Packs and unpacks the optimizer state of one model's layers.

    `frozen()` is the frozen set the next forward uses. Driven by torch.optim's
    global step hooks (`before_step`, `after_step`); it only touches optimizers
    that hold one of `parameters` and only entries of those parameters.
    """

    def __init__(self, format: str, parameters: Mapping[str, torch.nn.Parameter],
                 frozen: Callable[[], frozenset[str]]) -> None:
        self.format = format
        self.parameters = dict(parameters)
        self.frozen = frozen
        self._param_ids = {id(p) for p in self.parameters.values()}
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._host_bytes_freed = 0  # by packing host tensors since the heap was last trimmed

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return holds_any(optimizer, self._param_ids)

    def rebind(self, parameters: Mapping[str, torch.nn.Parameter]) -> None:
        """Follow the layers to new parameter objects (fully_shard applied after
        compile); an optimizer that stepped already holds state under the old ones."""
        if any(True for _ in self._optimizers):
            raise SlimFitError(
                "the model's parameters were replaced (fully_shard after slimfit_fx.compile?) after "
                "an optimizer step, so that optimizer's state belongs to the old ones. Fix: shard "
                "before training and make the optimizer after sharding")
        self.parameters = dict(parameters)
        self._param_ids = {id(p) for p in self.parameters.values()}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer`: its state_dict() unpacks, its load_state_dict() re-packs."""
        if optimizer in self._optimizers:
            return
        self._optimizers.add(optimizer)
        ref = weakref.ref(self)

        def plain_state_dict(opt, state_dict):
            # The state entries are the optimizer's own dicts: replace them, never edit.
            state_dict["state"] = {k: unpacked(v) if any(isinstance(x, PackedState) for x in v.values())
                                   else v for k, v in state_dict["state"].items()}
            return state_dict

        def repack(opt) -> None:
            live = ref()
            if live is not None:
                live.pack_frozen(opt)

        optimizer.register_state_dict_post_hook(plain_state_dict)
        optimizer.register_load_state_dict_post_hook(repack)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unpack the state of every parameter about to train (it has a gradient)."""
        self.attach(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) not in self._param_ids:
                    continue
                entry = optimizer.state.get(p)
                if entry:
                    entry.update(unpacked(entry))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Pack the state of the layers frozen for the next step, in every watched
        optimizer (an update that steps several optimizers may change the set
        after the first one stepped)."""
        for opt in list(self._optimizers):
            self.pack_frozen(opt)
        if self._host_bytes_freed >= TRIM_AFTER_BYTES:
            host.trim_heap()
            self._host_bytes_freed = 0

    def pack_frozen(self, optimizer: torch.optim.Optimizer) -> None:
        if self.format == "full":  # switched off (a memory budget's later choice): pack nothing more
            return
        frozen = [self.parameters[n] for n in self.frozen() if n in self.parameters]
        for p in frozen:
            entry = optimizer.state.get(p)
            if not entry:
                continue
            for key, value in list(entry.items()):
                if _packable(key, value, self.format):
                    entry[key] = pack(value, self.format, INT8_CODE[key])
                    if value.device.type == "cpu":
                        self._host_bytes_freed += entry[key].plain_nbytes
