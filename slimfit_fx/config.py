"""SlimFitConfig: the user's knobs, validated once at construction.

A config is a frozen dataclass; a bad value raises here, naming the field, the
value and what is allowed, so nothing downstream has to re-check it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCHEDULES = ("manual",)
BACKENDS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class SlimFitConfig:
    """How slimfit_fx compiles and freezes a model.

    freeze_ratio: share of layers the scheduler freezes, in [0.0, 1.0].
    schedule: who picks the frozen set; "manual" means `cm.slimfit.set_frozen`.
    backend: compiler for every variant, "inductor" or "aot_eager" (no codegen).
    max_variants: compiled frozen-set variants kept alive (LRU), >= 1.
    """

    freeze_ratio: float = 0.9
    schedule: str = "manual"
    backend: str = "inductor"
    max_variants: int = 8

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
        size = self.max_variants
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(
                f"SlimFitConfig.max_variants must be an int >= 1, got {size!r} "
                f"of type {type(size).__name__}"
            )
        if size < 1:
            raise ValueError(f"SlimFitConfig.max_variants must be >= 1, got {size!r}")

    def replace(self, **overrides) -> "SlimFitConfig":
        """A copy with `overrides` applied; unknown field names raise TypeError."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown SlimFitConfig field(s) {unknown}; the fields are {sorted(fields)}"
            )
        return dataclasses.replace(self, **overrides)
