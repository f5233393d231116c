"""`slimfit_fx.compile` and the module it returns.

The returned module forwards to a dynamo-compiled copy of the user's model and
otherwise looks like that model: same parameters, same state_dict keys,
attribute passthrough. Everything slimfit-specific hangs off `.slimfit`.
"""
from __future__ import annotations

import copy
import functools
import sys
import warnings
import weakref
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import capture
from .config import SlimFitConfig
from .errors import AlreadyCompiledError, CaptureError, SlimFitError
from .graphs import RegionGraphs
from .memory import MemoryBreakdown, eager_saved_bytes, memory_breakdown
from .optimizer_state import FrozenLayerState, OptimizerStateBytes, check_offload, holds_any, state_bytes
from .layers import find_layers, parameter_aliases, parameter_names_by_identity, resolve_names
from .report import Report, build_report
from .policies import FreezePolicy, build_policy
from .schedule import Schedule
from .regions import block_prefixes, named_blocks
from .engine import Engine, EngineConfig
from .budget import MAX_FREEZE_RATIO, ratio_for
from .fitting import FitToBudget

_COMPILED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# Why a layer is not scheduled (SlimFit.not_scheduled, the report).
FROZEN_BEFORE_COMPILE = "requires_grad=False before compile"
NOT_IN_AN_OPTIMIZER = "in no optimizer that stepped, so kept frozen"


def compile(model: nn.Module, config: SlimFitConfig | None = None, **overrides: Any) -> "SlimFitModule":
    """Compile `model` for memory-efficient fine-tuning; train the result as before.

    `config` defaults to `SlimFitConfig()`; keyword `overrides` replace its fields,
    e.g. `compile(model, backend="aot_eager")`.
    """
    if isinstance(model, SlimFitModule):
        raise AlreadyCompiledError(
            "this module is already a slimfit_fx module; train it as it is, or call "
            "slimfit_fx.compile on the original model (cm.slimfit.model)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"slimfit_fx.compile expects a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (not its class, forward method or state_dict)"
        )
    if hasattr(model, "_orig_mod") and hasattr(model, "dynamo_ctx"):
        raise TypeError(
            "slimfit_fx.compile got a module already wrapped by torch.compile; pass the "
            "original model instead (`model._orig_mod`): slimfit_fx runs torch.compile itself"
        )
    nested = [name for name, m in model.named_modules() if name and type(m) is SlimFitModule]
    if nested:
        raise AlreadyCompiledError(
            f"{type(model).__name__}.{nested[0]} is already a slimfit_fx module, so this model "
            "cannot be captured as one graph. Fix: build the outer model around the original "
            f"module (cm.slimfit.model) and compile only the outer one")
    if model in _COMPILED:
        raise AlreadyCompiledError(
            f"slimfit_fx.compile was already called on this {type(model).__name__}; use the "
            "module that call returned (compiling twice would capture the model twice)"
        )
    if config is None:
        config = SlimFitConfig()
    elif not isinstance(config, SlimFitConfig):
        raise TypeError(f"config must be a SlimFitConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(
            f"{type(model).__name__} has {len(on_meta)} parameter(s)/buffer(s) on the meta device "
            f"({on_meta[0]!r} first): they have shapes but no values, so there is nothing to train "
            "or capture. Fix: materialize the weights before compiling, e.g. "
            "model.to_empty(device='cpu') then model.load_state_dict(weights), or load the model "
            "with real weights (without device='meta' or init_empty_weights)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True, so there is "
            "nothing to fine-tune; set requires_grad=True on the parameters to train "
            "(slimfit_fx then decides which of them to freeze)"
        )
    module = SlimFitModule(model, config)
    _COMPILED.add(model)
    return module


def sharded_submodules(model: nn.Module) -> list[str]:
    """Names of the submodules of `model` that fully_shard (FSDP2) sharded, the root left out."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    if fsdp is None:
        return []
    return [name for name, m in model.named_modules() if name and isinstance(m, fsdp.FSDPModule)]


def layers_sharded_on_their_own(model: nn.Module, layers: Iterable[str]) -> list[str]:
    """Of `layers`, those whose module is a torch.nn layer (no submodules) that
    fully_shard sharded on its own: dynamo runs such a module's forward, a frame
    of torch.nn behind FSDP2's hooks, eagerly (accelerate's FSDP2 plugin shards
    the input embedding so)."""
    own = set(sharded_submodules(model))
    if not own:
        return []
    modules = dict(model.named_modules())
    found = []
    for name in layers:
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        # fully_shard made its class a subclass of the torch.nn one (FSDPEmbedding)
        if owner in own and module is not None and next(module.children(), None) is None and any(
                c.__module__.startswith("torch.nn.modules.") for c in type(module).__mro__ if c is not nn.Module):
            found.append(name)
    return found


def _blocks(model: nn.Module, named: tuple | None) -> tuple[str, ...]:
    if named is not None:
        return named_blocks(model, named)
    found = block_prefixes(model)
    if not found:
        warnings.warn(
            f"slimfit_fx found no repeated blocks in {type(model).__name__} (no ModuleList or "
            "Sequential holding two children of one class with parameters), so it compiles the "
            "whole model as one region: no compiled code is shared between layers (compile time "
            "grows with depth) and, where frozen norms are pruned (compression='paper'), they "
            "are kept whole (norm_guard='blocks' prunes them inside blocks only). Fix: name the "
            "blocks, e.g. slimfit_fx.compile(model, "
            "blocks=('layers.*',)) or blocks=(MyBlock,); blocks=() keeps one region and silences "
            "this warning", stacklevel=5)  # _blocks, SlimFit, SlimFitModule, compile, the caller
    return found


class SlimFit:
    """The `.slimfit` namespace: the frozen set, stats and report of one compiled model."""

    def __init__(self, model: nn.Module, config: SlimFitConfig) -> None:
        self.model = model
        self.config = config
        self.layers: tuple[str, ...] = find_layers(model)
        if config.optimizer_state == "offload":
            check_offload(dict(model.named_parameters()))
        layer_parameters = self._layer_parameters()
        self._frozen_before_compile = find_layers(model, requires_grad=False)
        self._aliases = parameter_aliases(model)
        names_by_id = parameter_names_by_identity(model)
        live = weakref.ref(model)  # held weakly, as in _capture_backend
        self._engine = Engine(EngineConfig(
            backend=config.backend,
            names_by_id=names_by_id,
            refresh_names=lambda: names_by_id.update(parameter_names_by_identity(live())),
            layers=frozenset(self.layers),
            blocks=_blocks(model, config.blocks),
            compression=config.compression_config,
            activation_memory_budget=config.activation_memory_budget,
            **({} if config.memory_budget is None else _fit_hooks(self)),
        ))
        policy = build_policy(config)
        # Before the schedule's hooks, which drop the gradients of frozen layers.
        self._outside_graphs = _on_optimizer_steps(LayersOutsideGraphs(self))
        self.schedule_name: str = policy.name
        # None where the policy never chooses (set_frozen picks the set).
        self.schedule: Schedule | None = None
        if getattr(policy, "chooses", True):
            self.schedule = _start_schedule(self, layer_parameters, config, policy)
        # After the schedule's: its hooks drop stale gradients before ours unpack,
        # and pick the next frozen set before ours pack it.
        self._optimizer_state: FrozenLayerState | None = None
        if config.optimizer_state != "full":
            self._optimizer_state = _start_optimizer_state(self, layer_parameters, config.optimizer_state)
        # memory_budget: the freeze ratio and packing, chosen at the first training forward.
        self.fit: FitToBudget | None = None
        if config.memory_budget is not None:
            def start_optimizer_state(packing: str) -> None:
                if self._optimizer_state is None and packing == "full":
                    return
                if self._optimizer_state is None:  # the parameters now (fully_shard may have replaced them)
                    self._optimizer_state = _start_optimizer_state(self, self._layer_parameters(), packing)
                else:
                    self._optimizer_state.format = packing

            self.fit = _on_optimizer_steps(FitToBudget(self, config.memory_budget, start_optimizer_state))

    def _layer_parameters(self) -> dict[str, nn.Parameter]:
        """Each layer's parameter object as the model holds it now."""
        parameters = dict(self.model.named_parameters())
        return {n: parameters[n] for n in self.layers}

    def _parameters_replaced(self) -> None:
        """fully_shard after compile put new parameter objects (DTensor shards) in
        the model: the schedule, the optimizer-state store and the graph-input
        names follow them. Before any optimizer step only: one that stepped
        holds the old objects, and what it learned about them is lost."""
        layer_parameters = self._layer_parameters()
        for part in (self.schedule, self._optimizer_state):
            if part is not None:
                part.rebind(layer_parameters)
        self._outside_graphs.rebind()
        if self.fit is not None:
            self.fit.rebind()
        self._engine.config.names_by_id.update(parameter_names_by_identity(self.model))

    @property
    def frozen(self) -> frozenset[str]:
        """The frozen set the next forward uses."""
        return self._engine.frozen_layers.names

    @frozen.setter
    def frozen(self, names: Iterable[str]) -> None:
        fix = ("compile with schedule='manual' and call cm.slimfit.set_frozen(names) to pick it "
               f"yourself (or pass always_train=(...) to keep some layers training under "
               f"{self.schedule_name!r})" if self.schedule is not None else "call cm.slimfit.set_frozen(names)")
        raise AttributeError(
            "cm.slimfit.frozen is read-only: it is the frozen set the next forward uses"
            + (f", which the {self.schedule_name!r} schedule picks after optimizer steps" if self.schedule else "")
            + f". To set it, {fix}")

    @property
    def not_scheduled(self) -> dict[str, str]:
        """Layers slimfit never trains, each with why: set requires_grad=False
        before compile (not in `layers`), or, under a schedule that chooses (not
        'manual'), held by no optimizer that stepped (kept frozen from the first optimizer step on, and
        left out of the layers `freeze_ratio` counts)."""
        why = dict.fromkeys(self._frozen_before_compile, FROZEN_BEFORE_COMPILE)
        if self.schedule is not None:
            why.update((n, NOT_IN_AN_OPTIMIZER) for n in self.layers if n in self.schedule.not_held)
        return why

    def set_frozen(self, names: Iterable[str]) -> None:
        """Freeze exactly `names` (layer names, see `layers`) from the next forward on."""
        if self.schedule is not None:
            raise RuntimeError(
                f"this model was compiled with schedule={self.schedule_name!r}, which picks the "
                "frozen set after optimizer steps; compile with schedule='manual' to set it yourself"
            )
        self._engine.frozen_layers.set(resolve_names(names, self.layers, self._aliases))

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (step, frozen set, history, and the policy's own:
        for "ils" its scores and RNG) or, where set_frozen picks the set
        (schedule='manual'), the frozen set; tensors, lists and ints only, so
        `torch.load(..., weights_only=True)` reads it back."""
        if self.schedule is None:
            return {"schedule": self.schedule_name, "frozen": sorted(self.frozen)}
        return {"schedule": self.schedule_name, **self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned (into a model compiled with the same
        schedule and freeze_ratio); a state that does not fit changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"cm.slimfit.load_state_dict expects the dict cm.slimfit.state_dict() returned, "
                f"got a {type(state).__name__}")
        if "schedule" not in state:
            weights = any(isinstance(v, torch.Tensor) for v in state.values())
            raise ValueError(
                "this is not a slimfit state (it has no 'schedule' key)"
                + ("; it looks like model weights, which cm.load_state_dict loads" if weights else "")
                + ". Pass the dict cm.slimfit.state_dict() returned")
        kind = state["schedule"]
        if kind != self.schedule_name:
            raise ValueError(
                f"this slimfit state was saved with schedule={kind!r} but the model was "
                f"compiled with schedule={self.schedule_name!r}; compile with the same schedule"
            )
        if self.schedule is None:
            if "frozen" not in state:
                raise ValueError(f"this {kind}-schedule state lacks 'frozen'; pass the dict "
                                 "cm.slimfit.state_dict() returned, unedited")
            self.set_frozen(state["frozen"])
        else:
            if self.fit is not None and {"layers", "frozen"} <= set(state):
                # The saved run's ratio was its budget's choice; the next first forward chooses anew.
                held = state.get("held")
                scheduled = [n for n in state["layers"] if held is None or n in held]
                frozen = [n for n in state["frozen"] if n in scheduled]
                self.schedule.freeze_ratio = ratio_for(len(frozen), len(scheduled))
            self.schedule.load_state_dict(dict(state))

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> OptimizerStateBytes:
        """Bytes `optimizer`'s state holds now (packed tensors at their packed size)
        against what it holds plain; see SlimFitConfig.optimizer_state."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_state_bytes expects a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}; pass the optimizer itself (for a "
                            "wrapper such as accelerate's, its .optimizer)")
        return state_bytes(optimizer)

    def step(self) -> None:
        """Advance the schedule after an update made without a torch.optim
        optimizer (a hand-written loop); optimizers' steps advance it on their own.
        Idempotent per update: a call with no weight change since the previous
        one does nothing."""
        if self.schedule is None:
            raise RuntimeError(f"cm.slimfit.step() advances a schedule that chooses the frozen set "
                               "(such as schedule='ils'); "
                               f"this model's (schedule={self.schedule_name!r}) is set by set_frozen")
        self.schedule.manual_step()

    def plot_schedule(self, path: str | Path) -> Path:
        """Write a PNG heatmap of which layer trained at which step (a schedule
        that chooses, such as 'ils')."""
        from .plots import plot_schedule

        if self.schedule is None:
            raise RuntimeError(f"plot_schedule needs a schedule that chooses the frozen set, such as "
                               f"'ils'; this model's (schedule={self.schedule_name!r}) is set by set_frozen")
        return plot_schedule(self.schedule.history_matrix(), self.layers, Path(path))

    @property
    def stats(self) -> Mapping[str, float]:
        """graphs_captured: dynamo graphs; regions: regions the training graph runs
        per step; regions_compiled: distinct regions compiled (one compile serves
        every region with the same structure, for every frozen set);
        compile_seconds: every compile, including weight_grad_trace_seconds
        (weight-gradient graphs traced after their region compiled, for a dtype
        or autocast first seen later); wall_seconds: from the first training
        forward to the end of the latest (the last step's backward excluded);
        compile_share: compile_seconds / wall_seconds, the one compile-share figure
        (report, metrics.json)."""
        cache = self._engine.cache
        traces = sum(tap.trace_seconds for c in cache.compiled.values() for tap in c.taps)
        wall, compile_seconds = self._engine.steps.wall_seconds(), cache.compile_seconds + traces
        return Stats({
            "graphs_captured": len(cache.graphs),
            "regions": sum(c.instances for c in cache.compiled.values()),
            "regions_compiled": len(cache.compiled),
            "compile_seconds": compile_seconds,
            "weight_grad_trace_seconds": traces,
            "wall_seconds": wall,
            "compile_share": compile_seconds / wall if wall else 0.0,
        })

    @property
    def saved_bytes(self) -> int | None:
        """Bytes held from forward to backward at the last training forward: what
        the compiled regions saved plus the inputs stashed for the weight gradients
        of the layers that trained; None until one has run."""
        step = self._engine.steps.last_step
        return None if step is None else step.saved_bytes

    def report(self) -> Report:
        return build_report(self)

    def memory_breakdown(self, *sample_args: Any, optimizer: torch.optim.Optimizer | None = None,
                         **sample_kwargs: Any) -> MemoryBreakdown:
        """Weights, gradients, optimizer state and saved activations: eager full
        fine-tune vs slimfit's current frozen set. Given a sample batch, eager's
        saved activations are measured by one eager forward of the model (its
        buffers are restored afterwards); call it after a training step, before
        `zero_grad`, to have slimfit's gradients measured rather than estimated."""
        eager_saved = None
        if sample_args or sample_kwargs:
            eager_saved = eager_saved_bytes(self.model, *sample_args, **sample_kwargs)
        return memory_breakdown(dict(self.model.named_parameters()), self.frozen,
                                self.saved_bytes, eager_saved, optimizer)

    def save_report(self, directory: str | Path, *sample_args: Any,
                    optimizer: torch.optim.Optimizer | None = None, **sample_kwargs: Any) -> dict[str, Path]:
        """Write report.json, report.md, memory.png and saved_by_module.png to `directory`."""
        from .plots import plot_memory, plot_saved_by_module

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        report = self.report()
        breakdown = self.memory_breakdown(*sample_args, optimizer=optimizer, **sample_kwargs)
        names = ["report.json", "report.md", "memory.png", "saved_by_module.png"]
        if self.schedule is not None:
            names.append("schedule.png")
        paths = {name: out / name for name in names}
        paths["report.json"].write_text(report.to_json())
        paths["report.md"].write_text(report.to_markdown() + "\n\n```\n" + str(breakdown) + "\n```\n")
        plot_memory(breakdown, paths["memory.png"])
        plot_saved_by_module(report.saved_tensors_before, report.saved_tensors, paths["saved_by_module.png"])
        if self.schedule is not None:
            self.plot_schedule(paths["schedule.png"])
        return paths

    def graphs(self, region: str | None = None) -> RegionGraphs:
        """The graphs of one compiled region: `region` names it (see
        `compiled_regions()`), by default the one most regions of the last
        training step ran (the repeated block). Stages: joint as traced, after
        each pass, forward and backward. `print()` it, or `.diff(before, after)`."""
        compiled = self.compiled_regions()
        if not compiled:
            raise KeyError("nothing compiled for training yet; run a training forward first")
        if region is None:
            return max(compiled.values(), key=lambda c: (c.instances, len(c.taps))).graphs
        if region not in compiled:
            raise KeyError(f"no compiled region {region!r}; the compiled regions are {sorted(compiled)}")
        return compiled[region].graphs

    def compiled_regions(self) -> dict[str, Any]:
        """Every compiled region by name (the first block that built it, or
        "region N"): its graphs, taps, compile time and how many regions share it."""
        return {c.name: c for c in self._engine.cache.compiled.values()}

    @property
    def last_step(self):
        """What the last training forward ran (read-only): its frozen set,
        saved_bytes, pass counters and saved tensors; None before the first."""
        return self._engine.steps.last_step

    def _graph_calls(self) -> int:
        return self._engine.steps.graph_calls

    def _capture_backend(self):
        # dynamo keeps every backend it was given for the life of the process
        # (eval_frame.cached_backends), so this one holds its model weakly: a
        # dead compiled model leaves a few bytes behind, not its engine and weights.
        engine, model = weakref.ref(self._engine), weakref.ref(self.model)

        def capture_backend(gm, example_inputs):
            # Graph inputs are named by identity. Refresh the map at capture: FSDP2
            # (fully_shard) swaps other parameter objects in for each forward.
            live = engine()
            live.config.names_by_id.update(parameter_names_by_identity(model()))
            return live.capture_backend(gm, example_inputs)

        return capture_backend


# Stats of the former per-frozen-set compiler: the one that replaced each, or None.
_REMOVED_STATS = {"variants_compiled": "regions_compiled", "variants_live": None, "cache_hits": None,
                  "cache_misses": None, "evictions": None}


class Stats(dict):
    """`cm.slimfit.stats`: a plain dict whose missing-key error names the keys it has."""

    def __missing__(self, key: object) -> float:
        if key in _REMOVED_STATS and _REMOVED_STATS[key]:
            why = (f"it is now {_REMOVED_STATS[key]!r} (one compile per distinct region serves "
                   "every frozen set)")
        elif key in _REMOVED_STATS:
            why = ("it counted the former per-frozen-set compile cache, which is gone: one compile "
                   "per distinct region serves every frozen set")
        else:
            why = "no such stat"
        raise KeyError(f"cm.slimfit.stats has no {key!r}: {why}. The stats are {sorted(self)}")


class LayersOutsideGraphs:
    """Refuses to step an optimizer while a layer that ran outside slimfit's graphs
    could be frozen.

    A forward captured in pieces (sharded blocks split it) can leave code to
    eager PyTorch: dynamo runs a frame it cannot split (a loop over the blocks
    with code of its own around it, as in HF Llama's model forward) eagerly, and
    an nn.Embedding or nn.Linear called from there never meets the frozen set.
    So does a torch.nn layer sharded on its own (accelerate's FSDP2 plugin shards
    the input embedding so): dynamo runs its forward, a frame of torch.nn, eagerly.
    Such a layer shows itself with a gradient while no graph took it as an input.
    """

    def __init__(self, slimfit: "SlimFit") -> None:
        self.slimfit = weakref.proxy(slimfit)
        self.rebind()

    def rebind(self) -> None:
        """Follow the model to new parameter objects (fully_shard after compile)."""
        # Kept, not gathered per step: walking the model's modules twice a step
        # cost tiny BERT's step 0.5 ms (2.5%).
        self._param_ids = {id(p) for p in self.slimfit.model.parameters()}

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return holds_any(optimizer, self._param_ids)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        slimfit = self.slimfit
        seen = slimfit._engine.steps.layers_seen
        if not seen or len(seen) == len(slimfit.layers):
            return  # no training forward yet, or every layer went through a graph
        outside = [n for n in slimfit.layers if n not in seen and slimfit.model.get_parameter(n).grad is not None]
        schedule = slimfit.schedule
        can_freeze = set(slimfit.frozen) if schedule is None else set(outside) - schedule.always_train
        refused = [n for n in outside if n in can_freeze]
        if refused:
            owner = refused[0].rpartition(".")[0]
            if owner in sharded_submodules(slimfit.model):
                why = (f"it is the weight of {owner!r}, sharded on its own (accelerate's FSDP2 plugin "
                       "does this to the input embedding), and dynamo runs the forward of such a "
                       "torch.nn layer eagerly")
            else:
                why = ("dynamo ran the code around them eagerly (a frame it could not split at a "
                       "sharded block's hooks, e.g. a loop over the blocks with an embedding before it)")
            raise SlimFitError(
                f"{len(refused)} layer(s) ran outside slimfit_fx's compiled graphs ({refused[0]!r} "
                f"first): {why}, so freezing them would not stop their gradients. Fix: keep them training "
                f"(always_train={tuple(refused)!r}, or leave them out of set_frozen), or shard "
                "the root module only (fully_shard(model)), which captures the whole forward")

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass


def _start_schedule(slimfit: SlimFit, layer_parameters: dict[str, nn.Parameter], config: SlimFitConfig,
                    policy: FreezePolicy) -> Schedule:
    """A schedule running `policy`, driven by every optimizer's step hooks.

    torch.optim's global step hooks fire for any optimizer (also inside HF
    Trainer/accelerate), so the training loop needs no change; the hooks hold the
    schedule weakly and act only on optimizers that hold this model's layers.
    """
    engine = slimfit._engine
    blocks = [tuple(n for n in slimfit.layers if n.startswith(prefix + ".")) for prefix in engine.config.blocks]
    # The schedule is the frozen set's one writer while it chooses (set_frozen refuses).
    # Under a memory budget the first step freezes the most; the ratio that fits
    # is chosen once that step's shapes are known (FitToBudget).
    always_train = resolve_names(config.always_train, slimfit.layers, slimfit._aliases,
                                 who="SlimFitConfig.always_train")
    outside = [n for n in layers_sharded_on_their_own(slimfit.model, slimfit.layers) if n not in always_train]
    if outside:
        warnings.warn(
            f"{', '.join(map(repr, outside))} belong(s) to torch.nn layers sharded on their own "
            "(accelerate's FSDP2 plugin shards the input embedding so): dynamo runs such a layer's "
            "forward eagerly, outside slimfit_fx's graphs, where freezing cannot reach it, so the "
            f"{policy.name!r} schedule keeps them training (always_train). To let it freeze them, shard "
            "them with their parent module instead of on their own; to silence this, name them in "
            "always_train", stacklevel=4)  # _start_schedule, SlimFit, SlimFitModule, compile
        always_train = always_train | frozenset(outside)
    schedule = Schedule(
        slimfit.layers, layer_parameters, policy,
        freeze_ratio=MAX_FREEZE_RATIO if config.memory_budget is not None else config.freeze_ratio, apply_frozen=engine.frozen_layers.set,
        always_train=always_train,
        blocks=[b for b in blocks if b],
    )
    return _on_optimizer_steps(schedule)


def _start_optimizer_state(slimfit: SlimFit, layer_parameters: dict[str, nn.Parameter],
                           packing: str) -> FrozenLayerState:
    """Frozen layers' optimizer state packed after every step of an optimizer that
    holds this model's layers, unpacked before the step they train in."""
    frozen_layers = slimfit._engine.frozen_layers
    store = FrozenLayerState(packing, layer_parameters, lambda: frozen_layers.names)
    return _on_optimizer_steps(store)


def _fit_hooks(slimfit: SlimFit) -> dict:
    """The byte budget's EngineConfig calls, holding `slimfit` weakly: after every
    training forward, and whether the next one still chooses (and measures the stash)."""
    ref = weakref.ref(slimfit)

    def fit():
        live = ref()
        return None if live is None else live.fit

    def after_training_forward(graph, record) -> None:
        if (live := fit()) is not None:
            live.after_training_forward(graph, record)

    def measures_stash() -> bool:
        return (live := fit()) is not None and live.choosing

    return dict(after_training_forward=after_training_forward, measures_stash=measures_stash)


def _on_optimizer_steps(target):
    """Call `target.before_step`/`after_step` around every step of an optimizer
    `target.owns`. The global hooks hold `target` weakly and go with it."""
    ref = weakref.ref(target)

    def before(optimizer, args, kwargs) -> None:
        live = ref()
        if live is not None and live.owns(optimizer):
            live.before_step(optimizer)

    def after(optimizer, args, kwargs) -> None:
        live = ref()
        if live is not None and live.owns(optimizer):
            live.after_step(optimizer)

    handles = (register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after))
    weakref.finalize(target, lambda: [h.remove() for h in handles])
    return target


def _every_break(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """All of the forward's graph breaks and any known workaround, for the capture error."""
    try:
        breaks = capture.list_graph_breaks(model, args, kwargs)
    except Exception as err:  # the first break, already in the message, still stands
        return f" (Listing every graph break failed too: {type(err).__name__}: {err}.)"
    if not breaks:
        return " "
    text = f" All {len(breaks)} graph breaks in this forward:\n" + "\n".join(f"  {i}. {b}" for i, b in
                                                                           enumerate(breaks, 1))
    for advice in capture.known_workarounds(breaks):
        text += f"\nKnown workaround: {advice}."
    return text + "\n"


def _parameter_ids(model: nn.Module) -> tuple[int, ...]:
    return tuple(map(id, model.parameters()))


class SlimFitModule(nn.Module):
    """Trains like the wrapped model; see `slimfit_fx.compile`."""

    def __init__(self, model: nn.Module, config: SlimFitConfig) -> None:
        super().__init__()
        self._model = model
        slimfit = SlimFit(model, config)
        # Stored outside nn.Module's registries: neither a submodule nor state.
        object.__setattr__(self, "slimfit", slimfit)
        object.__setattr__(self, "_parameter_ids", _parameter_ids(model))
        object.__setattr__(self, "_compiled", self._compile_forward())

        # Trainers read the forward's signature to pick batch columns (HF Trainer
        # drops the ones it does not name): show the wrapped model's.
        run = self._forward

        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return run(*args, **kwargs)

        self.forward = forward

    # isinstance(cm, type(model)) holds, so code that branches on the model's class
    # treats cm as the model: HF Trainer writes checkpoints through the model's
    # save_pretrained (config.json included) only for PreTrainedModel instances.
    # type(cm) is still SlimFitModule.
    @property
    def __class__(self) -> type:
        model = self.__dict__.get("_modules", {}).get("_model")
        return SlimFitModule if model is None else type(model)

    @__class__.setter
    def __class__(self, cls: type) -> None:
        raise TypeError(
            f"cannot make this slimfit_fx module a {cls.__name__}: wrappers that swap a "
            "module's class (fully_shard, replicate) go on the model and its blocks, not on the "
            "compiled module: fully_shard(block) for each block, then fully_shard(model), "
            "then cm = slimfit_fx.compile(model) (or the same calls on cm.slimfit.model and "
            "its blocks after compiling, before the optimizer is made). With accelerate's FSDP2 "
            "plugin, prepare the plain model with its optimizer first, then compile: "
            "model, optimizer = accelerator.prepare(model, optimizer); cm = slimfit_fx.compile(model)"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def _compile_forward(self):
        """The model's forward under dynamo. FSDP2 runs each sharded block's
        all-gather and reshard hooks under torch._dynamo.disable, so a model with
        sharded blocks is captured as one graph per stretch between hooks (a
        block's forward, the code before and after the blocks), each through
        slimfit's backend; a block class's graph serves all of its blocks."""
        return capture.compile_forward(self._model, self.slimfit._capture_backend(),
                                       fullgraph=not sharded_submodules(self._model))

    def _check_parameters(self) -> None:
        """Follow fully_shard applied after compile: its parameters replace the
        model's (the schedule must see the ones the optimizer holds), and sharded
        blocks change how the forward is captured."""
        ids = _parameter_ids(self._model)
        if ids == self._parameter_ids:
            return
        self.slimfit._parameters_replaced()
        object.__setattr__(self, "_parameter_ids", ids)
        object.__setattr__(self, "_compiled", self._compile_forward())

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # Export runs forward without dynamo, so the check below would blame the
            # recompile limit; the frozen set only shapes backward anyway.
            raise SlimFitError(
                f"torch.export/torch.onnx.export/torch.jit.trace was given the slimfit_fx module "
                f"of {type(self._model).__name__}, whose compiled graphs serve training only. "
                "Export the plain model instead: cm.slimfit.model (the module passed to "
                "slimfit_fx.compile; it holds the trained weights), e.g. "
                "torch.onnx.export(cm.slimfit.model.eval(), args)."
            )
        self._check_parameters()
        schedule = self.slimfit.schedule
        if schedule is not None and torch.is_grad_enabled() and self._model.training:
            schedule.note_training_forward()
        calls_before = self.slimfit._graph_calls()
        try:
            with capture.capture_settings():
                outputs = self._compiled(*args, **kwargs)
        except capture.BACKEND_ERRORS as err:
            inner = getattr(err, "inner_exception", None)
            if isinstance(inner, SlimFitError):  # slimfit's own message, not dynamo's wrapping
                raise inner from None
            raise
        except capture.RECOMPILE_LIMIT_ERRORS as err:
            reasons = "; ".join(capture.last_recompile_reasons()) or "not recorded"
            raise CaptureError(
                f"torch.compile recompiled {type(self._model).__name__}.forward "
                f"{capture.recompile_limit()} times (torch._dynamo.config.recompile_limit) and "
                f"stopped. Dynamo's latest reasons: {reasons}. Batches of any sequence length or "
                "batch size compile at most a few times (the changed sizes become dynamic); "
                "recompiles past that come from something else that changes between calls: a "
                "new input dtype or device, an input that is sometimes None, a Python value "
                "(a flag or a number) passed to forward, or many compiled models of one class. "
                "Fix: keep what the reason names the same between calls, or raise "
                "torch._dynamo.config.recompile_limit."
            ) from err
        except capture.CAPTURE_ERRORS as err:
            raise CaptureError(
                f"torch.compile could not capture {type(self._model).__name__}.forward as one "
                "graph, which slimfit_fx needs to control every parameter's gradient. "
                f"{capture.describe_capture_error(err)}{_every_break(self._model, args, kwargs)}"
                "Fix: remove the graph breaks from the forward (data-dependent Python control "
                "flow on tensor values, logging or printing, .item(), calls dynamo does not "
                "support), or move them outside forward."
            ) from err
        if self.slimfit._graph_calls() == calls_before:
            raise CaptureError(
                f"{type(self._model).__name__}.forward ran without slimfit's compiled graph "
                "(dynamo fell back to eager, e.g. after hitting torch._dynamo.config."
                "recompile_limit); the frozen set would not apply. Fix: raise "
                "torch._dynamo.config.recompile_limit or call torch._dynamo.reset() "
                "if many models were compiled in this process."
            )
        return outputs

    def __deepcopy__(self, memo: dict) -> "SlimFitModule":
        """A new compiled model: a deep copy of the wrapped model, compiled with the
        same config, starting from this one's frozen set and schedule state."""
        clone = compile(copy.deepcopy(self._model, memo), self.slimfit.config)
        clone.slimfit.load_state_dict(self.slimfit.state_dict())
        return clone

    # The wrapped model's names, not "_model."-prefixed ones.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = self._model.load_state_dict(state_dict, strict=strict, assign=assign)
        if self.slimfit.schedule is not None:
            self.slimfit.schedule.weights_loaded()  # loading weights is not an update
        return result

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return self._model.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        return self._model.named_buffers(prefix, recurse, remove_duplicate)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"SlimFitModule({self._model!r})"
