"""Inter-layer scheduling (ILS), the paper's policy: freeze the layers that moved least.

Every layer starts with a random score far above any real change; each update
overwrites the scores of the layers that trained with their relative weight
change, and the `num_frozen` lowest-scoring candidates are frozen next. Only
the choice lives here; the schedule measures the changes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import StepView, check_int_options, load_generator

# Initial scores are uniform in [0, INITIAL_SCORE): far above any real relative
# change, so every layer trains once before measured scores compete (as the
# authors' code does with rand * 1e10).
INITIAL_SCORE = 1e10


class ILS:
    """Freeze the `view.num_frozen` candidates whose weights changed least
    (ties: the earlier layer), choosing every `reschedule_every` updates (1,
    the default, is the paper's per-step scheduling); `seed` seeds the initial
    random scores. `schedule="ils"` reads both from SlimFitConfig."""

    name = "ils"
    observes_weight_change = True
    default_freeze_ratio = 0.9
    config_fields = ("reschedule_every", "seed")

    def __init__(self, reschedule_every: int = 1, seed: int = 0) -> None:
        check_int_options("ILS", ("reschedule_every", reschedule_every, 1), ("seed", seed, 0))
        self.reschedule_every = reschedule_every
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.scores: torch.Tensor | None = None  # one per layer, drawn at the first choice
        self._index: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Any) -> "ILS":
        return cls(reschedule_every=config.reschedule_every, seed=config.seed)

    def _bind(self, layers: tuple[str, ...]) -> None:
        if self.scores is None:
            self._index = {name: i for i, name in enumerate(layers)}
            self.scores = torch.rand(len(layers), dtype=torch.float64, generator=self.generator) * INITIAL_SCORE

    def choose(self, view: StepView) -> frozenset[str] | None:
        self._observe(view)
        if view.step % self.reschedule_every and not view.must_choose:
            return None
        ranked = self._ranked(view)
        return frozenset(ranked[len(ranked) - view.num_frozen:])

    def rank(self, view: StepView) -> list[str]:
        """The candidates from the highest score to the lowest (ties: the later
        layer first, so the earlier one freezes first): the last `num_frozen`
        are the ones `choose` freezes."""
        self._observe(view)
        return self._ranked(view)

    def _ranked(self, view: StepView) -> list[str]:
        candidates = set(view.candidates)
        order = torch.argsort(self.scores, stable=True).tolist()[::-1]
        return [view.layers[i] for i in order if view.layers[i] in candidates]

    def _observe(self, view: StepView) -> None:
        """Take the scores of the layers that trained (the same changes again are
        the same scores)."""
        self._bind(view.layers)
        if view.changes:
            self.scores[[self._index[n] for n in view.changes]] = torch.tensor(
                list(view.changes.values()), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Checks its part of `state` first; a part that does not fit changes nothing."""
        missing = [k for k in ("scores", "generator") if k not in state]
        if missing:
            raise ValueError(
                f"this ILS state lacks {missing}: pass the dict cm.slimfit.state_dict() returned, "
                "unedited")
        scores = state["scores"]
        if not (isinstance(scores, torch.Tensor) and scores.shape == self.scores.shape):
            raise ValueError(f"this ILS state's scores are not one value per layer "
                             f"({len(self.scores)}); pass an unedited cm.slimfit.state_dict()")
        generator = load_generator(state, "ILS")
        self.scores = scores.clone().to(torch.float64)
        self.generator = generator
