"""Weight gradients formed outside the compiled regions, only for layers that train.

A region's backward hands out the gradient at each tapped use's output (through
its probe input); here that gradient meets the use's stashed operands in one
traced weight-gradient graph (for a Linear: one matmul). A frozen layer's
operands are dropped as soon as its region's forward returns.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import fx

from . import capture, torch_ir
from .regions import WeightTap


def autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    """The autocast a region ran under (its uses cast their weight the same way)."""
    kind = device.type
    return (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None


def trace_weight_grad(use: fx.GraphModule, weight: torch.Tensor, operands: list[Any],
                      grad: torch.Tensor, autocast: tuple[str, torch.dtype] | None) -> fx.GraphModule:
    """The aten graph of d(use(weight, *operands))/d(weight) given the output's
    gradient, with the forward work the gradient does not read removed (a
    Linear's weight gradient needs its input, not its output). Under autocast
    the use's casts are traced too, so the gradient comes back in the weight's dtype.
    `grad` is an example of the output's gradient (real or fake); fake values with
    symbolic sizes (a region compiled with dynamic shapes) trace a graph that
    serves every size, read off its inputs at run time.

    The region's forward already ran the use: an operand the use writes to (the
    running statistics a training-mode batch_norm updates) is cloned first, so
    forming the weight gradient changes no state."""
    return _trace(use, weight, operands, grad, autocast, cloned=_written_operands(use, weight, operands, autocast))


def _tracing_mode(values: list[Any]) -> str:
    return "symbolic" if any(capture.is_symbolic(x) for x in values) else "fake"


def _autocast(autocast: tuple[str, torch.dtype] | None, device: torch.device):
    return torch.autocast(autocast[0] if autocast else device.type, dtype=autocast[1] if autocast else None,
                          enabled=autocast is not None)


def _written_operands(use: fx.GraphModule, weight: torch.Tensor, operands: list[Any],
                      autocast: tuple[str, torch.dtype] | None) -> frozenset[int]:
    """Positions of the operands `use` writes to, from a trace of its forward in
    which every write is declared."""
    with torch.no_grad(), _autocast(autocast, weight.device):
        gm = capture.make_fx(use, tracing_mode=_tracing_mode(operands),
                     decomposition_table=torch_ir.hidden_write_decompositions())(weight.detach(), *operands)
    return frozenset(i - 1 for i in torch_ir.mutated_inputs(gm) if i >= 1)  # 0: the weight


def _trace(use: fx.GraphModule, weight: torch.Tensor, operands: list[Any], grad: torch.Tensor,
           autocast: tuple[str, torch.dtype] | None, cloned: frozenset[int]) -> fx.GraphModule:
    def weight_grad(weight: torch.Tensor, *rest: Any) -> torch.Tensor:
        *operands, grad = rest
        operands = [o.clone() if i in cloned else o for i, o in enumerate(operands)]
        w = weight.detach().requires_grad_(True)
        with torch.enable_grad(), _autocast(autocast, weight.device):
            out = use(w, *operands)
        return torch.autograd.grad(out, w, grad)[0]

    inputs = [weight.detach(), *operands, grad.detach()]
    with torch.no_grad():
        gm = capture.make_fx(weight_grad, tracing_mode=_tracing_mode(inputs))(*inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _key(autocast: tuple[str, torch.dtype] | None, operands: list[Any]) -> tuple:
    return autocast, tuple(getattr(o, "dtype", None) for o in operands)


def _shapes(operands: list[Any], grad: torch.Tensor) -> tuple:
    return tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in (*operands, grad))


def weight_grad_graph(tap: WeightTap, weight: torch.Tensor, operands: list[Any], grad: torch.Tensor,
                      autocast: tuple[str, torch.dtype] | None) -> fx.GraphModule:
    """The tap's weight-gradient graph for these operand dtypes and autocast,
    traced once and kept on the tap. Traced on the region's fake values when it
    compiles (for every size, if they are symbolic); a dtype or autocast first
    seen at run time is traced on the real tensors, for their shapes only."""
    key = _key(autocast, operands)
    fake = capture.fake_mode_of([weight, *operands, grad]) is not None
    if not fake:
        traced = tap.weight_grads.get(key)
        if traced is not None:
            return traced
        key = (*key, _shapes(operands, grad))
    if key not in tap.weight_grads:
        tap.weight_grads[key] = trace_weight_grad(tap.use, weight, operands, grad, autocast)
    return tap.weight_grads[key]


class TapSlot:
    """One trainable use in one forward: the stashed operands until backward."""

    __slots__ = ("tap", "weight", "operands", "unpack", "autocast")

    def __init__(self, tap: WeightTap, weight: torch.Tensor) -> None:
        self.tap = tap
        self.weight = weight.detach()
        self.operands: list[Any] | None = None
        self.unpack = None
        self.autocast = autocast_state(weight.device)

    def weight_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.operands is None:
            raise RuntimeError(
                "slimfit_fx: a layer's weight gradient was asked for before its region's "
                "forward stashed the layer's input, or after a backward through the same "
                "graph freed it (pass retain_graph=True to every backward but the last)")
        operands = self.unpack(self.operands) if self.unpack is not None else self.operands
        if not capture.graph_is_retained():  # as autograd frees a node's saved tensors
            self.operands = None
        # traced for contiguous gradients (its views assume them); a copy only if not
        grad = grad.contiguous()
        traced = self.tap.weight_grads.get(_key(self.autocast, operands))
        if traced is None:  # a dtype or autocast the region was not compiled with
            start = time.perf_counter()
            traced = weight_grad_graph(self.tap, self.weight, operands, grad, self.autocast)
            self.tap.trace_seconds += time.perf_counter() - start
        return traced(self.weight, *operands, grad)


class TapGrad(torch.autograd.Function):
    """The probe: zeros shaped like the use's output, added to it in the region.

    Its gradient is the gradient at the use's output; with a slot (the layer
    trains) backward turns it into the weight's gradient, else drops it.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, slot: TapSlot | None,
                shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        ctx.slot = slot
        return torch.zeros((), dtype=dtype, device=anchor.device).expand(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        slot = ctx.slot
        if not capture.graph_is_retained():
            ctx.slot = None
        return (None if slot is None else slot.weight_grad(grad)), None, None, None
