"""The manual policy: `cm.slimfit.set_frozen(names)` picks the frozen set.

No schedule runs (no optimizer hooks, no copies of weights): nothing is frozen
until set_frozen is called, and layers outside the optimizers are not frozen.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import StepView


class Manual:
    """The frozen set is whatever `cm.slimfit.set_frozen` was given last."""

    name = "manual"
    observes_weight_change = False
    chooses = False
    config_fields = ()
    refuses = {
        "freeze_ratio": (
            "SlimFitConfig.freeze_ratio={value!r} has no effect with schedule='manual', where "
            "cm.slimfit.set_frozen(names) picks the frozen set (nothing is frozen until it is "
            "called). Fix: drop freeze_ratio (or pass freeze_ratio=None), or use schedule='ils' to "
            "have the scheduler freeze that share of the layers"),
        "always_train": (
            "SlimFitConfig.always_train applies to schedule='ils', got schedule='manual'; "
            "with schedule='manual' leave those layers out of cm.slimfit.set_frozen(...)"),
    }

    @classmethod
    def from_config(cls, config: Any) -> "Manual":
        return cls()

    def choose(self, view: StepView) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
