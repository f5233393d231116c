"""LISA (Pan et al. 2024, layerwise importance sampling): a few random blocks train.

Layers outside the repeated blocks (embeddings, head, final norm) always
train; of the blocks, `layers` drawn at random train and the rest are frozen,
re-drawn every `interval` updates. The draws come from a seeded generator of
their own, so a run and its resumption repeat them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import StepView, check_int_options, load_generator


class LISA:
    """Train `layers` random repeated blocks (every layer in them) and every layer
    outside the blocks; draw new blocks every `interval` updates, from `seed`.

    The blocks are those slimfit_fx compiles as regions (`SlimFitConfig.blocks`,
    found by default). Pass it as `schedule=slimfit_fx.LISA(layers=2, interval=20)`;
    `schedule="lisa"` uses the defaults.
    """

    name = "lisa"
    observes_weight_change = False
    config_fields = ()
    refuses = {
        "freeze_ratio": (
            "SlimFitConfig.freeze_ratio={value!r} has no effect with LISA, which trains a number of "
            "blocks, not a share of the layers. Fix: drop freeze_ratio and pass "
            "schedule=slimfit_fx.LISA(layers=k, interval=K)"),
    }

    def __init__(self, layers: int = 2, interval: int = 20, seed: int = 0) -> None:
        check_int_options("LISA", ("layers", layers, 1), ("interval", interval, 1), ("seed", seed, 0))
        self.layers = layers
        self.interval = interval
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.period = -1  # the interval the current draw serves: view.step // interval
        self.trained_blocks: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> "LISA":
        return cls()

    @property
    def reschedule_every(self) -> int:
        return self.interval

    def choose(self, view: StepView) -> frozenset[str] | None:
        if len(view.blocks) < self.layers:
            raise ValueError(
                f"LISA(layers={self.layers}) trains {self.layers} repeated blocks, but this model "
                f"has {len(view.blocks)}. Fix: pass fewer layers, or name the blocks with "
                "SlimFitConfig.blocks (e.g. blocks=('model.layers.*',))")
        period = view.step // self.interval
        if period != self.period:
            draw = torch.randperm(len(view.blocks), generator=self.generator)[: self.layers]
            self.trained_blocks = tuple(sorted(draw.tolist()))
            self.period = period
        elif not view.must_choose:
            return None
        trained = {n for i in self.trained_blocks for n in view.blocks[i]}
        candidates = set(view.candidates)
        return frozenset(n for block in view.blocks for n in block if n in candidates and n not in trained)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "lisa_period": self.period,
                "lisa_trained_blocks": list(self.trained_blocks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Checks its part of `state` first; a part that does not fit changes nothing."""
        missing = [k for k in ("generator", "lisa_period", "lisa_trained_blocks") if k not in state]
        if missing:
            raise ValueError(f"this LISA state lacks {missing}: pass the dict cm.slimfit.state_dict() "
                             "returned, unedited")
        blocks = state["lisa_trained_blocks"]
        if not (isinstance(blocks, (list, tuple)) and len(blocks) in (0, self.layers)
                and all(isinstance(i, int) for i in blocks)):
            raise ValueError(f"this LISA state trains {blocks!r:.60}, not {self.layers} block indices; "
                             f"compile with the LISA(layers=...) the saved run used")
        generator, period = load_generator(state, "LISA"), int(state["lisa_period"])
        self.generator, self.period, self.trained_blocks = generator, period, tuple(blocks)
