"""The schedule: runs a freeze policy on every update and applies its frozen set.

It drives the policy (slimfit_fx/policies) from optimizer step hooks or
`cm.slimfit.step()`, tracks update rounds and which layers an optimizer holds,
turns `freeze_ratio` into a count, keeps the history and checks saved states.
The choice itself is the policy's. It never compiles (no frozen set costs a
compile) and reads no clock: the same seed and weights give the same sets on
any machine, and a resumed run repeats them.

For a policy that observes weight change, each trained layer's relative change
is computed where the weights live, against a copy of only the layers about to
train, freed once measured; the changes of one step reach the host together,
in one transfer.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import SlimFitError
from .optimizer_state import holds_any
from .policies.base import FreezePolicy, StepView
from .shards import is_dtensor, local


# Elements per slice in change_sum: 4 MiB of float32 per temporary.
_CHANGE_SLICE = 1 << 20


def change_sum(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """sum(|new - old| / |old|) over the elements, a 0-dim tensor on their device.

    Computed and summed in float32 (float64 for float64 weights). An element that
    did not change adds 0, also a weight that is exactly zero and stays zero
    (0/0); an element that moves off zero adds inf.
    """
    dtype = torch.float64 if new.dtype == torch.float64 else torch.float32
    old, new = old.reshape(-1), new.reshape(-1)
    total = torch.zeros((), dtype=dtype, device=new.device)
    with torch.no_grad():
        # In slices: the temporaries (the change, the scale, a mask) are a few
        # slices' worth, not 2-3 copies of the largest layer (a vocabulary-sized
        # embedding) at the optimizer step, where the step's peak is.
        for start in range(0, new.numel(), _CHANGE_SLICE):
            o, n = old[start:start + _CHANGE_SLICE], new[start:start + _CHANGE_SLICE]
            change = torch.sub(n.to(dtype), o.to(dtype)).abs_()
            scale = o.abs().to(dtype).masked_fill_(change == 0, 1)
            total += change.div_(scale).sum(dtype=dtype)
    return total


def relative_change(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """mean(|new - old| / |old|) as a 0-dim float64 tensor: `change_sum` over the
    element count."""
    return change_sum(old, new).double() / old.numel()


def _shard_groups(p: torch.Tensor) -> tuple[Any, ...]:
    """The process groups a sum over `p`'s local elements must be summed over to
    cover the whole tensor once: those of the mesh dimensions it is sharded on
    (a replicated dimension holds the same elements on every rank). () for a
    plain tensor."""
    if not is_dtensor(p):
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(p.placements)
                 if not placement.is_replicate())


class Schedule:
    """The frozen set each step, chosen by `policy`.

    `apply_frozen(frozen)` is called whenever the set changes: it writes the
    frozen set's one holder, which the engine reads (`frozen` is the set this
    schedule last applied, the holder's value while it chooses); `parameters` maps
    each layer name to its parameter. The schedule advances once per update,
    never on forward or backward calls: an update is the optimizer steps between
    two training forwards (several optimizers, one per parameter group set,
    make one update), so gradient accumulation over micro-batches sees one
    frozen set and one policy choice per optimizer step. Layers in
    `always_train` are never frozen; `freeze_ratio` (None: the policy decides)
    of the rest is how many the policy freezes, kept where they leave room.

    `admits` (set by memory_budget; None: no cap) caps what trains at once: where
    the layers a choice leaves training fail it, the schedule trains down the
    policy's ranking, skipping the layers that would break it (`_within_cap`).

    Until the first optimizer step every layer is scheduled. From then on only
    the layers some optimizer that stepped holds are (`held`): a layer in no
    optimizer never moves, so a policy judging by change would keep it training
    for good; it is frozen instead, outside `freeze_ratio`.
    """

    def __init__(self, layers: Sequence[str], parameters: dict[str, torch.nn.Parameter],
                 policy: FreezePolicy, *, apply_frozen: Callable[[frozenset[str]], None],
                 freeze_ratio: float | None = None, always_train: frozenset[str] = frozenset(),
                 blocks: Sequence[Sequence[str]] = ()) -> None:
        self.layers = tuple(layers)
        self.parameters = parameters
        self.policy = policy
        self.always_train = frozenset(always_train)
        self.freeze_ratio = freeze_ratio
        self.admits: Callable[[Iterable[str]], bool] | None = None
        self.blocks = tuple(tuple(b) for b in blocks)
        self.apply_frozen = apply_frozen
        self.step = 0
        self.history: list[int] = []  # frozen set of each step as a bitmask over layers
        self.snapshot_bytes_peak = 0
        self.host_reads = 0  # reads of device values to the host (one per optimizer step)
        # Layers held by an optimizer that stepped; None before the first step.
        self.held: frozenset[str] | None = None
        # Copies of the layers the optimizer step under way moves, until they are measured.
        self._snapshots: dict[int, torch.Tensor] = {}
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._param_ids = {id(parameters[name]): i for i, name in enumerate(self.layers)}
        # The optimizers (by id) that stepped since the last advance, until the next
        # training forward; and the frozen set that forward's gradients came from.
        self._round: set[int] | None = None
        self._ran_with: frozenset[str] = frozenset()
        # Copies of the trainable layers at an update's first training forward, for
        # `manual_step` and to notice weights moved with no step; once an optimizer
        # drives the schedule, only its first step uses them.
        self.driven_by_optimizer = False
        self._reference: dict[int, torch.Tensor] | None = None
        self.forwards_since_reference = 0
        self._applied: frozenset[str] = frozenset()
        self._agreed: frozenset[str] | None = None  # the last set every rank was seen to run
        self._apply(self._choose(None, must_choose=True) or frozenset())

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def frozen(self) -> frozenset[str]:
        """The frozen set this schedule last applied (read-only: `_apply` sets it)."""
        return self._applied

    def _apply(self, frozen: frozenset[str]) -> None:
        """Put `frozen` in force: the one place the schedule writes the frozen set."""
        self._applied = frozen
        self.apply_frozen(frozen)

    @property
    def observes_weight_change(self) -> bool:
        return bool(self.policy.observes_weight_change)

    @property
    def reschedule_every(self) -> int | None:
        """Updates between choices, where the policy says (for the report)."""
        return getattr(self.policy, "reschedule_every", None)

    # -- selection ---------------------------------------------------------------

    @property
    def scheduled(self) -> tuple[str, ...]:
        """The layers the schedule picks from: all of them before the first
        optimizer step, then the ones an optimizer that stepped holds."""
        return self.layers if self.held is None else tuple(n for n in self.layers if n in self.held)

    @property
    def not_held(self) -> frozenset[str]:
        """Layers no optimizer that stepped holds: kept frozen, never scheduled."""
        return frozenset() if self.held is None else frozenset(self.layers) - self.held

    @property
    def num_frozen(self) -> int | None:
        """How many scheduled layers are frozen: `freeze_ratio` of the layers that
        can train; None without a freeze_ratio."""
        return self._num_frozen(self.scheduled)

    def _num_frozen(self, scheduled: Sequence[str]) -> int | None:
        if self.freeze_ratio is None:
            return None
        return min(int(self.freeze_ratio * len(scheduled)),
                   len(scheduled) - len(self.always_train.intersection(scheduled)))

    def _choose(self, changes: dict[str, float] | None, must_choose: bool) -> frozenset[str] | None:
        """The policy's choice plus every layer no optimizer holds; None where the
        policy keeps the set in force."""
        candidates = tuple(n for n in self.scheduled if n not in self.always_train)
        view = StepView(step=self.step, layers=self.layers, candidates=candidates,
                        num_frozen=self.num_frozen, frozen=self.frozen,
                        changes=changes if self.observes_weight_change else None,
                        must_choose=must_choose, blocks=self.blocks)
        chosen = self._ask(view)
        if chosen is not None and self.admits is not None and view.num_frozen is not None:
            chosen = self._within_cap(view, chosen)
        return None if chosen is None else chosen | self.not_held

    def _ask(self, view: StepView) -> frozenset[str] | None:
        chosen = self.policy.choose(view)
        if chosen is None:
            return None
        chosen = frozenset(chosen)
        stray = chosen - set(view.candidates)
        if stray:
            raise SlimFitError(
                f"freeze policy {self.name!r} chose to freeze {sorted(stray)[:3]}, which are not among "
                "the candidates it was shown (always_train layers, layers in no optimizer and "
                "non-layers are not). Fix the policy's choose() to return a subset of view.candidates")
        return chosen

    def _within_cap(self, view: StepView, chosen: frozenset[str]) -> frozenset[str]:
        """`chosen`, or where the layers it leaves training fail `admits`, a set
        that passes: with a policy that ranks (`rank`), down its ranking, each
        layer that still passes joined to those before it, at most as many as
        `chosen` leaves training; otherwise the policy's choice at the fewest
        more frozen that pass (a bisection). Asking again is allowed: a policy's
        choice depends on the step and what it observed, not on the calls."""
        candidates = frozenset(view.candidates)
        if self.admits(candidates - chosen):
            return chosen
        rank = getattr(self.policy, "rank", None)
        if rank is not None:
            room, training, ranked = len(candidates - chosen), [], list(rank(view))
            stray = set(ranked) - candidates
            if stray:
                raise SlimFitError(
                    f"freeze policy {self.name!r} ranked {sorted(stray)[:3]}, which are not among the "
                    "candidates it was shown. Fix the policy's rank() to order view.candidates only")
            for name in ranked:
                if len(training) == room:
                    break
                if self.admits([*training, name]):
                    training.append(name)
            return candidates - frozenset(training)
        low, high, best = len(chosen), len(candidates), candidates
        while high - low > 1:
            middle = (low + high) // 2
            attempt = self._ask(dataclasses.replace(view, num_frozen=middle, must_choose=True))
            if attempt is not None and self.admits(candidates - attempt):
                high, best = middle, attempt
            else:
                low = middle
        return best

    def _set(self, frozen: frozenset[str]) -> None:
        if frozen != self.frozen:
            self._apply(frozen)

    # -- optimizer hooks -----------------------------------------------------------

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return holds_any(optimizer, self._param_ids)

    def rebind(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        """Follow the layers to new parameter objects (fully_shard applied after
        compile), before any optimizer step: an optimizer that stepped holds the
        old ones and would never drive this schedule again."""
        if self.held is not None or self.step:
            raise SlimFitError(
                f"the model's parameters were replaced (fully_shard after slimfit_fx.compile?) after "
                f"{self.step} update(s) of the {self.name!r} schedule, whose optimizer holds the old "
                "ones, so the frozen set would never change again. Fix: shard before training, and "
                "make the optimizer after sharding: fully_shard each block and the model, then "
                "cm = slimfit_fx.compile(model) (or compile first and shard right after), then "
                "optimizer = torch.optim.AdamW(cm.parameters())")
        self.parameters = parameters
        self._param_ids = {id(parameters[name]): i for i, name in enumerate(self.layers)}
        self.weights_loaded()

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Note the layers `optimizer` holds, drop the gradients of layers frozen
        when they were computed (so no optimizer moves them, even with momentum
        or weight decay) and, for a policy that observes weight change, copy the
        layers about to move (at the first step, the copy the first training
        forward took serves)."""
        self.driven_by_optimizer = True
        if self._round is not None and id(optimizer) in self._round:
            self._round = None  # stepped again with no forward between: a new update
        computed_under = self.frozen if self._round is None else self._ran_with
        reference = self._reference or {}
        observes = self.observes_weight_change
        held = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                index = self._param_ids.get(id(p))
                if index is None:
                    continue
                held.add(self.layers[index])
                copy = reference.pop(index, None)
                if self.layers[index] in computed_under:
                    p.grad = None
                elif p.grad is not None and observes:
                    self._snapshots[index] = local(p).clone() if copy is None else copy
        self.held = frozenset(held) if self.held is None else self.held | held
        self._count_held()

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure the layers that moved; the update's first optimizer step
        advances the schedule, a later one (another optimizer before the next
        forward) adds its layers' changes to the same choice."""
        changes = self._changes(self._snapshots)
        self._snapshots.clear()
        if self._round is None:
            self._round = {id(optimizer)}
            self._ran_with = self.frozen
            self._advance(changes)
            return
        self._round.add(id(optimizer))
        self.history[-1] = self._mask(self._ran_with | self.not_held)
        self._reschedule(changes)

    def note_training_forward(self) -> None:
        """Called before each training forward: it ends the current update, checks
        that every rank sharing the sharded layers runs the same frozen set, and
        in a loop with no optimizer it checks that `manual_step` follows each update."""
        self._round = None
        if self._agreed != self.frozen:
            self._check_ranks_agree()
        for name in self.not_held:
            # a gradient from before the first step, when the layer was still scheduled
            self.parameters[name].grad = None
        if self.driven_by_optimizer:
            self._reference = None  # the first forward's copies of layers no optimizer stepped
            return
        if self.forwards_since_reference and self._moved_since_reference():
            raise SlimFitError(
                f"schedule={self.name!r} picks the frozen set after optimizer steps, but "
                "trainable weights changed with no torch.optim optimizer step since the last "
                "forward (a hand-written update?), so the frozen set would never change. Fix: "
                "call cm.slimfit.step() after each update, or update with a torch.optim "
                "optimizer, or compile with schedule='manual' to keep a set of your own.")
        if self.forwards_since_reference == 0:
            self._take_reference()
        self.forwards_since_reference += 1

    def weights_loaded(self) -> None:
        """The model's weights were replaced (load_state_dict): not an update, so the
        next training forward copies them afresh."""
        self._reference = None
        self.forwards_since_reference = 0

    def manual_step(self) -> None:
        """After an update made without a torch.optim optimizer: measure the
        trainable layers against their weights at the update's first forward,
        then advance as after an optimizer step. Idempotent: with no weight
        change since that forward (a second call for one update) it does nothing."""
        if self.driven_by_optimizer:
            raise RuntimeError(
                "this schedule is driven by an optimizer's steps (its step hooks already "
                "fired); cm.slimfit.step() is for updates made without a torch.optim optimizer")
        if not self._reference:
            return
        changes = self._changes(self._reference)
        if not any(c != 0 for c in changes.values()):
            return  # nothing moved: measuring now would give the layers that train 0 and freeze them
        self.weights_loaded()
        self._advance(changes)

    def _check_ranks_agree(self) -> None:
        """Under FSDP2 every rank must skip the same gradients: FSDP2 leaves a
        parameter with no gradient out of its reduce-scatter, so ranks with different
        frozen sets would reduce mismatched buffers, or one would wait for good on a
        collective another skips. Each set change costs one all_reduce (max of
        (h, -h) for a hash h of the set) over the groups the layers are sharded on;
        nothing for a model with no sharded layer."""
        groups: dict[int, tuple[Any, torch.device]] = {}
        for name in self.layers:
            p = self.parameters[name]
            for group in _shard_groups(p):
                groups.setdefault(id(group), (group, local(p).device))
        frozen = self.frozen
        digest = hashlib.blake2b(self._mask(frozen).to_bytes(len(self.layers) // 8 + 1, "little"),
                                 digest_size=7).digest()
        h = int.from_bytes(digest, "little")
        for group, device in groups.values():
            seen = torch.tensor([h, -h], dtype=torch.int64, device=device)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
            if seen.tolist() != [h, -h]:
                raise SlimFitError(
                    f"rank {dist.get_rank()} is about to train with a frozen set ({len(frozen)} of "
                    f"{len(self.layers)} layers frozen) that differs from another rank's, at update "
                    f"{self.step} of the {self.name!r} schedule; under fully_shard the ranks would "
                    "then reduce mismatched gradients or wait for each other for good. Fix: compile "
                    "with the same config on every rank (schedule, freeze_ratio, seed, always_train), "
                    "give every rank's optimizer the same parameters, and load the same "
                    "cm.slimfit.state_dict() on every rank when resuming")
        self._agreed = frozen

    # -- weight change ---------------------------------------------------------------

    def _take_reference(self) -> None:
        """Copy the layers that train, for `manual_step` (and the first optimizer step)."""
        self._reference = {self._index[n]: local(self.parameters[n]).clone()
                           for n in self.layers if n not in self.frozen}
        self._count_held()

    def _moved_since_reference(self) -> bool:
        moved = self._summed({i: torch.ne(ref, local(self.parameters[self.layers[i]])).sum().reshape(1)
                              for i, ref in self._reference.items()})
        return any(changed for changed, in moved.values())

    def _count_held(self) -> None:
        """Weight-change bookkeeping: the copies held of the layers that train."""
        held = sum(t.numel() * t.element_size()
                   for copies in (self._snapshots, self._reference or {}) for t in copies.values())
        self.snapshot_bytes_peak = max(self.snapshot_bytes_peak, held)

    def _changes(self, before: dict[int, torch.Tensor]) -> dict[str, float]:
        """Each layer's mean(|W - before| / |before|) over its whole tensor, by name."""
        rows = {}
        for i, old in before.items():
            new = local(self.parameters[self.layers[i]])
            count = torch.full((), new.numel(), dtype=torch.float64, device=new.device)
            rows[i] = torch.stack([change_sum(old, new).double(), count])
        return {self.layers[i]: total / count if count else 0.0
                for i, (total, count) in self._summed(rows).items()}

    def _summed(self, rows: dict[int, torch.Tensor]) -> dict[int, list[float]]:
        """Each layer's row of numbers, summed over the shards of its parameter,
        on the host.

        The rows are stacked per device; under FSDP2 one all_reduce per sharding
        layout (one in all for `fully_shard(model)`) sums them over the ranks,
        where `full_tensor()` would gather every weight; then one transfer per
        device (one in all for a model on one device) brings them to the host.
        """
        layouts: dict[tuple[torch.device, tuple[Any, ...]], list[int]] = {}
        for i, row in rows.items():
            groups = _shard_groups(self.parameters[self.layers[i]])
            layouts.setdefault((row.device, groups), []).append(i)
        devices: dict[torch.device, list[tuple[tuple[Any, ...], list[int]]]] = {}
        for (device, groups), indices in layouts.items():
            devices.setdefault(device, []).append((groups, indices))
        summed = {}
        for parts in devices.values():
            order = [i for _, indices in parts for i in indices]
            stacked = torch.stack([rows[i] for i in order])
            start = 0
            for groups, indices in parts:
                for group in groups:  # each layout's rows are one contiguous slice
                    dist.all_reduce(stacked[start:start + len(indices)], group=group)
                start += len(indices)
            summed.update(zip(order, self._to_host(stacked)))
        return summed

    def _to_host(self, values: torch.Tensor) -> list:
        """The one place the schedule reads device values; `host_reads` counts its calls."""
        self.host_reads += 1
        return values.tolist()

    def _advance(self, changes: dict[str, float]) -> None:
        self.step += 1
        self.history.append(self._mask(self.frozen | self.not_held))
        self._reschedule(changes)

    def _reschedule(self, changes: dict[str, float]) -> None:
        # The policy must choose (off its beat too) when a layer no optimizer holds
        # would still train: the held set was just learned (or grew).
        must_choose = not self.not_held <= self.frozen
        chosen = self._choose(changes, must_choose)
        if chosen is None and must_choose:
            chosen = self.frozen | self.not_held
        if chosen is not None:
            self._set(chosen)

    def _mask(self, frozen: Iterable[str]) -> int:
        return sum(1 << self._index[n] for n in frozen)

    # -- state -----------------------------------------------------------------------

    def trained_counts(self) -> list[int]:
        """How many steps each layer trained (was not frozen), in `layers` order."""
        return self.history_matrix().sum(dim=1).tolist()

    def distinct_sets(self) -> int:
        """How many different frozen sets the steps so far ran with."""
        return len(set(self.history))

    def history_matrix(self) -> torch.Tensor:
        """bool (layers x steps): True where the layer trained at that step."""
        bits = torch.tensor([[not mask >> i & 1 for i in range(len(self.layers))]
                             for mask in self.history], dtype=torch.bool)
        return bits.T if bits.numel() else torch.zeros(len(self.layers), 0, dtype=torch.bool)

    # The schedule's own keys; "held" is optional: states saved before it existed
    # learn it at the next step. The policy's keys sit beside them.
    STATE_KEYS = ("layers", "step", "frozen", "history", "snapshot_bytes_peak")

    def state_dict(self) -> dict[str, Any]:
        """Everything the next choices depend on; loads with torch.load(weights_only=True)."""
        state = {
            "layers": list(self.layers),
            "step": self.step,
            "frozen": sorted(self.frozen),
            "history": self.history_matrix(),
            "snapshot_bytes_peak": self.snapshot_bytes_peak,
            "held": None if self.held is None else sorted(self.held),
        }
        own = self.policy.state_dict()
        clash = sorted(set(own) & {*state, "schedule"})
        if clash:
            raise SlimFitError(f"freeze policy {self.name!r} saves {clash}, keys the schedule uses; "
                               "rename them in the policy's state_dict()")
        return {**state, **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checks the whole state first (the policy checks its part before changing
        anything); a state that does not fit changes nothing."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"this {self.name} schedule state lacks {missing}: pass the dict "
                "cm.slimfit.state_dict() returned, unedited")
        if list(state["layers"]) != list(self.layers):
            raise ValueError(
                "this schedule state was saved for a different set of layers "
                f"({len(state['layers'])} saved, {len(self.layers)} here); load it into the "
                "same model architecture with the same parameters marked requires_grad"
            )
        frozen = frozenset(state["frozen"])
        if not frozen <= set(self.layers):
            raise ValueError(f"this {self.name} state freezes {sorted(frozen - set(self.layers))[:3]}, "
                             "which are not layers of this model; pass an unedited "
                             "cm.slimfit.state_dict()")
        held = state.get("held")
        if held is not None and not (isinstance(held, (list, tuple)) and set(held) <= set(self.layers)):
            raise ValueError(f"this {self.name} state's held layers are not layers of this model; "
                             "pass an unedited cm.slimfit.state_dict()")
        held = None if held is None else frozenset(held)
        not_held = frozenset() if held is None else frozenset(self.layers) - held
        scheduled = [n for n in self.layers if n not in not_held]
        if not not_held <= frozen:
            raise ValueError(f"this {self.name} state trains layers it records as in no optimizer; "
                             "pass an unedited cm.slimfit.state_dict()")
        expected = self._num_frozen(scheduled)
        if expected is not None and len(frozen - not_held) != expected:
            raise ValueError(
                f"this schedule state froze {len(frozen - not_held)} of {len(scheduled)} layers, but "
                f"this model was compiled to freeze {expected} "
                f"(freeze_ratio={self.freeze_ratio}); "
                "compile with the freeze_ratio (and always_train) the saved run used")
        if (frozen - not_held) & self.always_train:
            raise ValueError(
                f"this schedule state froze {sorted(frozen & self.always_train)}, which this model's "
                "always_train keeps training; compile with the always_train the saved run used")
        history = state["history"]
        step = int(state["step"])
        if not (isinstance(history, torch.Tensor) and history.shape == (len(self.layers), step)):
            raise ValueError(f"this {self.name} state's history is not layers x steps "
                             f"({len(self.layers)} x {step}); pass an unedited cm.slimfit.state_dict()")
        self.policy.load_state_dict(state)
        self.step = step
        self.history = [sum(1 << i for i, t in enumerate(row.tolist()) if not t) for row in history.T]
        self.snapshot_bytes_peak = int(state["snapshot_bytes_peak"])
        self.held = held
        self._round = None
        self.weights_loaded()
        self._apply(frozen)
