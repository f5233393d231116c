"""Frozen-set keyed variants of each captured graph, and the run-time guard.

Dynamo captures a forward once; this module compiles one forward/backward
variant per frozen set from that capture, keeps them in an LRU cache, and at
every call runs the variant built for the frozen set in force right now.
It never decides the frozen set; it only reads it.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import capture
from .errors import SlimFitError
from .graphs import (BACKWARD, BACKWARD_BEFORE, FORWARD, FORWARD_BEFORE, JOINT, SavedTensor,
                     VariantGraphs, after)
from .memory import run_counting_saved_bytes
from .config import CompressionConfig
from .passes import JOINT_PASSES, PARTITION_PASSES, PassContext

log = logging.getLogger(__name__)

# Key of the single variant of a graph that never builds a backward.
NO_BACKWARD = "no_backward"


@dataclass
class Variant:
    """One compiled forward/backward pair, valid only for `frozen` on `graph_id`."""

    graph_id: int
    frozen: frozenset[str] | str
    fn: Callable[..., Any]
    compile_seconds: float
    counters: dict[str, int]
    graphs: VariantGraphs
    frozen_inputs: frozenset[int] = frozenset()  # graph input positions of frozen parameters
    saved_bytes: int | None = None
    # (bytes, resident) per tensor autograd packed at the last training forward
    saved_record: list[tuple[int, bool]] | None = None

    @property
    def joint_graph(self) -> fx.GraphModule | None:
        """The joint graph after every joint pass (None for a graph with no backward)."""
        joint = [gm for stage, gm in self.graphs.stages.items() if stage.startswith(JOINT)]
        return joint[-1] if joint else None

    def saved_tensors(self) -> list[SavedTensor]:
        """What this variant's forward saves, measured at its last training run."""
        return self.graphs.saved_tensors(self.saved_record)

    def saved_tensors_before_passes(self) -> list[SavedTensor]:
        """What the forward would save with no slimfit pass (computed from the graph),
        each marked with the pass that dropped it, if one did."""
        return self.graphs.saved_tensors_before_passes(tuple(p.__name__ for p in JOINT_PASSES))


class VariantCache:
    """LRU of compiled variants; an evicted variant is dropped and its memory freed."""

    def __init__(self, max_variants: int) -> None:
        self.max_variants = max_variants
        self._entries: OrderedDict[Hashable, Variant] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Variant | None:
        variant = self._entries.get(key)
        if variant is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return variant

    def put(self, key: Hashable, variant: Variant) -> None:
        self._entries[key] = variant
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_variants:
            self._entries.popitem(last=False)
            self.evictions += 1

    def peek(self, key: Hashable) -> Variant | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class FrozenSetState:
    """The frozen set in force and everything compiled for it; shared by all graphs."""

    backend: str
    frozen: frozenset[str]
    names_by_id: dict[int, str]
    cache: VariantCache
    compression: CompressionConfig | None = None
    memory_budget: float | None = None  # the partitioner's activation_memory_budget; None: torch's
    variants_compiled: int = 0
    compile_seconds: float = 0.0
    graphs: list["CapturedGraph"] = field(default_factory=list)
    graph_calls: int = 0
    last_training_graph: "CapturedGraph | None" = None
    last_training_key: Hashable | None = None  # variant key of the last training forward
    first_training_call: float | None = None  # perf_counter() at the first training forward

    def wall_seconds(self) -> float:
        """Seconds since the first training forward (0 before it)."""
        start = self.first_training_call
        return 0.0 if start is None else time.perf_counter() - start

    def training_variant(self) -> Variant | None:
        """The variant the last training forward ran (None if evicted since); a
        scheduler may already have moved the frozen set on for the next step."""
        key = self.last_training_key
        return None if key is None else self.cache.peek(key)

    def capture_backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The torch.compile backend: called once per dynamo graph, returns the guard."""
        graph = CapturedGraph(len(self.graphs), gm, example_inputs, self)
        self.graphs.append(graph)
        return graph


class CapturedGraph:
    """One dynamo graph. Calling it runs the variant for the current frozen set."""

    def __init__(self, graph_id: int, gm: fx.GraphModule, example_inputs: list[Any],
                 state: FrozenSetState) -> None:
        self.graph_id = graph_id
        self.state = state
        self.gm = gm
        self.tracing_context = capture.current_tracing_context()
        self.input_names = tuple(
            state.names_by_id.get(id(x)) if isinstance(x, torch.nn.Parameter) else None
            for x in example_inputs
        )
        # A graph captured with grad disabled, or with nothing requiring grad, has
        # no backward: one variant serves every frozen set.
        self.builds_backward = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
        )
        self.example_inputs = capture.fake_inputs(example_inputs, self.tracing_context)

    def key(self) -> tuple[int, frozenset[str] | str]:
        return (self.graph_id, self.state.frozen if self.builds_backward else NO_BACKWARD)

    def __call__(self, *args: Any) -> Any:
        state = self.state
        key = self.key()
        training = self.builds_backward and torch.is_grad_enabled()
        if training and state.first_training_call is None:
            state.first_training_call = time.perf_counter()
        variant = state.cache.get(key) or self._build(key)
        if (variant.graph_id, variant.frozen) != key:
            raise SlimFitError(
                f"variant for {variant.frozen!r} on graph {variant.graph_id} was about to run "
                f"for {key!r}; refusing to run a stale variant"
            )
        state.graph_calls += 1
        if not training:
            return variant.fn(*args)
        state.last_training_graph, state.last_training_key = self, key
        if variant.frozen_inputs:
            # Frozen parameters enter detached, so autograd (and DDP's search for
            # unused parameters) sees no path to them at all.
            args = tuple(a.detach() if i in variant.frozen_inputs else a for i, a in enumerate(args))
        record: list[tuple[int, bool]] = []
        outputs, variant.saved_bytes = run_counting_saved_bytes(variant.fn, *args, record=record)
        variant.saved_record = record
        return outputs

    def _build(self, key: tuple[int, frozenset[str] | str]) -> Variant:
        frozen = key[1]
        ctx = PassContext(
            input_names=self.input_names,
            frozen=frozen if isinstance(frozen, frozenset) else frozenset(),
            compression=self.state.compression,
        )
        graphs = VariantGraphs(self.input_names)

        def joint_pass(gm: fx.GraphModule) -> fx.GraphModule:
            graphs.stages[JOINT] = capture.copy_graph_module(gm)
            for each in JOINT_PASSES:
                gm = each(gm, ctx)
                graphs.stages[after(each.__name__)] = capture.copy_graph_module(gm)
            return gm

        def partition_pass(forward: fx.GraphModule, backward: fx.GraphModule,
                           num_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
            for each in PARTITION_PASSES:
                forward, backward = each((forward, backward), num_outputs, ctx)
            return forward, backward

        def on_partition(forward: fx.GraphModule, backward: fx.GraphModule, num_outputs: int,
                         partition: capture.Partition) -> None:
            if JOINT in graphs.stages:  # what the partitioner makes of the untouched joint
                before = partition(capture.copy_graph_module(graphs.stages[JOINT]))
                graphs.stages[FORWARD_BEFORE], graphs.stages[BACKWARD_BEFORE] = before
            graphs.stages[FORWARD] = capture.copy_graph_module(forward)
            graphs.stages[BACKWARD] = capture.copy_graph_module(backward)
            graphs.num_forward_outputs = num_outputs

        start = time.perf_counter()
        fn = capture.compile_variant(
            self.gm, self.example_inputs, backend=self.state.backend,
            memory_budget=self.state.memory_budget,
            joint_pass=joint_pass, partition_pass=partition_pass, on_partition=on_partition,
            tracing_context=self.tracing_context,
        )
        seconds = time.perf_counter() - start
        variant = Variant(
            graph_id=self.graph_id, frozen=frozen, fn=fn, compile_seconds=seconds,
            counters=dict(ctx.counters), graphs=graphs,
            frozen_inputs=frozenset(i for i, name in enumerate(self.input_names) if name in ctx.frozen),
        )
        log.info("graph %d, %s: built a %s variant in %.2f s; %s", self.graph_id,
                 f"{len(ctx.frozen)} layers frozen" if self.builds_backward else "no backward",
                 self.state.backend, seconds,
                 ", ".join(f"{k}={v}" for k, v in sorted(variant.counters.items())) or "no rewrites")
        self.state.variants_compiled += 1
        self.state.compile_seconds += seconds
        self.state.cache.put(key, variant)
        return variant
