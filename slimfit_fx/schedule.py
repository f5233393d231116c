"""Inter-layer scheduling (ILS): pick the frozen set from training dynamics.

After each optimizer step every layer that trained is scored by how much it
moved, d = mean(|W_new - W_old| / |W_old|); the k lowest-scoring layers are
frozen next, after every optimizer step as the paper does. This module only
writes the frozen set; it never compiles (no frozen set costs a compile), and
reads no clock: the same seed and the same weights give the same sets on any
machine, and a resumed run repeats them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

# Initial scores are uniform in [0, INITIAL_SCORE): far above any real relative
# change, so every layer trains once before measured scores compete (as the
# authors' code does with rand * 1e10).
INITIAL_SCORE = 1e10
# Scores of tensors larger than this are computed on a fixed strided sample of
# about this many elements: the mean over ~65k elements estimates the full mean
# to well under 1%, and bookkeeping stays ~256 KiB per trained layer instead of a
# copy of each (BERT's word embeddings alone are 89 MiB).
SCORE_SAMPLE = 65536


def score_sample(p: torch.Tensor) -> torch.Tensor:
    """The elements a layer's score is computed on: all of them, or every n-th."""
    p = p.detach()
    if hasattr(p, "full_tensor"):
        # A DTensor shard (fully_shard): every rank scores the whole weight, so all
        # pick the same frozen set. A collective; ranks reach it in the same order.
        p = p.full_tensor()
    flat = p.reshape(-1)
    return flat[:: max(1, flat.numel() // SCORE_SAMPLE)]


def relative_change(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """mean(|new - old| / |old|) as a 0-dim float64 tensor.

    |old| is floored at the dtype's smallest normal number, so a weight that is
    exactly zero and stays zero scores 0 instead of nan.
    """
    old = old.double()
    floor = torch.finfo(torch.float64).tiny
    return ((new.double() - old).abs() / old.abs().clamp_min(floor)).mean()


class InterLayerSchedule:
    """Scores and the frozen set each step.

    `apply_frozen(frozen)` is called whenever the set changes; `parameters` maps
    each layer name to its parameter. The schedule advances on optimizer steps
    (`before_step` / `after_step`), never on forward or backward calls, so
    gradient accumulation over micro-batches sees one frozen set and one score
    update per optimizer step. Layers in `always_train` are never frozen; the
    frozen set is drawn from the rest and keeps its size where they leave room.
    """

    def __init__(self, layers: Sequence[str], parameters: dict[str, torch.nn.Parameter],
                 freeze_ratio: float, *, reschedule_every: int, seed: int,
                 apply_frozen: Callable[[frozenset[str]], None],
                 always_train: frozenset[str] = frozenset()) -> None:
        self.layers = tuple(layers)
        self.parameters = parameters
        self.always_train = frozenset(always_train)
        self.num_frozen = min(int(freeze_ratio * len(self.layers)), len(self.layers) - len(self.always_train))
        self.reschedule_every = reschedule_every
        self.apply_frozen = apply_frozen
        self.generator = torch.Generator().manual_seed(seed)
        self.scores = torch.rand(len(self.layers), dtype=torch.float64,
                                 generator=self.generator) * INITIAL_SCORE
        self.step = 0
        self.history: list[int] = []  # frozen set of each step as a bitmask over layers
        self.snapshot_bytes_peak = 0
        self._snapshots: dict[int, torch.Tensor] = {}
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._param_ids = {id(parameters[name]): i for i, name in enumerate(self.layers)}
        self.frozen = self._choose()
        self.apply_frozen(self.frozen)

    # -- selection ---------------------------------------------------------------

    def _lowest(self) -> frozenset[str]:
        order = [i for i in torch.argsort(self.scores, stable=True).tolist()
                 if self.layers[i] not in self.always_train]
        return frozenset(self.layers[i] for i in order[: self.num_frozen])

    def _choose(self) -> frozenset[str]:
        """The `num_frozen` lowest-scoring layers (ties: the earlier layer)."""
        return self._lowest()

    # -- optimizer hooks -----------------------------------------------------------

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop frozen layers' gradients (so no optimizer moves them, even with
        momentum or weight decay) and snapshot the layers about to move."""
        frozen_ids = {id(self.parameters[n]) for n in self.frozen}
        for group in optimizer.param_groups:
            for p in group["params"]:
                index = self._param_ids.get(id(p))
                if index is None:
                    continue
                if id(p) in frozen_ids:
                    p.grad = None
                elif p.grad is not None:
                    self._snapshots[index] = score_sample(p).clone()
        held = sum(t.numel() * t.element_size() for t in self._snapshots.values())
        self.snapshot_bytes_peak = max(self.snapshot_bytes_peak, held)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Score the layers that moved, then (every `reschedule_every` steps) pick
        the next frozen set."""
        if self._snapshots:
            indices = list(self._snapshots)
            changes = torch.stack([relative_change(self._snapshots[i], score_sample(self.parameters[self.layers[i]]))
                                   for i in indices]).cpu()
            self.scores[indices] = changes
            self._snapshots.clear()
        self.step += 1
        self.history.append(self._mask(self.frozen))
        if self.step % self.reschedule_every == 0:
            chosen = self._choose()
            if chosen != self.frozen:
                self.frozen = chosen
                self.apply_frozen(chosen)

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

    def state_dict(self) -> dict[str, Any]:
        """Everything the next choices depend on; loads with torch.load(weights_only=True)."""
        return {
            "layers": list(self.layers),
            "step": self.step,
            "scores": self.scores.clone(),
            "frozen": sorted(self.frozen),
            "generator": self.generator.get_state(),
            "history": self.history_matrix(),
            "snapshot_bytes_peak": self.snapshot_bytes_peak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layers"]) != list(self.layers):
            raise ValueError(
                "this schedule state was saved for a different set of layers "
                f"({len(state['layers'])} saved, {len(self.layers)} here); load it into the "
                "same model architecture with the same parameters marked requires_grad"
            )
        self.step = int(state["step"])
        self.scores = state["scores"].clone().to(torch.float64)
        self.generator.set_state(state["generator"])
        trained = state["history"].T
        self.history = [sum(1 << i for i, t in enumerate(row.tolist()) if not t) for row in trained]
        self.snapshot_bytes_peak = int(state["snapshot_bytes_peak"])
        self.frozen = frozenset(state["frozen"])
        self.apply_frozen(self.frozen)
