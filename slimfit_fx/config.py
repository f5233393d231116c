"""SlimFitConfig: the user's knobs, validated once at construction.

A config is a frozen dataclass; a bad value raises here, naming the field, the
value and what is allowed, so nothing downstream has to re-check it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCHEDULES = ("manual", "ils")
BACKENDS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class SlimFitConfig:
    """How slimfit_fx compiles and freezes a model.

    freeze_ratio: share of layers the scheduler freezes, in [0.0, 1.0]
        (0.0 freezes nothing).
    schedule: who picks the frozen set; "manual" means `cm.slimfit.set_frozen`,
        "ils" the training-dynamics scheduler (inter-layer scheduling).
    backend: compiler for every variant, "inductor" or "aot_eager" (no codegen).
    max_variants: compiled frozen-set variants kept alive (LRU), >= 1.
    reschedule_every: "ils" picks a new frozen set every this many optimizer steps.
    new_set_every: optimizer steps that pay for one compiled frozen set: "ils"
        admits a set it has not compiled yet only while sets so far <= steps /
        new_set_every (otherwise it picks the best compiled set); 1 is the paper's
        unbounded per-step scheduling. None derives it once, at step 4, from the
        measured compile and step times and `compile_budget`.
    compile_budget: share of training wall time that compiling new frozen sets
        may take when `new_set_every` is None, in (0.0, 1.0].
    seed: seeds the scheduler's initial random scores.
    """

    freeze_ratio: float = 0.9
    schedule: str = "manual"
    backend: str = "inductor"
    max_variants: int = 8
    reschedule_every: int = 1
    new_set_every: int | None = None
    compile_budget: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        ratio = self.freeze_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(
                f"SlimFitConfig.freeze_ratio must be a float in [0.0, 1.0], got {ratio!r} "
                f"of type {type(ratio).__name__}"
            )
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"SlimFitConfig.freeze_ratio must be in [0.0, 1.0], got {ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"SlimFitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"SlimFitConfig.backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        _check_int("max_variants", self.max_variants, 1)
        _check_int("reschedule_every", self.reschedule_every, 1)
        if self.new_set_every is not None:
            _check_int("new_set_every", self.new_set_every, 1, none_ok=True)
        _check_int("seed", self.seed, 0)
        budget = self.compile_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(
                f"SlimFitConfig.compile_budget must be a float in (0.0, 1.0], got {budget!r} "
                f"of type {type(budget).__name__}"
            )
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"SlimFitConfig.compile_budget must be in (0.0, 1.0], got {budget!r}")

    def replace(self, **overrides) -> "SlimFitConfig":
        """A copy with `overrides` applied; unknown field names raise TypeError."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown SlimFitConfig field(s) {unknown}; the fields are {sorted(fields)}"
            )
        return dataclasses.replace(self, **overrides)


def _check_int(field: str, value: object, least: int, none_ok: bool = False) -> None:
    allowed = f"an int >= {least}" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"SlimFitConfig.{field} must be {allowed}, got {value!r} of type {type(value).__name__}"
        )
    if value < least:
        raise ValueError(f"SlimFitConfig.{field} must be {allowed}, got {value!r}")
