"""The run-time engine: one compile per distinct region, any frozen set at run time.

Dynamo captures a forward once. For training, the graph is split into regions
(one per repeated block, plus the code between blocks); each distinct region is
compiled once, with every layer weight's gradient tapped out of it
(`regions.tap_weight_grads`). At run time the frozen set in force decides, per
layer use, whether its stashed input is kept and its weight gradient formed
(`weight_grads`), so a new frozen set never compiles anything. This module
never decides the frozen set; it only reads it (`FrozenLayers`). `Engine`
holds one compiled model's rooms, each with its one writer: the config, the
region cache, the frozen set and the log of steps.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import capture, regions, torch_ir
from .config import CompressionConfig
from .graphs import (BACKWARD, BACKWARD_BEFORE, FORWARD, FORWARD_BEFORE, JOINT, SavedTensor,
                     RegionGraphs, after)
from .memory import run_counting_saved_bytes
from .passes import JOINT_PASSES, PARTITION_PASSES, PassContext
from .passes.compress import Packing
from .passes.compress.registry import first_format
from .weight_grads import TapGrad, TapSlot, autocast_state, weight_grad_graph

log = logging.getLogger(__name__)


@dataclass
class CompiledRegion:
    """One compiled forward/backward pair, shared by every region with its structure."""

    name: str  # the first region's block (or "region N") that built it
    fn: Callable[..., Any]
    taps: list[regions.WeightTap]
    probe_shapes: capture.ShapeBinding  # each tap's probe shape, for the sizes of a call's inputs
    num_outputs: int  # the region's own outputs; the stashed operands follow
    returns_tuple: bool
    compile_seconds: float
    counters: dict[str, int]
    graphs: RegionGraphs
    instances: int = 0
    # per tap: (stash entry, shape, dtype) of each operand a trainable use keeps
    # that is not held anyway (parameters, the graph's own inputs), from the
    # compile's fake values
    stash_operands: list[list[tuple[tuple[str, int], tuple[int, ...], torch.dtype]]] = field(default_factory=list)

    def saved_tensors(self, record: list[tuple[int, bool]] | None) -> list[SavedTensor]:
        return self.graphs.saved_tensors(record)


class Region(torch.nn.Module):
    """One region of the split graph: runs its compiled code with the current frozen set."""

    def __init__(self, index: int, block: str | None, input_positions: tuple[int | None, ...],
                 graph: "CapturedGraph") -> None:
        super().__init__()
        # Each input's position among its dynamo graph's inputs (None: an activation
        # made in the graph); the layer it carries is named per call (see
        # CapturedGraph.call_names), as one graph may serve several blocks.
        self.index, self.block, self.input_positions = index, block, input_positions
        self.compiled: CompiledRegion | None = None
        object.__setattr__(self, "graph", graph)  # not a submodule
        object.__setattr__(self, "engine", graph.engine)

    def forward(self, *args: Any) -> Any:
        engine, compiled = self.engine, self.compiled
        frozen = engine.frozen_layers.names
        step = engine.steps.current
        names = self.graph.call_names
        call_args = list(args)
        slots: list[TapSlot | None] = []
        probes = []
        for tap, shape in zip(compiled.taps, compiled.probe_shapes(args)):
            weight = args[tap.weight_input]
            call_args[tap.weight_input] = weight.detach()
            position = self.input_positions[tap.weight_input]
            trains = names[position] not in frozen and weight.requires_grad
            slot = TapSlot(tap, weight) if trains else None
            slots.append(slot)
            # A frozen use's probe needs no autograd node: the region's backward
            # still hands out its gradient, and autograd drops it.
            probes.append(TapGrad.apply(weight, slot, shape, tap.probe_dtype) if trains
                          else engine.cache.zeros(weight.device, tap.probe_dtype).expand(shape))
        start = len(step.record)
        outputs = compiled.fn(*call_args, *probes)
        step.calls.append((self, step.record[start:]))
        stashed = outputs[compiled.num_outputs:]
        packed: dict[int, Any] = {}
        for slot in slots:
            if slot is not None:
                step.stash(slot, slot.tap.operands(args, stashed), args, packed, engine.config.compression)
        if engine.config.measures_stash():  # the byte budget's per-layer stash, while it chooses
            for tap in compiled.taps:
                step.read_by(names[self.input_positions[tap.weight_input]], tap.operands(args, stashed))
        result = outputs[:compiled.num_outputs]
        return tuple(result) if compiled.returns_tuple else result[0]


@dataclass(frozen=True)
class EngineConfig:
    """What the engine reads and never changes; built by `SlimFit` at compile.

    `names_by_id` (a graph input's layer name, by the parameter's identity) is
    the one exception: FSDP2 (fully_shard) swaps other parameter objects in for
    each forward, so the capture backend refreshes it before each capture, and a
    graph call that meets a parameter it does not know calls `refresh_names`.
    """

    backend: str
    names_by_id: dict[int, str]
    layers: frozenset[str]
    blocks: tuple[str, ...]
    compression: CompressionConfig | None = None
    activation_memory_budget: float | None = None
    refresh_names: Callable[[], None] = lambda: None
    # called after every training forward with its graph and StepRecord (the byte budget's)
    after_training_forward: Callable[["CapturedGraph", "StepRecord"], None] | None = None
    # whether this training forward should note who reads each stashed operand
    # (StepInProgress.read_by): only while the byte budget still chooses
    measures_stash: Callable[[], bool] = lambda: False


class FrozenLayers:
    """The frozen set in force: the one place it lives.

    Written only by whoever picks the set: the schedule (through its
    `apply_frozen` callback) or, where no schedule chooses, `cm.slimfit.set_frozen`.
    The engine, the optimizer-state store and `cm.slimfit.frozen` only read it.
    """

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self._names = frozenset(names)

    @property
    def names(self) -> frozenset[str]:
        """The frozen set the next forward uses."""
        return self._names

    def set(self, names: frozenset[str]) -> None:
        """Put `names` in force from the next forward on."""
        self._names = frozenset(names)


@dataclass
class RegionCache:
    """What capture and compile built, kept for every later step; nothing per step.

    Written by `CapturedGraph` when dynamo captures a graph (`graphs`) and when
    it compiles a region it has not seen (`compiled`, `compile_seconds`); the
    stats and the report read it. `zeros` adds a constant the first time a
    region call needs it for a device and dtype.
    """

    graphs: list["CapturedGraph"] = field(default_factory=list)
    compiled: dict[tuple, CompiledRegion] = field(default_factory=dict)
    compile_seconds: float = 0.0
    _zeros: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def zeros(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One 0-dim zero per (device, dtype): frozen uses' probes expand it."""
        key = (device, dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), device=device, dtype=dtype)
        return self._zeros[key]


@dataclass
class StepInProgress:
    """What one training forward is doing, until it finishes as a `StepRecord`.

    Written during that forward only: `record` by the saved-tensor hooks
    (`run_counting_saved_bytes`), `calls` and the stash by each `Region` it runs.
    """

    record: list[tuple[int, bool]] = field(default_factory=list)
    calls: list[tuple["Region", list[tuple[int, bool]]]] = field(default_factory=list)
    stash_bytes: dict[int, int] = field(default_factory=dict)
    stash_counters: Counter = field(default_factory=Counter)
    # By the storage of a stashed operand as forward made it: the storages kept
    # for it (itself, or its packed form), and, where the byte budget asks
    # (`read_by`), every layer whose use reads it, frozen or not
    stash_sources: dict[int, set[int]] = field(default_factory=dict)
    stash_readers: dict[int, set[str]] = field(default_factory=dict)
    layer_sources: dict[str, set[int]] = field(default_factory=dict)

    def read_by(self, layer: str, operands: list[Any]) -> None:
        """Note that `layer`'s use reads `operands` for its weight gradient."""
        sources = self.layer_sources.setdefault(layer, set())
        for operand in operands:
            if isinstance(operand, torch.Tensor) and not isinstance(operand, torch.nn.Parameter):
                ptr = operand.untyped_storage().data_ptr()
                sources.add(ptr)
                self.stash_readers.setdefault(ptr, set()).add(layer)

    def stash_by_layer(self, uncounted: set[int]) -> dict[str, int]:
        """Per layer whose every operand some trainable use stashed this step, its
        share of the bytes kept for them, each storage split evenly among the
        layers that read it (as `CapturedGraph.stash_bytes_by_layer` splits by
        shape), storages in `uncounted` (held anyway) free. Empty without `read_by`."""
        if not self.layer_sources:
            return {}
        kept = {src: sum(self.stash_bytes.get(ptr, 0) for ptr in stored if ptr not in uncounted)
                for src, stored in self.stash_sources.items()}
        return {layer: sum(kept[src] // len(self.stash_readers[src]) for src in sources)
                for layer, sources in self.layer_sources.items() if all(src in kept for src in sources)}

    def stash(self, slot: TapSlot, operands: list[Any], args: tuple, packed: dict[int, Any],
              compression: CompressionConfig | None) -> None:
        """Keep a trainable use's operands for its weight gradient, stored as the
        compression config says (the FFN output dense's input, GELU output, in
        the paper's int8; every trainable layer's input per-row under weight_input)."""
        kind, fmt = _stash_format(compression, slot.tap)
        # parameters are held anyway: by storage, since an operand may be another
        # view of one (a detached weight)
        resident = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.nn.Parameter)}
        kept = []
        for operand in operands:
            if isinstance(operand, torch.Tensor) and _stored_packed(fmt, operand.dtype, operand.dim()) \
                    and operand.untyped_storage().data_ptr() not in resident:
                if id(operand) not in packed:
                    packed[id(operand)] = (fmt.pack(operand), operand.shape, operand.dtype)
                    self.stash_counters[f"compressed_{kind}"] += 1
                kept.append(packed[id(operand)])
            else:
                kept.append(operand)
        for operand, item in zip(operands, kept):
            stored = self.stash_sources.setdefault(operand.untyped_storage().data_ptr(), set()) \
                if isinstance(operand, torch.Tensor) else set()
            for t in (item[0] if isinstance(item, tuple) else (item,)):
                storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
                if storage is not None and storage.data_ptr() not in resident:
                    self.stash_bytes[storage.data_ptr()] = storage.nbytes()
                    stored.add(storage.data_ptr())
        slot.operands = kept
        if fmt is not None:
            slot.unpack = functools.partial(_unpack_stashed, fmt)


@dataclass
class StepLog:
    """What the captured graphs' calls did: the step under way, the last one
    finished (`last_step`, which the report reads) and the training clock.

    Written only by `CapturedGraph`: by its calls, and by the first training
    compile, whose start begins the training wall time.
    """

    graph_calls: int = 0
    # every layer a training call of a captured graph took as an input; a layer
    # used in the forward but not here ran where dynamo fell back to eager
    layers_seen: set[str] = field(default_factory=set)
    current: StepInProgress = field(default_factory=StepInProgress)
    last_step: "StepRecord | None" = None
    first_training_call: float | None = None
    last_training_call_end: float | None = None

    def wall_seconds(self) -> float:
        """Training wall time: from the first training forward (compiling included)
        to the end of the latest one, so it stops growing when training stops."""
        start, end = self.first_training_call, self.last_training_call_end
        return 0.0 if start is None or end is None else end - start


@dataclass(frozen=True)
class Engine:
    """The rooms of one compiled model's engine, shared by all of its graphs and
    regions; each room says who writes it."""

    config: EngineConfig
    frozen_layers: FrozenLayers = field(default_factory=FrozenLayers)
    cache: RegionCache = field(default_factory=RegionCache)
    steps: StepLog = field(default_factory=StepLog)

    def capture_backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The torch.compile backend: called once per dynamo graph."""
        graph = CapturedGraph(len(self.cache.graphs), gm, example_inputs, self)
        self.cache.graphs.append(graph)
        return graph


# The kinds a stashed operand may be stored as, first choice first, by the op
# that made it (regions.WeightTap.producer): a gated FFN's down projection input
# is stored like the gate's factors; any operand is a weight_input when its own
# kind is kept whole. Its counter compressed_<name> names the kind, but for a
# gate product's.
_STASHED_KINDS = {"gelu": ["gelu_output", "weight_input"], "gate_product": ["gate_operand", "weight_input"]}
_COUNTER_NAME = {"gate_operand": "gate_product"}


def _stash_format(config: CompressionConfig | None, tap: regions.WeightTap) -> tuple[str | None, Packing | None]:
    """(counter name, format) for a tap's stashed float operands, from the
    compression registry; (None, None) keeps them."""
    if config is None:
        return None, None
    kind, packing = first_format(config, _STASHED_KINDS.get(tap.producer, ["weight_input"]), None)
    return (None, None) if packing is None else (_COUNTER_NAME.get(kind, kind), packing)


def _stored_packed(packing: Packing | None, dtype: torch.dtype, ndim: int) -> bool:
    """Whether a stashed operand is stored in `packing`'s format: float tensors of
    two or more dims; anything else (integer inputs, vectors) is kept as it is."""
    return packing is not None and dtype.is_floating_point and ndim >= 2


def _unpack_stashed(packing: Packing, items: list[Any]) -> list[Any]:
    """A slot's operands as its weight gradient reads them: packed ones unpacked."""
    return [packing.unpack(*item) if isinstance(item, tuple) else item for item in items]


@dataclass
class StepRecord:
    """What one finished training forward ran: the frozen set, each region call's
    saved tensors as measured, and the stashed operands of trainable layers.
    Made by `CapturedGraph` from its `StepInProgress`; read by the report."""

    frozen: frozenset[str]
    saved_bytes: int
    stash_bytes: int
    calls: list[tuple[Region, list[tuple[int, bool]]]]
    stash_counters: dict[str, int] = field(default_factory=dict)
    # measured, per layer whose stash this step held (StepInProgress.stash_by_layer);
    # empty unless the byte budget asked
    stash_by_layer: dict[str, int] = field(default_factory=dict)

    @property
    def counters(self) -> dict[str, int]:
        """The passes' counters summed over the regions the step ran, plus the
        layer inputs packed at run time for the weight gradients of trainable layers."""
        total: Counter = Counter()
        for region, _ in self.calls:
            total.update(region.compiled.counters)
        total.update(self.stash_counters)
        return dict(total)

    def saved_nodes(self, stage: str = FORWARD) -> list[fx.Node]:
        """The saved-tensor nodes of `stage` in every region call of the step, in order."""
        return [n for region, _ in self.calls for n in region.compiled.graphs.saved_nodes(stage)]

    def graph_nodes(self, stage: str) -> list[fx.Node]:
        """Every node of `stage` in every region call of the step, in order."""
        return [n for region, _ in self.calls for n in region.compiled.graphs[stage].graph.nodes]

    @property
    def graphs(self) -> RegionGraphs:
        """The graphs of the region most of this step's regions ran (the repeated block)."""
        compiled = Counter(id(region.compiled) for region, _ in self.calls)
        return max((region.compiled for region, _ in self.calls),
                   key=lambda c: (compiled[id(c)], len(c.taps))).graphs

    def saved_tensors(self) -> list[SavedTensor]:
        result = []
        for region, record in self.calls:
            result += [_rename(t, region) for t in region.compiled.saved_tensors(record)]
        return result

    def saved_tensors_before_passes(self) -> list[SavedTensor]:
        result = []
        for region, _ in self.calls:
            graphs = region.compiled.graphs
            result += [_rename(t, region)
                       for t in graphs.saved_tensors_before_passes(tuple(p.__name__ for p in JOINT_PASSES))]
        return result


def _rename(tensor: SavedTensor, region: Region) -> SavedTensor:
    """A shared region's tensors carry the module names of the block that built it,
    and node and storage names of their region call: every call of a shared region
    holds storages of its own, so `distinct_bytes` must count each call's."""
    first, own = region.compiled.name, region.block
    module = tensor.module
    if own and first and (module == first or module.startswith(first + ".")):
        module = own + module[len(first):]
    elif own and not module:
        module = own  # a block region's input (the hidden state it was handed), by its block
    storage = f"{region.index}:{tensor.storage}" if tensor.storage else ""
    return dataclasses.replace(tensor, module=module, name=f"{region.index}:{tensor.name}", storage=storage)


class CapturedGraph:
    """One dynamo graph. Training calls run its regions; inference runs one compile."""

    def __init__(self, graph_id: int, gm: fx.GraphModule, example_inputs: list[Any],
                 engine: Engine) -> None:
        self.graph_id = graph_id
        self.engine = engine
        self.tracing_context = capture.current_tracing_context()
        self.input_names = self._names(example_inputs)
        # The parameter names of the call under way: a graph that serves several
        # blocks (one dynamo graph per block's forward, when fully_shard on each
        # block splits the capture) gets another block's parameters each call.
        self.call_names = self.input_names
        self.builds_backward = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
        )
        fake = capture.fake_inputs(example_inputs, self.tracing_context)
        start = time.perf_counter()
        if self.builds_backward and engine.steps.first_training_call is None:
            engine.steps.first_training_call = start  # compiling counts in the training wall time
        if self.builds_backward:
            self.fn = self._build_regions(gm)
        else:
            self.fn = capture.compile_region(
                gm, fake, backend=engine.config.backend, joint_pass=lambda g: g,
                partition_pass=lambda f, b, n: (f, b), on_partition=lambda *a: None,
                tracing_context=self.tracing_context)
        engine.cache.compile_seconds += time.perf_counter() - start

    def _build_regions(self, gm: fx.GraphModule) -> fx.GraphModule:
        config, cache = self.engine.config, self.engine.cache
        self.checkpoints = capture.inline_activation_checkpoints(gm)
        split = regions.split_regions(gm, config.blocks)
        top_inputs = {n: i for i, n in enumerate(n for n in split.graph.nodes if n.op == "placeholder")}
        for index, node in enumerate(n for n in split.graph.nodes if n.op == "call_module"):
            sub = getattr(split, node.target)
            positions = tuple(top_inputs.get(a) for a in node.args)
            names = tuple(None if i is None else self.input_names[i] for i in positions)
            activations = frozenset(i for i, a in enumerate(node.args) if a not in top_inputs)
            is_weight = [name in config.layers for name in names]
            block = _region_block(sub, config.blocks)
            region = Region(index, block, positions, self)
            key = (regions.structural_key(sub, is_weight), activations)
            compiled = cache.compiled.get(key)
            if compiled is None:
                compiled = self._compile_region(sub, is_weight, names, block or f"region {index}", activations,
                                                block)
                cache.compiled[key] = compiled
            compiled.instances += 1
            region.compiled = compiled
            setattr(split, node.target, region)
        split.recompile()
        return split

    def _compile_region(self, sub: fx.GraphModule, is_weight: list[bool], names: tuple[str | None, ...],
                        name: str, activations: frozenset[int], block: str | None) -> CompiledRegion:
        config = self.engine.config
        tapped, taps, num_outputs = regions.tap_weight_grads(sub, is_weight)
        returns_tuple = isinstance(sub.graph.output_node().args[0], (tuple, list))
        example = []
        for node, weight in zip((n for n in tapped.graph.nodes if n.op == "placeholder"),
                                [*is_weight, *([False] * len(taps))]):
            value = torch_ir.dynamo_value(node)
            if node.name.startswith("slimfit_probe_"):
                with value.fake_mode:
                    value = torch.zeros((), dtype=value.dtype, device=value.device).expand(
                        value.shape).requires_grad_(True)
            elif weight and isinstance(value, torch.Tensor):
                value = value.detach()
            example.append(value)
        input_names = (*names, *([None] * len(taps)))
        # Layer weights enter detached (their gradients are tapped out); parameters
        # that are no layer because they never train (requires_grad=False: a peft
        # model's base weights, its norms among them) get no gradient either.
        never_trained = {n for n, value in zip(names, example)
                         if n is not None and isinstance(value, torch.Tensor) and not value.requires_grad}
        ctx = PassContext(input_names=input_names,
                          frozen=frozenset(n for n, w in zip(names, is_weight) if w) | never_trained,
                          compression=config.compression, in_block=block is not None,
                          stashed_outputs=len(tapped.graph.output_node().args[0]) - num_outputs,
                          activation_inputs=activations)
        graphs = RegionGraphs(input_names)

        def joint_pass(gm: fx.GraphModule) -> fx.GraphModule:
            graphs.stages[JOINT] = capture.copy_graph_module(gm)
            for each in JOINT_PASSES:
                gm = each(gm, ctx)
                graphs.stages[after(each.__name__)] = capture.copy_graph_module(gm)
            return gm

        def partition_pass(forward, backward, num_outputs):
            for each in PARTITION_PASSES:
                forward, backward = each((forward, backward), num_outputs, ctx)
            return forward, backward

        def on_partition(forward, backward, num_outputs, partition) -> None:
            if JOINT in graphs.stages:
                before = partition(capture.copy_graph_module(graphs.stages[JOINT]))
                graphs.stages[FORWARD_BEFORE], graphs.stages[BACKWARD_BEFORE] = before
            graphs.stages[FORWARD] = capture.copy_graph_module(forward)
            graphs.stages[BACKWARD] = capture.copy_graph_module(backward)
            graphs.num_forward_outputs = num_outputs

        start = time.perf_counter()
        fn = capture.compile_region(
            tapped, example, backend=config.backend, memory_budget=config.activation_memory_budget,
            joint_pass=joint_pass, partition_pass=partition_pass, on_partition=on_partition,
            tracing_context=self.tracing_context, unsaved_outputs=ctx.stashed_outputs)
        # Every layer's weight-gradient graph now, on the region's fake values and
        # the autocast it compiles under, so a layer that first trains later
        # compiles nothing (another dtype or autocast traces when first seen).
        stashed = [torch_ir.dynamo_value(n) for n in tapped.graph.output_node().args[0][num_outputs:]]
        probes = example[len(is_weight):]
        for tap, probe in zip(taps, probes):
            weight = example[tap.weight_input]
            weight_grad_graph(tap, weight, tap.operands(example, stashed), probe,
                              autocast_state(weight.device))
        probe_shapes = capture.ShapeBinding(example[:len(is_weight)], [p.shape for p in probes])
        stash_operands = [[((where, i), tuple(capture.size_hint(d) or 0 for d in value.shape), value.dtype)
                           for (where, i), value in zip(tap.stash, tap.operands(example, stashed))
                           if isinstance(value, torch.Tensor)
                           and (where == "output" or (i in activations and not is_weight[i]))]
                          for tap in taps]
        seconds = time.perf_counter() - start
        ctx.counters["weight_uses_tapped"] += len(taps)
        log.info("%s: compiled a %s region in %.2f s; %d weight uses tapped; %s", name,
                 config.backend, seconds, len(taps),
                 ", ".join(f"{k}={v}" for k, v in sorted(ctx.counters.items())))
        return CompiledRegion(name=name, fn=fn, taps=taps, probe_shapes=probe_shapes, num_outputs=num_outputs,
                              returns_tuple=returns_tuple, compile_seconds=seconds,
                              counters=dict(ctx.counters), graphs=graphs, stash_operands=stash_operands)

    def stash_bytes_by_layer(self) -> dict[str, int]:
        """Per layer, the bytes its trainable uses stash for the weight gradient in
        one training forward of this graph (the layers of its latest call), as the
        compression config stores them, from the compiled shapes. An operand
        several uses share (Q, K and V's input) is split evenly among them."""
        by_layer: Counter = Counter()
        compression = self.engine.config.compression
        for region in self.fn.modules():
            if not isinstance(region, Region):
                continue
            compiled = region.compiled
            users = Counter(key for items in compiled.stash_operands for key, _, _ in items)
            for tap, items in zip(compiled.taps, compiled.stash_operands):
                _, fmt = _stash_format(compression, tap)
                for key, shape, dtype in items:
                    nbytes = (fmt.nbytes(shape, dtype) if _stored_packed(fmt, dtype, len(shape))
                              else math.prod(shape) * dtype.itemsize)
                    by_layer[self.call_names[region.input_positions[tap.weight_input]]] += nbytes // users[key]
        return dict(by_layer)

    def _names(self, inputs: Any) -> tuple[str | None, ...]:
        names_by_id = self.engine.config.names_by_id
        return tuple(names_by_id.get(id(x)) if isinstance(x, torch.nn.Parameter) else None for x in inputs)

    def __call__(self, *args: Any) -> Any:
        steps = self.engine.steps
        steps.graph_calls += 1
        training = self.builds_backward and torch.is_grad_enabled()
        if not training:
            return self.fn(*args)
        names = self._names(args)
        if any(n is None and isinstance(x, torch.nn.Parameter) for n, x in zip(names, args)):
            self.engine.config.refresh_names()  # fully_shard made new parameter objects
            names = self._names(args)
        self.call_names = names
        steps.layers_seen.update(n for n in names if n is not None and n in self.engine.config.layers)
        if steps.first_training_call is None:
            steps.first_training_call = time.perf_counter()
        step = steps.current = StepInProgress()
        frozen = self.engine.frozen_layers.names
        try:
            held: dict[int, int] = {}
            outputs, _ = run_counting_saved_bytes(self.fn, *args, record=step.record, held=held)
            # a stashed operand may be a tensor a region also saved, or one of this
            # call's inputs (held anyway, as run_counting_saved_bytes counts them): each storage once
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            stash_only = {ptr: n for ptr, n in step.stash_bytes.items() if ptr not in held and ptr not in inputs}
            steps.last_step = StepRecord(frozen=frozen, saved_bytes=sum(held.values()) + sum(stash_only.values()),
                                         stash_bytes=sum(stash_only.values()), calls=step.calls,
                                         stash_counters=dict(step.stash_counters),
                                         stash_by_layer=step.stash_by_layer(held.keys() | inputs))
        finally:
            steps.current = StepInProgress()
            steps.last_training_call_end = time.perf_counter()
        if self.engine.config.after_training_forward is not None:
            self.engine.config.after_training_forward(self, steps.last_step)
        return outputs


def _region_block(sub: fx.GraphModule, blocks: tuple[str, ...]) -> str | None:
    blocks_set = set(blocks)
    for node in sub.graph.nodes:
        if node.op == "call_function" or node.op == "call_method":
            block = regions.block_of(node, blocks_set)
            if block is not None:
                return block
    return None
