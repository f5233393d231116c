"""PNG charts of a report: memory breakdown (eager vs slimfit) and saved bytes per module.

Each function draws only values it is given and returns them, so a caller (or a
test) can check the picture against the report. matplotlib is imported lazily.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from .graphs import SavedTensor, distinct_bytes
from .memory import MemoryBreakdown

if TYPE_CHECKING:
    import torch

MIB = 2**20


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    return plt


def plot_memory(breakdown: MemoryBreakdown, path: str | Path) -> dict[str, dict[str, float]]:
    """Stacked bars, one per side; returns the MiB drawn per side and component."""
    plt = _pyplot()
    drawn: dict[str, dict[str, float]] = {"eager": {}, "slimfit": {}}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    bottoms = [0.0, 0.0]
    for row in breakdown.rows:
        values = [(row.eager or 0) / MIB, (row.slimfit or 0) / MIB]
        estimated = (not row.eager_measured, not row.slimfit_measured)
        bars = ax.bar(["eager", "slimfit"], values, bottom=bottoms, label=row.component)
        for bar, est in zip(bars, estimated):
            if est:
                bar.set_hatch("//")
        drawn["eager"][row.component], drawn["slimfit"][row.component] = values
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("MiB")
    ax.set_title("memory of one training step (hatched: estimated)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def group_of(module: str) -> str:
    """Collapse a module path to its repeated block: bert.encoder.layer.3.attention -> bert.encoder.layer.3."""
    match = re.match(r"(.*?\.\d+)(\.|$)", module)
    return match.group(1) if match else (module or "(other)")


def saved_by_group(tensors: tuple[SavedTensor, ...]) -> dict[str, int]:
    """Saved bytes per block, each storage once (views of one base count once)."""
    groups: dict[str, list[SavedTensor]] = defaultdict(list)
    for t in tensors:
        groups[group_of(t.module)].append(t)
    totals = {g: distinct_bytes(ts) for g, ts in groups.items()}
    return {g: b for g, b in totals.items() if b}


def plot_saved_by_module(before: tuple[SavedTensor, ...], after: tuple[SavedTensor, ...],
                         path: str | Path) -> dict[str, tuple[float, float]]:
    """Bars per block of saved bytes before and after slimfit's passes; returns MiB drawn."""
    plt = _pyplot()
    b, a = saved_by_group(before), saved_by_group(after)
    groups = sorted(set(b) | set(a), key=lambda g: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", g)])
    drawn = {g: (b.get(g, 0) / MIB, a.get(g, 0) / MIB) for g in groups}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 2), 4.5))
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], [drawn[g][0] for g in groups], width=0.4, label="before passes (computed)")
    ax.bar([x + 0.2 for x in xs], [drawn[g][1] for g in groups], width=0.4, label="slimfit (measured)")
    ax.set_xticks(list(xs), groups, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("module (repeated blocks as one bar each; (other): no module recorded)")
    ax.set_ylabel("MiB saved for backward")
    # two lines: as one it is wider than the narrowest figure (6 in) and was cut off
    ax.set_title("bytes held from forward to backward, per module:\nbefore slimfit's passes and after")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_schedule(trained: "torch.Tensor", layers: tuple[str, ...], path: str | Path) -> Path:
    """Heatmap, layers x optimizer steps: dark where the layer trained that step.
    `trained` is the schedule's bool (layers x steps) history."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    steps = trained.shape[1]
    # One row per layer, each row at least 0.09 in, so names stay legible from
    # a handful of layers to a few hundred; the picture grows instead.
    height = max(3.5, 1.5 + 0.09 * len(layers))
    fig, ax = plt.subplots(figsize=(min(6 + steps / 20, 18), height))
    ax.imshow(trained.float().numpy(), aspect="auto", interpolation="nearest", cmap="Greys",
              vmin=0, vmax=1)
    counts = trained.sum(dim=1).tolist()
    ax.set_xlabel(f"optimizer step ({steps} steps)")
    ax.set_ylabel(f"layer ({len(layers)}, in named_parameters order)")
    ax.set_title(f"layers trained per step\n(trained steps per layer: min {min(counts, default=0)}, "
                 f"max {max(counts, default=0)})")
    ax.set_yticks(range(len(layers)), [name[-48:] for name in layers], fontsize=6)
    ax.legend(handles=[Patch(facecolor="black", label="trained"),
                       Patch(facecolor="white", edgecolor="grey", label="frozen")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
