"""The graphs a compiled region was built from, stage by stage, and what its forward saves.

Read-only views for printing and for the report. Stages are copies taken as
the pipeline ran, so nothing here can change a graph that runs.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

import torch
from torch import fx

from . import capture, torch_ir

JOINT = "joint"
FORWARD = "forward"
BACKWARD = "backward"
FORWARD_BEFORE = "forward before passes"
BACKWARD_BEFORE = "backward before passes"


def after(pass_name: str) -> str:
    return f"{JOINT} after {pass_name}"


@dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward hands to backward."""

    name: str  # node name in the forward graph
    producer: str  # the op that made it; "input" for graph inputs (parameters, user inputs)
    module: str  # the module whose forward made it, or the parameter's name; "" if unknown
    shape: tuple[int, ...]
    dtype: str
    nbytes: int | None  # bytes this tensor's storage holds
    resident: bool  # a graph input's storage: held anyway, not counted in saved_bytes
    measured: bool  # nbytes seen at run time (True) or computed from the graph (False)
    changed_by: str = ""  # which pass changed this tensor's fate, and how
    storage: str = ""  # the node whose storage this tensor lives in (itself unless a view)


def distinct_bytes(tensors, include_resident: bool = False) -> int:
    """Bytes of distinct storages: views of one base count once."""
    seen: dict[str, int] = {}
    for t in tensors:
        if (include_resident or not t.resident) and t.nbytes:
            key = t.storage or t.name
            seen[key] = max(seen.get(key, 0), t.nbytes)
    return sum(seen.values())


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


class RegionGraphs:
    """Ordered stages of one compiled region: the joint graph as traced, after each joint
    pass, then the forward and backward graphs the compiler was given."""

    def __init__(self, input_names: tuple[str | None, ...] = ()) -> None:
        self.stages: dict[str, fx.GraphModule] = {}
        self.num_forward_outputs: int | None = None
        self.input_names = input_names

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

    def saved_nodes(self, stage: str = FORWARD) -> list[fx.Node]:
        """Forward outputs that are saved for backward: tensors, then symbolic sizes."""
        if stage not in self.stages or self.num_forward_outputs is None:
            return []
        outputs = self.stages[stage].graph.output_node().args[0]
        return [n for n in outputs[self.num_forward_outputs:] if isinstance(n, fx.Node)]

    def saved_tensors(self, measured: list[tuple[int, bool]] | None = None,
                      stage: str = FORWARD) -> list[SavedTensor]:
        """The saved tensors of a forward stage. `measured` is (bytes, resident) per
        tensor in the order autograd packed them at run time; without it, bytes
        are computed from the graph's shapes and marked measured=False."""
        nodes = [n for n in self.saved_nodes(stage) if isinstance(n.meta.get("val"), torch.Tensor)]
        if measured is not None and len(measured) != len(nodes):
            measured = None  # cannot pair them one to one: fall back to the graph's shapes
        result = []
        for index, node in enumerate(nodes):
            val = node.meta["val"]
            root = _storage_root(node)
            if measured is not None:
                nbytes, resident = measured[index]
            else:
                nbytes, resident = _graph_nbytes(root.meta.get("val", val)), root.op == "placeholder"
            result.append(SavedTensor(
                name=node.name,
                producer="input" if node.op == "placeholder" else _op_name(node.target),
                module=self._module_of(node),
                shape=tuple(capture.size_hint(d) or -1 for d in val.shape),
                dtype=str(val.dtype).removeprefix("torch."),
                nbytes=nbytes,
                resident=resident,
                measured=measured is not None,
                storage=root.name,
                changed_by=_compressed_note(node),
            ))
        return result

    def saved_tensors_before_passes(self, pass_names: tuple[str, ...]) -> list[SavedTensor]:
        """What the untouched joint's forward saves, each marked if the passes
        (`pass_names`, in order) left it out of the forward that runs."""
        saved = self.saved_nodes(FORWARD)
        kept = {n.name for n in saved}
        compressed = {n.meta["slimfit"]["compress_saved"]["from"]: _compressed_note(n)
                      for n in saved if "compress_saved" in n.meta.get("slimfit", {})}
        note = f"{' + '.join(pass_names)}: no longer saved"
        return [dataclasses.replace(t, changed_by=compressed[t.name]) if t.name in compressed
                else t if t.name in kept else dataclasses.replace(t, changed_by=note)
                for t in self.saved_tensors(stage=FORWARD_BEFORE)]

    def _module_of(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            index = torch_ir.forward_input_index(node.name)
            name = self.input_names[index] if index is not None and index < len(self.input_names) else None
            return name or ""
        # Views and detaches made while tracing backward carry no module; the
        # storage they alias does.
        paths = torch_ir.module_path(node) or torch_ir.module_path(_storage_root(node))
        return paths[-1] if paths else ""


def _compressed_note(node: fx.Node) -> str:
    tag = node.meta.get("slimfit", {}).get("compress_saved")
    if not isinstance(tag, dict):
        return ""
    return (f"compress_saved: {tag['kind']} as {tag['format']} "
            f"({tag['bytes_before']:,} -> {tag['bytes_after']:,} B)")


def _storage_root(node: fx.Node) -> fx.Node:
    """Follow view ops (detach and transpose included) back to the node that owns the storage."""
    while node.op == "call_function" and getattr(node.target, "is_view", False) and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _graph_nbytes(val: torch.Tensor) -> int | None:
    numel = 1
    for dim in val.shape:
        size = capture.size_hint(dim)
        if size is None:
            return None
        numel *= size
    return numel * val.element_size()


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.removesuffix(".default")
