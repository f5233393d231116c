"""Fit a run into SlimFitConfig.memory_budget, and measure the peak it reached.

From the first training forward on, when shapes are known, `FitToBudget`
gathers the terms of `budget.predict` from the live model (parameter sizes, the regions'
measured saved and stashed bytes, the compiled stash shapes where a layer has
not trained yet, the process's residue) and
applies what `budget.choose` returns: the schedule's freeze ratio, its cap on
what trains at once (`budget.admits`) and the optimizer-state packing. It never
picks a frozen set itself.
"""
from __future__ import annotations

import dataclasses
import gc
import re
import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import budget
from .host import trim_heap
from .optimizer_state import adam_state_nbytes, entry_bytes, holds_any
from .shards import local

if TYPE_CHECKING:
    from .engine import CapturedGraph, StepRecord
    from .module import SlimFit

_STATUS = Path("/proc/self/status")
# Backward holds gradients of activations the size of the largest tensor saved
# for backward, while freeing what it read: this many at once (docs/budget.md).
BACKWARD_TRANSIENTS = 2
# The forward whose residue makes the final choice: the first one's includes
# compiling's garbage (MiniLM on CPU: 185 MiB after the third forward against
# 227 MiB after the first; still 112 MiB at later steps' starts, a gap neither
# a full collection nor malloc_trim closes, so the prediction is high by it).
CHOOSE_AT = 3


def host_rss() -> int:
    """The process's resident set size now, in bytes (0 where /proc is absent)."""
    try:
        return int(re.search(r"VmRSS:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def host_peak() -> int:
    """The process's highest resident set size since the last `reset_host_peak`."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_host_peak() -> bool:
    """Set the kernel's high-water mark (VmHWM) to the resident size now; False
    where the kernel offers no reset (the peak then spans the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMeter:
    """The peak of training memory from the third training forward on (the
    first compiles, the final choice is made at the third): on a GPU torch.cuda.max_memory_allocated; on the host the
    process's peak resident size above its size at compile, plus the weights
    (resident then)."""

    device: torch.device
    weights: int
    rss_at_compile: int
    started: bool = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # A process that gave memory back since compiling (an earlier job's
            # freed heap trimmed) sits below its size then: measure from here
            # instead, or the peak would read less than the weights alone.
            self.rss_at_compile = min(self.rss_at_compile, host_rss())
            reset_host_peak()
        self.started = True

    def peak(self) -> int | None:
        if not self.started:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return host_peak() - self.rss_at_compile + self.weights


class FitToBudget:
    """Chooses the freeze ratio and optimizer-state packing of one compiled model
    at its first training forwards (for good at CHOOSE_AT); measures the peak
    from there on."""

    def __init__(self, slimfit: "SlimFit", memory_budget: int,
                 start_optimizer_state: Callable[[str], None]) -> None:
        self.slimfit = slimfit
        self.memory_budget = memory_budget
        self.start_optimizer_state = start_optimizer_state
        params = list(slimfit.model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        weights = weight_bytes(slimfit.model)
        if self.device.type == "cpu":
            _page_in(slimfit.model)
        self.meter = PeakMeter(self.device, weights, host_rss())
        self.prediction: budget.Prediction | None = None
        self.terms_used: budget.BudgetTerms | None = None  # what the prediction was made from
        self.residue: int | None = None  # the host's resident growth no tensor explains, at the choice
        # The largest prediction for the set a forward ran with, over the
        # forwards the meter measures: what the sets that trained were predicted
        # to need, where `prediction.peak` bounds any set the cap admits.
        self.sets_peak: int | None = None
        self.forwards = 0
        # per layer, the stash a forward measured it holding (StepRecord.stash_by_layer)
        self.measured_stash: dict[str, int] = {}
        self._param_ids = {id(p) for p in params}
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

    def rebind(self) -> None:
        """Follow the model to new parameter objects (fully_shard after compile)."""
        self._param_ids = {id(p) for p in self.slimfit.model.parameters()}

    # -- optimizer hooks (slimfit_fx.module._on_optimizer_steps): which optimizers hold state

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return holds_any(optimizer, self._param_ids)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.add(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    @property
    def choosing(self) -> bool:
        """Whether the next training forward still chooses (and measures the stash)."""
        return self.forwards < CHOOSE_AT

    def after_training_forward(self, graph: "CapturedGraph", record: "StepRecord") -> None:
        """The first forward chooses with the residue compiling left then (partly
        garbage later steps free: the choice errs on the safe side); the next
        ones choose again with the residue of compiled steps, for good at
        CHOOSE_AT, from which on the peak is measured."""
        self.forwards += 1
        if self.forwards > CHOOSE_AT:
            self._predict_ran_set()
            return
        self.residue = self.first_residue(record) if self.forwards == 1 else self.steady_residue(record)
        self.measured_stash.update(record.stash_by_layer)
        self.terms_used = terms = _agreed(self.terms(graph, record), self.device)
        packings = self.packings()
        try:
            prediction = budget.choose(terms, self.memory_budget, packings)
        except budget.BudgetError:
            # Before the final choice the residue may still shrink: raise only if
            # even none at all would leave room.
            bare = budget.floor_of(dataclasses.replace(terms, overhead=0), packings)
            if self.forwards == CHOOSE_AT or bare.peak > self.memory_budget:
                raise
            prediction = budget.floor_of(terms, packings)
        self.apply(prediction)
        if self.forwards == CHOOSE_AT:
            self.meter.start()
            self._predict_ran_set()

    def _predict_ran_set(self) -> None:
        """Keep the largest predicted peak of the set this forward ran with."""
        frozen = self.slimfit.frozen
        training = [layer for layer in self.terms_used.layers if layer.name not in frozen]
        peak = budget.predict_set(self.terms_used, training, self.prediction.optimizer_state_packing).peak
        self.sets_peak = peak if self.sets_peak is None else max(self.sets_peak, peak)

    def packings(self) -> tuple[str, ...]:
        configured = self.slimfit.config.optimizer_state
        ladder = budget.PACKINGS + (("offload",) if self.device.type == "cuda" else ())
        return ladder[ladder.index(configured):] if configured in ladder else (configured,)

    def terms(self, graph: "CapturedGraph", record: "StepRecord") -> budget.BudgetTerms:
        slimfit = self.slimfit
        schedule = slimfit.schedule
        params = dict(slimfit.model.named_parameters())
        # Measured where a forward stashed a layer's operands: what they keep,
        # each storage once, free where a region saves it anyway or it is a graph
        # input, a view's whole storage; else from the compiled shapes.
        stash = {**graph.stash_bytes_by_layer(), **self.measured_stash}
        candidates = [n for n in schedule.scheduled if n not in schedule.always_train]
        layers = tuple(budget.LayerTerms(
            name=n, gradient=_nbytes(params[n]), stash=stash.get(n, 0),
            state={p: adam_state_nbytes(params[n].numel(), params[n].element_size(), p)
                   for p in (*budget.PACKINGS, "offload")})
            for n in candidates)
        scheduled = set(candidates)
        always = [p for n, p in params.items() if p.requires_grad and n not in scheduled
                  and (n not in slimfit.layers or n in schedule.always_train)]
        always_stash = sum(stash.get(n, 0) for n in schedule.always_train)
        static = record.saved_bytes - record.stash_bytes
        largest_saved = max((t.nbytes or 0 for t in record.saved_tensors()), default=0)
        return budget.BudgetTerms(
            weights=self.meter.weights,
            gradients=sum(_nbytes(p) for p in always),
            state=sum(adam_state_nbytes(p.numel(), p.element_size()) for p in always),
            saved=static + always_stash,
            overhead=self.residue,
            layers=layers,
            backward_transients=BACKWARD_TRANSIENTS * largest_saved,
            largest_always=max((_nbytes(p) for p in always), default=0))

    def first_residue(self, record: "StepRecord") -> int:
        """Host memory grown since compile that no tensor the prediction counts
        explains, right after the first forward (compiling included)."""
        if self.device.type == "cuda":
            return 0
        _release_free_heap()
        return max(host_rss() - self.meter.rss_at_compile - record.saved_bytes, 0)

    def steady_residue(self, record: "StepRecord") -> int:
        """The same after the second forward: compiled code, Python objects and
        the allocator's own, beside saved tensors, gradients and the optimizer
        state of the optimizers that stepped (state made before compile is in
        the baseline, so it is not subtracted twice)."""
        if self.device.type == "cuda":
            return 0
        _release_free_heap()
        params = list(self.slimfit.model.parameters())
        grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        state = sum(entry_bytes(s)[0] for opt in self._optimizers for p, s in opt.state.items()
                    if id(p) in self._param_ids)
        return max(host_rss() - self.meter.rss_at_compile - record.saved_bytes - grads - state, 0)

    def apply(self, prediction: budget.Prediction) -> None:
        """Put `prediction` in force (made from `terms_used`): the one writer of
        the choice the report shows and the schedule follows."""
        self.prediction = prediction
        self.sets_peak = None
        # Takes effect at the schedule's next choice: the set this forward ran
        # with decides which gradients its optimizer step keeps.
        schedule = self.slimfit.schedule
        schedule.freeze_ratio = prediction.freeze_ratio
        schedule.admits = budget.admits(self.terms_used, prediction)
        self.start_optimizer_state(prediction.optimizer_state_packing)


def _agreed(terms: budget.BudgetTerms, device: torch.device) -> budget.BudgetTerms:
    """`terms` with what each rank measured (saved bytes, residue, stashes) at
    its largest over the ranks, under torch.distributed: every rank then makes
    the same choice and caps each step the same way, so DDP and FSDP ranks keep
    training the same layers (one all_reduce of a few numbers, at each of the
    first CHOOSE_AT forwards)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return terms
    fields = ("weights", "gradients", "state", "saved", "overhead", "backward_transients", "largest_always")
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([getattr(terms, f) for f in fields] + [layer.stash for layer in terms.layers],
                          dtype=torch.int64, device=on)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    values = values.tolist()
    stashes = values[len(fields):]
    layers = tuple(dataclasses.replace(layer, stash=stash) for layer, stash in zip(terms.layers, stashes))
    return dataclasses.replace(terms, layers=layers, **dict(zip(fields, values)))


def _release_free_heap() -> None:
    """Collect compiling's cycles (graphs, fake tensors) and hand the heap pages
    they freed back to the kernel (glibc's malloc_trim), so the resident size
    counts what is live: later steps would reuse those pages for their own
    tensors, which the prediction counts already."""
    gc.collect()
    trim_heap()  # not glibc: the residue keeps the free pages, on the safe side


def _page_in(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once, so that the resident size taken at
    compile holds them: weights loaded from a safetensors file are often a lazy
    map of it (transformers maps float32 checkpoints), paged in only by the first
    forward, which the residue would then count a second time beside the weights."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t = local(t)  # a DTensor: this rank's shard, no collective
            if t.device.type != "cpu" or not t.numel() or not t.dtype.is_floating_point:
                continue
            # one element a page; a strided view reads all of it
            (t.view(-1)[:: max(1, 4096 // t.element_size())] if t.is_contiguous() else t).sum()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

