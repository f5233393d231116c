"""A byte budget: predict a training step's peak from its parts and pick what fits.

Pure arithmetic on numbers the engine and the optimizer-state packer supply
(`BudgetTerms`); nothing here reads a model, a graph or the clock, so every
rule is testable from numbers alone. `SlimFit` gathers the terms at the first
training forward and applies the `Prediction` `choose` returns.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import SlimFitError

# Powers of 1000 and of 1024, as storage vendors and as memory is counted.
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_FREEZE_RATIO = 0.95
# AdamW's single-tensor step builds temporaries of the size of the parameter it
# updates (sqrt of the second moment, the denominator), up to two at once.
STEP_TEMPORARIES = 2
# Optimizer-state packings tried for frozen layers, weakest first ("offload"
# only where the parameters live on a GPU; host memory is the budget on CPU).
PACKINGS = ("full", "bf16", "int8")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class BudgetError(SlimFitError):
    """The memory budget is below what the run needs at the most freezing and packing."""


def parse_bytes(value: object, field: str = "memory_budget") -> int:
    """`value` in bytes: an int, or a string of a number and a unit (B, KB, MB,
    GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024; no unit is bytes)."""
    if isinstance(value, float) and 0.0 < value <= 1.0:
        raise ValueError(
            f"{field}={value!r} looks like a fraction: {field} is now a size in bytes (an int, or a "
            "string such as '16GiB'); the partitioner's activation fraction in (0.0, 1.0] is now "
            "SlimFitConfig.activation_memory_budget. Fix: activation_memory_budget="
            f"{value!r}, or memory_budget='16GiB'")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{field} must be a size in bytes: an int or a string with a unit such as "
                        f"'16GiB' or '2GB'; got {value!r} of type {type(value).__name__}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in UNITS and unit != "":
            raise ValueError(f"{field}={value!r} is not a size: write a number and a unit, one of "
                             "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of "
                             "1024), e.g. '16GiB' or '2GB'")
        value = int(float(match.group(1)) * UNITS.get(unit, 1))
    if value <= 0:
        raise ValueError(f"{field} must be a positive number of bytes, got {value!r}")
    return value


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class LayerTerms:
    """What one schedulable layer costs: `train` bytes more while it trains than
    while frozen, apart from its optimizer state; `state` is that state by packing
    ("full" is plain, what a training layer holds)."""

    name: str
    gradient: int  # its weight's gradient, held while it trains
    stash: int  # its weight-gradient inputs, kept from forward to backward while it trains
    state: Mapping[str, int]  # optimizer state held while frozen, per packing

    def extra(self, packing: str) -> int:
        """Bytes training this layer adds over keeping it frozen under `packing`."""
        return self.gradient + self.stash + self.state["full"] - self.state[packing]


@dataclass(frozen=True)
class BudgetTerms:
    """Everything a peak is made of, in bytes.

    weights: every parameter; gradients: of the parameters that always train
    (biases, always_train layers; not layers); state: their optimizer state;
    saved: what the compiled regions save whatever is frozen; overhead: the
    runtime's own (compiled code, Python objects, the allocator's residue;
    measured on the host, 0 on a GPU); backward_transients: what backward holds
    beside the saved tensors and gradients (gradients of activations);
    largest_always: the largest parameter that always trains, whose optimizer
    step makes temporaries; layers: the layers the schedule picks from.
    """

    weights: int
    gradients: int
    state: int
    saved: int
    overhead: int
    layers: tuple[LayerTerms, ...]
    backward_transients: int = 0
    largest_always: int = 0


@dataclass(frozen=True)
class Prediction:
    """A predicted peak and its parts.

    `trained` layers fit whichever of them train (the parts are those of the
    costliest `trained`). Where `limit` is set, the schedule asks its policy for
    `most_trained` (a freeze ratio of `freeze_ratio`) and, where the layers a
    choice leaves training would pass `limit` (`admits`), trains fewer of them
    (Schedule._within_cap): `filled` is what the layers beyond `trained` may
    add, and `peak` the limit.
    """

    peak: int
    weights: int
    gradients: int
    optimizer_state: int
    saved: int
    overhead: int
    transients: int
    trained: int
    layers: int
    freeze_ratio: float
    optimizer_state_packing: str
    most_trained: int
    limit: int | None = None
    filled: int = 0

    def __str__(self) -> str:
        filled = (f" + layers the schedule trains beyond those, within the limit, {format_bytes(self.filled)}"
                  if self.limit is not None else "")
        count = (f"{self.trained} to {self.most_trained}" if self.limit is not None else str(self.trained))
        return (f"{format_bytes(self.peak)} = weights {format_bytes(self.weights)} + gradients "
                f"{format_bytes(self.gradients)} + optimizer state {format_bytes(self.optimizer_state)} + "
                f"max(saved activations {format_bytes(self.saved)} + backward transients, optimizer step "
                f"temporaries) {format_bytes(self.transients)} + runtime overhead {format_bytes(self.overhead)}"
                f"{filled} (freeze_ratio {self.freeze_ratio:.3f}: {count} of {self.layers} layers train; "
                f"optimizer_state={self.optimizer_state_packing!r})")


def ratio_for(frozen: int, layers: int) -> float:
    """The smallest freeze ratio r with int(r * layers) == frozen (the schedule's count)."""
    if layers == 0:
        return 0.0
    ratio = frozen / layers
    while int(ratio * layers) < frozen:
        ratio = math.nextafter(ratio, 1.0)
    return ratio


def predict(terms: BudgetTerms, trained: int, packing: str = "full") -> Prediction:
    """The peak with `trained` layers training at once, frozen layers' optimizer
    state held as `packing`. Which layers train changes every step, so the
    peak is that of the costliest `trained` of them together."""
    count = len(terms.layers)
    if not 0 <= trained <= count:
        raise ValueError(f"trained must be in [0, {count}], got {trained}")
    costly = sorted(terms.layers, key=lambda layer: layer.extra(packing), reverse=True)[:trained]
    return predict_set(terms, costly, packing)


def predict_set(terms: BudgetTerms, training: Collection[LayerTerms], packing: str = "full",
                packed: int | None = None) -> Prediction:
    """The peak with exactly the layers `training` training. Weights, optimizer
    state, gradients and the runtime's own are held throughout; on top, the
    larger of what backward holds (saved tensors, its transients) and what the
    optimizer step makes (temporaries of the largest parameter it updates):
    backward frees saved tensors before the step runs. `packed`: every layer's
    state under `packing`, where the caller has summed it already."""
    count = len(terms.layers)
    if packed is None:
        packed = sum(layer.state[packing] for layer in terms.layers)
    gradients = terms.gradients + sum(layer.gradient for layer in training)
    saved = terms.saved + sum(layer.stash for layer in training)
    state = terms.state + packed + sum(layer.state["full"] - layer.state[packing] for layer in training)
    largest = max([terms.largest_always, *(layer.gradient for layer in training)])
    transients = max(saved + terms.backward_transients, STEP_TEMPORARIES * largest) - saved
    peak = terms.weights + gradients + state + saved + transients + terms.overhead
    return Prediction(peak=peak, weights=terms.weights, gradients=gradients, optimizer_state=state, saved=saved,
                      overhead=terms.overhead, transients=transients, trained=len(training),
                      most_trained=len(training), layers=count,
                      freeze_ratio=ratio_for(count - len(training), count), optimizer_state_packing=packing)


def admits(terms: BudgetTerms, prediction: Prediction) -> Callable[[Iterable[str]], bool] | None:
    """Whether the layers named would keep the peak within `prediction.limit`
    (with its packing), for the schedule to cap each step's choice by; None where
    the prediction sets no limit (any choice fits)."""
    if prediction.limit is None:
        return None
    by_name = {layer.name: layer for layer in terms.layers}
    packing, limit = prediction.optimizer_state_packing, prediction.limit
    packed = sum(layer.state[packing] for layer in terms.layers)

    def fits(names: Iterable[str]) -> bool:
        try:
            training = [by_name[n] for n in names]
        except KeyError as err:
            raise BudgetError(
                f"layer {err.args[0]!r} joined an optimizer after memory_budget made its choice (at the "
                "third training forward), so its bytes are in no prediction. Fix: create every optimizer "
                "over the layers it will train before training starts") from None
        return predict_set(terms, training, packing, packed).peak <= limit

    return fits


def fill(terms: BudgetTerms, prediction: Prediction, budget: int) -> Prediction:
    """`prediction` with room for more layers where cheaper ones fit: the most
    layers that fit at all (the cheapest of them) become `most_trained`, and the
    schedule trims each choice to `budget` (`admits`). Without this, a budget
    would keep room all run for the costliest layers training together (a
    vocabulary-sized embedding beside the largest others), which the schedule
    rarely picks."""
    packing, count = prediction.optimizer_state_packing, len(terms.layers)
    cheap = sorted(terms.layers, key=lambda layer: layer.extra(packing))
    packed = sum(layer.state[packing] for layer in terms.layers)
    most = next((m for m in range(count, prediction.trained, -1)
                 if predict_set(terms, cheap[:m], packing, packed).peak <= budget), prediction.trained)
    if most == prediction.trained:
        return prediction
    return dataclasses.replace(prediction, most_trained=most, freeze_ratio=ratio_for(count - most, count),
                               limit=budget, filled=budget - prediction.peak, peak=budget)


def floor_of(terms: BudgetTerms, packings: Sequence[str] = PACKINGS,
             max_freeze_ratio: float = MAX_FREEZE_RATIO) -> Prediction:
    """The least any choice needs: the most frozen, the strongest packing."""
    count = len(terms.layers)
    return predict(terms, count - int(max_freeze_ratio * count), packings[-1])


def choose(terms: BudgetTerms, budget: int, packings: Sequence[str] = PACKINGS,
           max_freeze_ratio: float = MAX_FREEZE_RATIO) -> Prediction:
    """The prediction that trains the most layers per step within `budget` bytes,
    with at most `max_freeze_ratio` of the layers frozen. Per packing of
    `packings` (weakest first): the most layers that fit whichever of them train
    (at least the floor's count), filled up to the budget (`fill`); the packing
    whose fill trains the most wins (then: the most whichever train), the
    weakest among equals. Raises
    BudgetError, stating the floor, where nothing fits."""
    count = len(terms.layers)
    least = count - int(max_freeze_ratio * count)
    best: Prediction | None = None
    for packing in packings:
        fits = (predict(terms, trained, packing) for trained in range(count, least - 1, -1))
        guaranteed = next((prediction for prediction in fits if prediction.peak <= budget), None)
        if guaranteed is None:
            continue
        filled = fill(terms, guaranteed, budget)
        if best is None or (filled.most_trained, filled.trained) > (best.most_trained, best.trained):
            best = filled
    if best is not None:
        return best
    floor = floor_of(terms, packings, max_freeze_ratio)
    raise BudgetError(
        f"memory_budget={budget} ({format_bytes(budget)}) is below the floor of this run: at "
        f"freeze_ratio {max_freeze_ratio} with optimizer_state={packings[-1]!r} the peak is predicted at "
        f"{floor}. Fix: a memory_budget of at least {floor.peak} ({format_bytes(floor.peak)}), or a smaller "
        f"batch or sequence length (saved activations, {format_bytes(floor.saved)}, scale with them), "
        "or lower precision weights")
