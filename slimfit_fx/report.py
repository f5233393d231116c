"""A plain-text report of what slimfit_fx did to a model, read off its state and graphs.

It only reads: the frozen set, the stats, the last training step's pass counters
and saved tensors, and the saved bytes measured at run time; a `Report` holds
plain values only.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .graphs import SavedTensor, distinct_bytes
from .policies import DEFAULT_POLICY

if TYPE_CHECKING:
    from .module import SlimFit


@dataclass(frozen=True)
class Report:
    """What slimfit did to one model, as values; `str()` is the terminal table."""

    model: str
    backend: str
    layers: tuple[str, ...]
    frozen: tuple[str, ...]
    saved_bytes: int | None
    stats: dict[str, float]
    pass_counters: dict[str, int]
    saved_tensors: tuple[SavedTensor, ...] = ()
    saved_tensors_before: tuple[SavedTensor, ...] = ()  # with no slimfit pass, from the graph
    schedule: dict[str, Any] | None = None  # a schedule that chooses: its policy, steps, ...
    # layers slimfit never trains, and why (SlimFit.not_scheduled)
    not_scheduled: dict[str, str] = dataclasses.field(default_factory=dict)
    # SlimFitConfig.memory_budget: the budget, the predicted peak and its parts
    # (budget.Prediction's fields), the measured peak and how it was measured
    memory_budget: dict[str, Any] | None = None

    def __str__(self) -> str:
        saved = "not measured yet (run a training step)" if self.saved_bytes is None else (
            f"{self.saved_bytes:,} B ({self.saved_bytes / 2**20:.2f} MiB)"
        )
        s = self.stats
        kept = set(self.not_scheduled) & set(self.layers)  # frozen, but not by the schedule
        scheduled_frozen = len(set(self.frozen) - kept)
        rows = [
            ("model", self.model),
            ("backend", self.backend),
            ("layers", f"{len(self.layers)} ({scheduled_frozen} frozen, "
                       f"{len(self.layers) - len(kept) - scheduled_frozen} trainable"
                       + (f", {len(kept)} not scheduled" if kept else "") + ")"),
            ("saved for backward", saved),
            ("dynamo graphs", f"{s['graphs_captured']}"),
            ("regions", f"{s['regions']} per step, {s['regions_compiled']} compiled "
                        "(one compile serves every frozen set)"),
            ("compile time", f"{s['compile_seconds']:.2f} s"),
        ]
        if self.saved_tensors_before:
            before = [t for t in self.saved_tensors_before if not t.resident]
            dropped = [t for t in before if t.changed_by]
            rows.append(("before passes (computed)",
                         f"{distinct_bytes(before):,} B in {len(before)} tensors; "
                         f"{len(dropped)} of them no longer saved"))
        if self.schedule is not None:
            rows += _schedule_rows(self.schedule, s, kept)
        if self.not_scheduled:
            rows.append(("not scheduled", _describe_not_scheduled(self.not_scheduled)))
        if self.memory_budget is not None:
            rows += _budget_rows(self.memory_budget)
        rows += [(f"pass: {k}", str(v)) for k, v in sorted(self.pass_counters.items())]
        width = max(len(k) for k, _ in rows)
        lines = ["slimfit_fx report", "-" * (width + 30)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.saved_tensors:
            lines += ["", self.saved_tensor_table()]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data: dict[str, Any] = json.loads(text)
        data.setdefault("not_scheduled", {})  # reports written before it existed
        data.setdefault("memory_budget", None)
        if data.get("schedule") is not None:  # reports written before policies: all ran the default
            data["schedule"].setdefault("policy", DEFAULT_POLICY)
        data["layers"] = tuple(data["layers"])
        data["frozen"] = tuple(data["frozen"])
        for key in ("saved_tensors", "saved_tensors_before"):
            data[key] = tuple(SavedTensor(**{**t, "shape": tuple(t["shape"])}) for t in data[key])
        return cls(**data)

    def to_markdown(self) -> str:
        """The same content as `str()`, as Markdown tables."""
        lines = [f"## slimfit_fx report: {self.model}", "", "| | |", "|---|---|"]
        for line in str(self).splitlines()[2:]:
            if not line.strip():
                break
            key, _, value = line.partition("  ")
            lines.append(f"| {key.strip()} | {value.strip()} |")
        if self.saved_tensors:
            lines += ["", "| saved (measured) | module | shape | dtype | bytes | resident |",
                      "|---|---|---|---|---:|---|"]
            for t in sorted(self.saved_tensors, key=lambda t: -(t.nbytes or 0)):
                size = "?" if t.nbytes is None else f"{t.nbytes:,}"
                lines.append(f"| {t.producer} | {t.module} | {list(t.shape)} | {t.dtype} | {size} | "
                             f"{'yes' if t.resident else 'no'} |")
        dropped = [t for t in self.saved_tensors_before if t.changed_by]
        if dropped:
            lines += ["", "| no longer saved | module | shape | dtype | bytes (computed) | why |",
                      "|---|---|---|---|---:|---|"]
            for t in sorted(dropped, key=lambda t: -(t.nbytes or 0)):
                lines.append(f"| {t.producer} | {t.module} | {list(t.shape)} | {t.dtype} | "
                             f"{t.nbytes or 0:,} | {t.changed_by} |")
        return "\n".join(lines)

    def saved_tensor_table(self, most: int = 12) -> str:
        """The largest saved tensors first; resident ones (inputs) are marked."""
        ranked = sorted(self.saved_tensors, key=lambda t: -(t.nbytes or 0))
        lines = [f"saved tensors: {len(ranked)} ({sum(t.resident for t in ranked)} resident inputs)",
                 f"{'producer':<28} {'shape':<22} {'dtype':<9} {'bytes':>12}"]
        for t in ranked[:most]:
            size = "?" if t.nbytes is None else f"{t.nbytes:,}"
            mark = " (input)" if t.resident else ""
            lines.append(f"{t.producer[:28]:<28} {str(list(t.shape))[:22]:<22} {t.dtype:<9} {size:>12}{mark}")
        if len(ranked) > most:
            lines.append(f"... {len(ranked) - most} more")
        return "\n".join(lines)


def _describe_not_scheduled(not_scheduled: dict[str, str], most: int = 3) -> str:
    """'2 in no optimizer ... (a, b); 3 requires_grad=False ... (c, d, e, +1 more)'."""
    by_reason: dict[str, list[str]] = {}
    for name, why in not_scheduled.items():
        by_reason.setdefault(why, []).append(name)
    parts = []
    for why, names in by_reason.items():
        shown = ", ".join(names[:most]) + (f", +{len(names) - most} more" if len(names) > most else "")
        parts.append(f"{len(names)} {why} ({shown})")
    return "; ".join(parts)


def _schedule_rows(schedule: dict[str, Any], stats: dict[str, float],
                   not_scheduled: set[str]) -> list[tuple[str, str]]:
    counts = [c for n, c in schedule["trained_steps"].items() if n not in not_scheduled]
    wall = stats.get("wall_seconds") or 0.0
    share = f"{stats['compile_share']:.1%} of {wall:.1f} s training" if wall else "no training yet"
    return [
        ("schedule", f"{schedule['policy']}, {schedule['steps']} optimizer steps"
                     + ("" if schedule["reschedule_every"] is None
                        else f", rescheduled every {schedule['reschedule_every']}")),
        ("distinct frozen sets", f"{schedule['distinct_sets']}"),
        ("trained steps per layer", f"min {min(counts, default=0)}, max {max(counts, default=0)}"
                                    + (" (scheduled layers)" if not_scheduled else "")),
        ("score bookkeeping peak", f"{schedule['snapshot_bytes_peak']:,} B"),
        ("compile share", share),
    ]


def _schedule_summary(slimfit: "SlimFit") -> dict[str, Any] | None:
    schedule = slimfit.schedule
    if schedule is None:
        return None
    return {
        "policy": schedule.name,
        "steps": schedule.step,
        "reschedule_every": schedule.reschedule_every,
        "distinct_sets": schedule.distinct_sets(),
        "trained_steps": dict(zip(schedule.layers, schedule.trained_counts())),
        "snapshot_bytes_peak": schedule.snapshot_bytes_peak,
    }


def build_report(slimfit: "SlimFit") -> Report:
    last = slimfit.last_step
    return Report(
        model=type(slimfit.model).__name__,
        backend=slimfit.config.backend,
        layers=slimfit.layers,
        frozen=tuple(sorted(slimfit.frozen if last is None else last.frozen)),
        saved_bytes=None if last is None else last.saved_bytes,
        stats=dict(slimfit.stats),
        pass_counters={} if last is None else dict(last.counters),
        saved_tensors=() if last is None else tuple(last.saved_tensors()),
        saved_tensors_before=() if last is None else tuple(last.saved_tensors_before_passes()),
        schedule=_schedule_summary(slimfit),
        not_scheduled=slimfit.not_scheduled,
        memory_budget=_budget_summary(slimfit),
    )


def _budget_summary(slimfit: "SlimFit") -> dict[str, Any] | None:
    fit = slimfit.fit
    if fit is None:
        return None
    prediction = None if fit.prediction is None else dataclasses.asdict(fit.prediction)
    return {"budget": fit.memory_budget, "predicted": prediction, "measured_peak": fit.meter.peak(),
            "predicted_for_sets_trained": fit.sets_peak,
            "measured_by": ("torch.cuda.max_memory_allocated" if fit.device.type == "cuda" else
                            "peak RSS above the RSS at compile, plus the weights")}


def _budget_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    mib = 2**20
    predicted, measured = summary["predicted"], summary["measured_peak"]
    rows = [("memory budget", f"{summary['budget'] / mib:,.1f} MiB")]
    if predicted is None:
        return rows + [("predicted peak", "chosen at the first training forward")]
    capped = predicted.get("limit") is not None
    rows.append(("predicted peak", f"{predicted['peak'] / mib:,.1f} MiB (weights {predicted['weights'] / mib:,.1f}"
                                   f" + gradients {predicted['gradients'] / mib:,.1f} + optimizer state "
                                   f"{predicted['optimizer_state'] / mib:,.1f} + saved {predicted['saved'] / mib:,.1f}"
                                   f" + transients {predicted['transients'] / mib:,.1f} + runtime overhead "
                                   f"{predicted['overhead'] / mib:,.1f}"
                                   + (f" + further layers within the limit {predicted['filled'] / mib:,.1f}"
                                      if capped else "") + ")"))
    count = f"{predicted['trained']} to {predicted['most_trained']}" if capped else f"{predicted['trained']}"
    rows.append(("chosen", f"freeze_ratio {predicted['freeze_ratio']:.3f} ({count} of {predicted['layers']} layers "
                           "train" + (", each step's set capped at the budget" if capped else "") +
                           f"), optimizer_state={predicted['optimizer_state_packing']!r}"))
    sets = summary.get("predicted_for_sets_trained")
    if capped and sets is not None:
        rows.append(("predicted for the sets trained", f"{sets / mib:,.1f} MiB (the largest prediction for a "
                                                       "set that trained since the choice; the cap bounds any set)"))
    if measured is None:
        rows.append(("measured peak", "from the third training forward on; not yet"))
    else:
        of_sets = f", {measured / sets:.0%} of predicted for the sets trained" if capped and sets else ""
        rows.append(("measured peak", f"{measured / mib:,.1f} MiB ({measured / predicted['peak']:.0%} of "
                                      f"predicted{of_sets}; {summary['measured_by']})"))
    return rows
