"""Count the bytes autograd holds from forward to backward, and break down a step's memory.

The counter runs after every training forward and in the benchmarks on eager
models, so both sides of a comparison are measured the same way. Nothing here
leaves a model changed: an eager measurement restores flags and buffers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .optimizer_state import entry_bytes


def run_counting_saved_bytes(
    fn: Callable[..., Any], *args: Any, resident: tuple[torch.Tensor, ...] = (),
    record: list[tuple[int, bool]] | None = None, held: dict[int, int] | None = None, **kwargs: Any
) -> tuple[Any, int]:
    """Run `fn(*args, **kwargs)`; return its result and the bytes saved for backward.

    Counts each distinct storage autograd packs once, except storages of tensor
    `args` and `resident` (parameters, model inputs): those are held anyway.
    `record`, if given, receives (storage bytes, is resident) per packed tensor;
    `held`, if given, receives {storage data_ptr: bytes} of what was counted, so
    a caller holding more tensors can count the union without counting one twice.
    """
    skip = {x.untyped_storage().data_ptr() for x in (*args, *resident) if isinstance(x, torch.Tensor)}
    held = {} if held is None else held

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        is_resident = storage.data_ptr() in skip
        if not is_resident:
            held[storage.data_ptr()] = storage.nbytes()
        if record is not None:
            record.append((storage.nbytes(), is_resident))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        result = fn(*args, **kwargs)
    return result, sum(held.values())


@contextlib.contextmanager
def eager_frozen(model: torch.nn.Module, frozen: Iterable[str]) -> Iterator[torch.nn.Module]:
    """`model` with the parameters named in `frozen` at requires_grad=False, the
    eager meaning of freezing; every flag is restored on exit."""
    frozen = set(frozen)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name] and name not in frozen)
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def eager_saved_bytes(model: torch.nn.Module, *args: Any,
                      frozen: Iterable[str] = (), **kwargs: Any) -> int:
    """Bytes one eager forward of `model` saves for backward, with the parameters
    named in `frozen` set to requires_grad=False for the call. The model comes back
    as it was: requires_grad flags and buffers (e.g. BatchNorm statistics) restored."""
    with buffers_restored(model), eager_frozen(model, frozen), torch.enable_grad():
        _, saved = run_counting_saved_bytes(
            model, *args, resident=(*model.parameters(), *model.buffers(), *kwargs.values()), **kwargs)
    return saved


@contextlib.contextmanager
def buffers_restored(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` whose buffers (e.g. BatchNorm statistics) are put back as they were
    on exit, for a forward run only to measure or inspect it."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class MemoryRow:
    """One component of training memory, eager full fine-tune vs slimfit, in bytes."""

    component: str
    eager: int | None
    slimfit: int | None
    eager_measured: bool
    slimfit_measured: bool


@dataclass(frozen=True)
class MemoryBreakdown:
    """Weights, gradients, optimizer state and saved activations for one step.

    A value is measured where it could be read off live tensors (or, for saved
    activations, off what autograd packed) and marked estimated where computed.
    """

    rows: tuple[MemoryRow, ...]
    # torch.cuda.max_memory_allocated for the parameters' device; None off CUDA
    peak_allocated: int | None = None

    def total(self, side: str) -> int:
        return sum(getattr(row, side) or 0 for row in self.rows)

    def __str__(self) -> str:
        def cell(value: int | None, measured: bool) -> str:
            if value is None:
                return "not measured"
            return f"{value / 2**20:10.2f} MiB" + ("" if measured else " (estimated)")

        lines = [f"{'component':<18} {'eager':>26} {'slimfit':>26}"]
        for row in self.rows:
            lines.append(f"{row.component:<18} {cell(row.eager, row.eager_measured):>26} "
                         f"{cell(row.slimfit, row.slimfit_measured):>26}")
        lines.append(f"{'total':<18} {self.total('eager') / 2**20:>22.2f} MiB "
                     f"{self.total('slimfit') / 2**20:>22.2f} MiB")
        if self.peak_allocated is not None:
            lines.append(f"{'cuda peak':<18} {'':>26} {self.peak_allocated / 2**20:>22.2f} MiB")
        return "\n".join(lines)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_breakdown(
    params: dict[str, torch.nn.Parameter], frozen: frozenset[str], saved_bytes: int | None,
    eager_saved_bytes: int | None, optimizer: torch.optim.Optimizer | None = None,
) -> MemoryBreakdown:
    """Eager full fine-tune vs slimfit with `frozen`, for the parameters `params`."""
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    weights = tensor_bytes(params.values())
    eager_grads = tensor_bytes(trainable.values())
    grads_now = [p.grad for p in trainable.values() if p.grad is not None]
    if grads_now:
        slimfit_grads, grads_measured = tensor_bytes(grads_now), True
    else:
        slimfit_grads = tensor_bytes(p for n, p in trainable.items() if n not in frozen)
        grads_measured = False
    rows = [
        MemoryRow("weights", weights, weights, True, True),
        MemoryRow("gradients", eager_grads, slimfit_grads, False, grads_measured),
    ]
    if optimizer is not None:
        ids = {id(p) for p in trainable.values()}
        # Packed state (SlimFitConfig.optimizer_state) counts at the size it is held;
        # eager's estimate scales the plain size.
        state = {id(p): entry_bytes(s) for p, s in optimizer.state.items() if id(p) in ids}
        held = sum(h for h, _ in state.values())
        stepped = [p for p in trainable.values() if id(p) in state]
        per_byte = sum(plain for _, plain in state.values()) / max(tensor_bytes(stepped), 1)  # 2.0 for Adam
        rows.append(MemoryRow("optimizer state", int(per_byte * eager_grads), held, False, True))
    rows.append(MemoryRow("saved activations", eager_saved_bytes, saved_bytes,
                          eager_saved_bytes is not None, saved_bytes is not None))
    device = next(iter(params.values())).device if params else torch.device("cpu")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return MemoryBreakdown(tuple(rows), peak)
