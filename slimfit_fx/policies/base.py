"""What a freeze policy is: the protocol the schedule calls, and what it shows one.

A policy only chooses: which of the candidate layers to freeze for the next
update, from what the schedule observed. The schedule (slimfit_fx/schedule.py)
does everything else: optimizer hooks, update rounds, copies of weights,
history and state checks. Nothing here reads a device value.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class StepView:
    """What the schedule shows a policy when it asks for the next frozen set.

    step: updates done so far (0 when the model is compiled).
    layers: every layer name, in model order (`cm.slimfit.layers`).
    candidates: the layers the policy may freeze: those an optimizer that
        stepped holds (every layer before the first step), less `always_train`.
        Layers in no optimizer are frozen by the schedule, outside the choice.
    num_frozen: how many candidates to freeze, from `freeze_ratio`; None when
        the config gives no freeze_ratio (the policy decides how many).
    frozen: the frozen set in force now (layers in no optimizer included).
    changes: for a policy with `observes_weight_change = True`, each layer that
        trained in this update and its mean(|W_new - W_old| / |W_old|) over the
        whole tensor; None for other policies (no weight is copied for them).
    must_choose: the candidates changed since the last choice (an optimizer
        stepped for the first time, or holds more layers): a policy that keeps
        a set for several steps must choose now.
    blocks: the layers of each repeated block (slimfit_fx/regions.py), in model
        order; layers outside every block are in none.
    """

    step: int
    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    num_frozen: int | None
    frozen: frozenset[str]
    changes: Mapping[str, float] | None
    must_choose: bool
    blocks: tuple[tuple[str, ...], ...]


@runtime_checkable
class FreezePolicy(Protocol):
    """Chooses the frozen set; pass one as `SlimFitConfig.schedule`.

    The schedule calls `choose(view)` once when the model is compiled and after
    every update (an optimizer step, or `cm.slimfit.step()` in a loop with no
    optimizer); again within one update when another optimizer steps before the
    next forward (same `view.step`, more `changes`), so a draw must depend on
    the step, not on the number of calls. `choose` returns the candidates to
    freeze, or None to keep the set in force. Each compiled model works on its
    own deep copy of the object passed in the config.

    `state_dict()` holds what later choices depend on (tensors, lists, ints:
    it is saved inside `cm.slimfit.state_dict()` with the schedule's own keys,
    which it must not reuse); `load_state_dict(state)` gets that whole dict
    back and must check its part before changing anything.

    Optional class attributes the engine reads:
    `refuses`: {SlimFitConfig field: message} for config fields the policy
    cannot use (the message may use {value}); `default_freeze_ratio`: the
    freeze_ratio a config that gives none uses; `config_fields`: the fields
    (`reschedule_every`, `seed`) a registered name's `from_config` reads (a
    policy object takes its options as arguments, so the config refuses them);
    `reschedule_every`: steps between choices, for the report; `chooses =
    False`: no schedule runs and `cm.slimfit.set_frozen` picks the set.

    Optional method: `rank(view)`, every candidate from the one most worth
    training to the least, where `choose` freezes the last `num_frozen` of
    that order. A cap on what trains at once (memory_budget) then trains down
    that order, skipping a layer that would break the cap and taking the next;
    without it, the cap asks `choose` again with more frozen.
    """

    name: str
    observes_weight_change: bool

    def choose(self, view: StepView) -> Iterable[str] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_int_options(who: str, *options: tuple[str, object, int]) -> None:
    """Raise ValueError naming `who` ("ILS", "LISA") for an option (name, value,
    least) that is not an int >= least."""
    for field, value, least in options:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{who} {field} must be an int >= {least}, got {value!r}")


def load_generator(state: Mapping[str, object], who: str) -> torch.Generator:
    """A torch.Generator at the state saved under "generator"; ValueError naming
    `who` ("ILS", "LISA") when it is not a generator state."""
    generator = torch.Generator()
    try:
        generator.set_state(state["generator"])
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"this {who} state's generator is not a torch.Generator state; pass an "
                         "unedited cm.slimfit.state_dict()") from err
    return generator
