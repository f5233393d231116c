"""The graphs a variant was built from, stage by stage, and what its forward saves.

Read-only views for printing and for the report. Stages are copies taken as
the pipeline ran, so nothing here can change a graph that runs.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import fx

JOINT = "joint"
FORWARD = "forward"
BACKWARD = "backward"


def after(pass_name: str) -> str:
    return f"{JOINT} after {pass_name}"


@dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward hands to backward."""

    name: str  # node name in the forward graph
    producer: str  # the op that made it; "input" for graph inputs (parameters, user inputs)
    shape: tuple[int, ...]
    dtype: str
    nbytes: int | None  # bytes this tensor's storage holds, measured at run time
    resident: bool  # a graph input's storage: held anyway, not counted in saved_bytes


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node, with slimfit's tags shown where a pass left them."""
    lines = []
    for node in gm.graph.nodes:
        text = node.format_node() or ""
        tag = node.meta.get("slimfit")
        if tag:
            text += f"  # slimfit: {tag}"
        lines.append(text)
    return "\n".join(lines)


class VariantGraphs:
    """Ordered stages of one variant: the joint graph as traced, after each joint
    pass, then the forward and backward graphs the compiler was given."""

    def __init__(self) -> None:
        self.stages: dict[str, fx.GraphModule] = {}
        self.num_forward_outputs: int | None = None

    def __getitem__(self, stage: str) -> fx.GraphModule:
        if stage not in self.stages:
            raise KeyError(f"no stage {stage!r}; the stages are {list(self.stages)}")
        return self.stages[stage]

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def format(self, stage: str) -> str:
        return format_graph(self[stage])

    def diff(self, before: str, after: str) -> str:
        """Unified diff between two stages' node listings."""
        return "\n".join(difflib.unified_diff(
            self.format(before).splitlines(), self.format(after).splitlines(),
            fromfile=before, tofile=after, lineterm="", n=1,
        ))

    def __str__(self) -> str:
        return "\n\n".join(f"=== {stage} ===\n{self.format(stage)}" for stage in self.stages)

    def saved_nodes(self) -> list[fx.Node]:
        """Forward outputs that are saved for backward: tensors, then symbolic sizes."""
        if FORWARD not in self.stages or self.num_forward_outputs is None:
            return []
        outputs = self.stages[FORWARD].graph.output_node().args[0]
        return [n for n in outputs[self.num_forward_outputs:] if isinstance(n, fx.Node)]

    def saved_tensors(self, measured: list[tuple[int, bool]] | None) -> list[SavedTensor]:
        """The forward's saved tensors; `measured` is (bytes, resident) per tensor
        in the order autograd packed them, as recorded at run time."""
        nodes = [n for n in self.saved_nodes() if isinstance(n.meta.get("val"), torch.Tensor)]
        if measured is not None and len(measured) != len(nodes):
            measured = None  # cannot pair them one to one: show shapes only
        result = []
        for index, node in enumerate(nodes):
            val = node.meta["val"]
            nbytes, resident = measured[index] if measured is not None else (None, node.op == "placeholder")
            result.append(SavedTensor(
                name=node.name,
                producer="input" if node.op == "placeholder" else _op_name(node.target),
                shape=tuple(val.shape),
                dtype=str(val.dtype).removeprefix("torch."),
                nbytes=nbytes,
                resident=resident,
            ))
        return result


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.removesuffix(".default")
