"""Freeze policies: who chooses the frozen set, by registered name.

`SlimFitConfig.schedule` takes a name from `POLICIES` or a `FreezePolicy`
object; the engine looks policies up here and never by name elsewhere.
"""
from __future__ import annotations

import copy
from typing import Any

from .base import FreezePolicy, StepView
from .ils import ILS
from .lisa import LISA
from .manual import Manual

POLICIES: dict[str, type] = {"ils": ILS, "manual": Manual, "lisa": LISA}
DEFAULT_POLICY = "ils"  # SlimFitConfig.schedule's default: the paper's


def policy_type(schedule: str | FreezePolicy) -> Any:
    """The class (for a registered name) or the object whose optional attributes
    (`refuses`, `default_freeze_ratio`, `config_fields`) the config reads."""
    return POLICIES[schedule] if isinstance(schedule, str) else schedule


def schedule_name(schedule: str | FreezePolicy) -> str:
    return schedule if isinstance(schedule, str) else schedule.name


def build_policy(config: Any) -> FreezePolicy:
    """The policy one compiled model runs: a registered name's, built from the
    config, or a deep copy of the object the config holds (so two models never
    share draws or scores)."""
    schedule = config.schedule
    return POLICIES[schedule].from_config(config) if isinstance(schedule, str) else copy.deepcopy(schedule)


__all__ = ["DEFAULT_POLICY", "FreezePolicy", "ILS", "LISA", "Manual", "POLICIES", "StepView", "build_policy",
           "policy_type", "schedule_name"]
