"""The one module that touches private torch APIs (dynamo, functorch, inductor).

It captures the model with dynamo, turns each region of the captured graph
into a compiled forward/backward (AOTAutograd, with slimfit's joint-graph and
partition passes between its trace and its partitioner), and holds the
private torch facts the rest of the package needs (symbolic sizes, dynamo's
recompile state, activation checkpoints, fake tensors). Everything
version-specific lives here and in torch_ir.py; tested on torch 2.11 and 2.13
(see pyproject.toml).
"""
from __future__ import annotations

import inspect
import operator
import types
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo
import torch._functorch.config as functorch_config
import torch._guards
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: F401 (also the passes' tracer)
from torch.fx.passes.split_module import split_module  # noqa: F401 (regions.split_regions)
from torch.utils import _pytree as pytree
import torch._inductor.config as inductor_config
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._dynamo.utils import counters as _dynamo_counters
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from . import ops
from .errors import SlimFitError
from .memory import buffers_restored

if not hasattr(functorch_config, "joint_custom_pass"):
    raise ImportError(
        f"slimfit_fx needs torch._functorch.config.joint_custom_pass, which torch "
        f"{torch.__version__} lacks; install a torch version pyproject.toml allows"
    )

# Dynamo raises these when it cannot capture a forward into one graph.
CAPTURE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.UserError,
)

# Dynamo wraps what a backend raises in this; `inner_exception` is the original.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.BackendCompilerFailed,)

# Dynamo raises this when a fullgraph forward needs more recompiles than
# torch._dynamo.config.recompile_limit allows.
RECOMPILE_LIMIT_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.FailOnRecompileLimitHit,)


def recompile_limit() -> int:
    return int(torch._dynamo.config.recompile_limit)


def last_recompile_reasons(count: int = 3) -> list[str]:
    """The latest guard failures dynamo recorded (why it recompiled), newest last."""
    from torch._dynamo.utils import guard_failures

    reasons = [" ".join(str(r).split()) for failures in guard_failures.values() for r in failures]
    return reasons[-count:]


def describe_capture_error(err: BaseException) -> str:
    """Dynamo's one-line reason, its hint, and the user code line where capture broke."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    hint = next((line for line in lines if line.startswith("Hint:")), "")
    where = [line for line in lines if line.startswith('File "')]
    text = f"Dynamo said: {reason.rstrip('.')}."
    if where:
        text += f" It broke at {where[-1]}."
    if hint:
        text += f" Dynamo's {hint[0].lower()}{hint[1:]}"
    return text


# Breaks in library code a user cannot edit, with what the user can do instead.
KNOWN_BREAKS: tuple[tuple[str, str], ...] = (
    ("transformers/utils/output_capturing.py",
     "transformers installs its output-capturing hooks under a thread lock on a model's first "
     "forward; run one forward of the plain model (under torch.no_grad()) before "
     "slimfit_fx.compile, so the hooks exist and the lock is never taken while dynamo traces"),
)


def list_graph_breaks(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """Every place dynamo breaks `model`'s forward on these inputs, as "reason (file:line)".

    torch._dynamo.explain would say the same but resets every compiled model in
    the process, so this compiles a throwaway copy of the forward with a backend
    that runs the captured pieces eagerly and reads dynamo's break log. The
    model's buffers and the RNG come back as they were (the forward runs once
    more, under no_grad).
    """
    from torch._dynamo import output_graph

    start = len(output_graph.graph_break_reasons)
    with buffers_restored(model), torch.random.fork_rng(devices=[]), torch.no_grad(), capture_settings(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pieces run eagerly; their warnings are not the user's
        _isolated_compile(model, backend=lambda gm, _: gm.forward)(*args, **kwargs)
    breaks: list[str] = []
    for reason in output_graph.graph_break_reasons[start:]:
        text = " ".join(reason.reason.strip().splitlines()[0].split())
        if reason.user_stack:
            frame = reason.user_stack[-1]
            text += f" ({frame.filename}:{frame.lineno})"
        if text not in breaks:
            breaks.append(text)
    del output_graph.graph_break_reasons[start:]
    return breaks


def known_workarounds(breaks: Sequence[str]) -> list[str]:
    return [advice for where, advice in KNOWN_BREAKS if any(where in b for b in breaks)]

JointPass = Callable[[fx.GraphModule], fx.GraphModule]
# Called right after partitioning with (forward graph, backward graph, number of
# forward outputs that are not saved-for-backward values, and a function that
# partitions another joint graph the same way, for before/after views).
Partition = Callable[[fx.GraphModule], tuple[fx.GraphModule, fx.GraphModule]]
OnPartition = Callable[[fx.GraphModule, fx.GraphModule, int, Partition], None]
# Rewrites the partitioned (forward, backward) pair before anything compiles it;
# gets the number of forward outputs that are the user's (the rest are saved).
PartitionPass = Callable[[fx.GraphModule, fx.GraphModule, int], tuple[fx.GraphModule, fx.GraphModule]]


class _Partitioner(CustomPartitionerFn):
    """Upstream's min-cut partitioner, then a look at the forward/backward it made.

    Both backends use it (inductor via config.custom_partitioner_fn, aot_eager
    as partition_fn), so both partition exactly as torch 2.13's aot_eager and
    inductor do by default.
    """

    def __init__(self, on_partition: OnPartition, partition_pass: PartitionPass,
                 unsaved_outputs: int = 0, inline: dict | None = None) -> None:
        self.on_partition = on_partition
        self.partition_pass = partition_pass
        self.unsaved_outputs = unsaved_outputs
        self.inline = inline

    def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        def partition(joint: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

        forward, backward = self._partition_unsaved(gm, joint_inputs, kwargs) or partition(gm)
        forward, backward = self.partition_pass(forward, backward, kwargs["num_fwd_outputs"])
        self.on_partition(forward, backward, kwargs["num_fwd_outputs"], partition)
        if self.inline:
            forward, backward = (inline_ops(g, self.inline) for g in (forward, backward))
        return forward, backward

    def _partition_unsaved(self, gm: fx.GraphModule, joint_inputs: Any, kwargs: dict):
        """Partition as if the last `unsaved_outputs` forward outputs were not
        outputs, then return them from the forward all the same.

        They are layer inputs a region hands out for weight gradients and drops at
        once for frozen layers. As outputs the min-cut takes them as free to save,
        so it would save a LayerNorm's input instead of x_hat and a GELU's
        pre-activation for recompute, which compression does not recognise.
        AOTAutograd places a graph's outputs in order, so they are the last
        forward outputs; None (partition normally) where that does not hold."""
        count, total = self.unsaved_outputs, kwargs["num_fwd_outputs"]
        if not count:
            return None
        joint = copy_graph_module(gm)
        outputs = list(joint.graph.output_node().args[0])
        hidden = outputs[total - count: total]
        if not all(isinstance(n, fx.Node) for n in hidden):
            return None
        sources = [_through_detach(n) for n in hidden]
        joint.graph.output_node().args = ((*outputs[: total - count], *outputs[total:]),)
        joint.recompile()
        forward, backward = min_cut_rematerialization_partition(
            joint, joint_inputs, **{**kwargs, "num_fwd_outputs": total - count})
        by_name = {n.name: n for n in forward.graph.nodes}
        if not all(n.name in by_name for n in sources):
            return None
        out = forward.graph.output_node()
        returned = list(out.args[0])
        out.args = ((*returned[: total - count], *(by_name[n.name] for n in sources),
                     *returned[total - count:]),)
        forward.recompile()
        return forward, backward

    def uuid(self) -> Any:
        # Inductor's FX graph cache keys on the graphs before this partitioner runs:
        # the key changes with any of slimfit's code that shapes what it returns
        # (the passes, the ops' kernels it inlines), not with this file alone.
        return get_hash_for_files(tuple(str(p) for p in sorted(Path(__file__).parent.rglob("*.py"))))

    def __deepcopy__(self, memo: dict) -> "_Partitioner":
        return self  # stateless apart from the callback; config snapshots deep-copy it

    def __reduce__(self):
        # Inductor pickles its config into the FX-graph cache key; our callback is a
        # closure. What identifies this partitioner for the key is its uuid.
        return (_partitioner_from_cache_key, (self.uuid(),))


def inductor_decompositions() -> dict:
    """The aten decompositions inductor traces with (what its graphs are made of)."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def inline_ops(gm: fx.GraphModule, kernels: dict) -> fx.GraphModule:
    """Replace every call of an op in `kernels` (overload -> plain-torch function)
    by the functional aten graph of that function, traced on the node's fake
    values with inductor's decompositions (as AOTAutograd traces for inductor),
    so inductor sees and fuses the math instead of one opaque call.

    A call on symbolic sizes (dynamic shapes) is traced symbolically in the
    graph's own shape environment, so the sizes it computes (a pad to a whole
    byte, a kept count) stay expressions of the graph's size symbols, read off
    its inputs with `sym_size`, never the traced example's values."""
    decompositions = inductor_decompositions()
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in kernels]:
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        symbolic = any(isinstance(a, fx.Node) and is_symbolic(a.meta.get("val")) for a in flat)
        where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]

        def kernel(*tensors: Any, fn: Callable = kernels[node.target], flat: list = flat,
                   where: list = where, spec: Any = spec) -> Any:
            values = list(flat)
            for i, t in zip(where, tensors):
                values[i] = t
            args, kwargs = pytree.tree_unflatten(values, spec)
            return fn(*args, **kwargs)

        traced = make_fx(torch.func.functionalize(kernel, remove="mutations"),
                         decomposition_table=decompositions,
                         tracing_mode="symbolic" if symbolic else "fake")(
            *(flat[i].meta["val"] for i in where))
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            out = graph.graph_copy(traced.graph, dict(zip(placeholders, (flat[i] for i in where))))
        if isinstance(out, (tuple, list)):  # multi-output ops are read through getitem
            for user in list(node.users):
                user.replace_all_uses_with(out[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _through_detach(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in (torch.ops.aten.detach.default,
                                                           torch.ops.aten.alias.default):
        node = node.args[0]
    return node


def _partitioner_from_cache_key(uuid: Any) -> None:
    raise RuntimeError("a slimfit partitioner is never unpickled; it only names itself in cache keys")


def capture_settings():
    """Dynamo settings for every slimfit capture (a context manager).

    Python floats stay constants: a float dynamo made symbolic (e.g. attention
    scaling, when a second model of the same class is compiled in the process)
    makes AOTAutograd ask dynamo to restart tracing, which it can only do
    inside dynamo's own compile, not when slimfit compiles a region later.
    Sizes follow dynamo's default (automatic dynamic shapes): the first shape
    compiles static, and a size that changes makes one more compile with that
    size symbolic, which serves every later value (ShapeBinding reads the
    symbols off a region's inputs at run time). HF's `logger.warning_once`
    calls in forward are ignored (see _ignored_logging_functions).
    """
    patches = dict(specialize_float=True, ignore_logging_functions=_ignored_logging_functions())
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        # fullgraph=False would otherwise run a frame past the limit eagerly, where
        # no frozen set applies
        patches["fail_on_recompile_limit_hit"] = True
    return torch._dynamo.config.patch(**patches)


def _ignored_logging_functions() -> set[Callable[..., Any]]:
    """Dynamo's ignore_logging_functions plus transformers' `logger.warning_once`.

    HF models warn from inside forward (with gradient checkpointing on: "use_cache=True
    is incompatible with gradient checkpointing. Setting use_cache=False", and
    transformers then does so); a warning is a graph break to dynamo. Ignored, the
    forward captures as one graph and the warning is not printed."""
    import logging

    functions = set(torch._dynamo.config.ignore_logging_functions)
    warning_once = getattr(logging.Logger, "warning_once", None)  # set by transformers
    if warning_once is not None:
        functions.add(warning_once)
    return functions


_COMPILE_ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _isolated_compile(model: torch.nn.Module, **options: Any) -> Callable[..., Any]:
    """torch.compile(model, **options) whose dynamo cache entries count against
    recompile_limit for this model alone.

    Dynamo keeps compiled frames on the code object it compiled (the model
    class's forward, shared by every instance), and each compile here brings its
    own backend, so every model adds an entry guarded on its backend and the 9th
    model of a class in a process would hit recompile_limit. torch >= 2.13 has
    torch.compile(isolate_recompiles=True) for this. Where torch lacks it (2.11),
    the model's forward is copied with a code object of its own, and the copy is
    the model's `forward` while the compiled model runs (only then): dynamo's
    cache for it lives on that code object, holds this model's entries only, and
    goes with the compiled callable. Hooks still run eagerly around the forward
    (FSDP2's root hooks need that), and the forward is traced as before (`self`).
    A forward that is not a plain function bound to the model is compiled as is
    (shared entries, recompile_limit across models of the class).
    """
    if _COMPILE_ISOLATES:
        return torch.compile(model, isolate_recompiles=True, **options)
    compiled = torch.compile(model, **options)
    bound = model.forward
    if not (isinstance(bound, types.MethodType) and bound.__self__ is model
            and isinstance(bound.__func__, types.FunctionType)):
        return compiled
    f = bound.__func__
    # a new code object (equal to the old one), so a new dynamo cache
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                             f.__closure__)
    own.__kwdefaults__, own.__qualname__ = f.__kwdefaults__, f.__qualname__
    own.__dict__.update(f.__dict__)
    missing = object()

    def run(*args: Any, **kwargs: Any) -> Any:
        previous = model.__dict__.get("forward", missing)
        model.__dict__["forward"] = types.MethodType(own, model)
        try:
            return compiled(*args, **kwargs)
        finally:
            if previous is missing:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = previous

    return run


def compile_forward(model: torch.nn.Module, backend: Callable[..., Any], fullgraph: bool = True) -> Callable[..., Any]:
    """torch.compile(model) with `backend`, counting recompiles for this model
    alone (see _isolated_compile). `fullgraph=False` lets dynamo split the
    forward where it must (FSDP2's hooks on sharded blocks); every piece still
    goes through `backend`, and capture_settings makes a frame past
    recompile_limit an error instead of an eager run."""
    return _isolated_compile(model, backend=backend, fullgraph=fullgraph)


def inline_activation_checkpoints(gm: fx.GraphModule) -> int:
    """Inline each activation-checkpointed call in a dynamo graph, its nodes
    tagged for recompute as AOTAutograd tags them; returns how many.

    Dynamo captures `torch.utils.checkpoint` (reentrant or not, HF's
    gradient_checkpointing_enable) as one `tag_activation_checkpoint` call of a
    body graph; AOTAutograd inlines that body with every node tagged
    PREFER_RECOMPUTE (one `ac_graph_id` per call), so the partitioner saves the
    body's inputs and reruns the rest in backward. Inlined here first, the
    regions see the layers inside (each layer's weight gradient is tapped out as
    everywhere else) and the tags reach the joint graph as they would have.
    A selective policy (`context_fn`) is applied by the op at trace time, which
    inlining would skip: refused."""
    from torch.utils.checkpoint import CheckpointPolicy

    hop = torch.ops.higher_order.tag_activation_checkpoint
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]
    for graph_id, call in enumerate(calls):
        body = getattr(gm, call.args[0].target)
        # dynamo keeps a checkpoint's context_fn on its body graph
        if call.kwargs.get("context_fn") is not None or "_checkpoint_context_fn" in body.meta:
            raise SlimFitError(
                "selective activation checkpointing (torch.utils.checkpoint with a context_fn) "
                "is not supported inside a slimfit_fx model; checkpoint without a context_fn "
                "(HF gradient_checkpointing_enable(), or checkpoint(fn, *args, use_reentrant=False))")
        env = dict(zip((n for n in body.graph.nodes if n.op == "placeholder"), call.args[1:]))
        with gm.graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    result = fx.map_arg(node.args[0], env.__getitem__)
                    continue
                if node.op == "get_attr":
                    raise NotImplementedError("a checkpointed body that reads module attributes")
                copied = gm.graph.node_copy(node, env.__getitem__)
                copied.meta = dict(node.meta)
                copied.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                copied.meta["ac_graph_id"] = graph_id
                env[node] = copied
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
            else:
                user.replace_input_with(call, result)
        gm.graph.erase_node(call)
    if calls:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return len(calls)


def current_tracing_context() -> Any:
    """Dynamo's tracing context while a backend runs; kept to compile regions later."""
    return torch._guards.TracingContext.try_get()


def fake_inputs(example_inputs: Sequence[Any], tracing_context: Any) -> list[Any]:
    """Fake (shape-only, possibly symbolic) copies of dynamo's example inputs.

    Regions are compiled from these, so no real activation is kept alive and a
    graph dynamo traced with dynamic shapes stays dynamic in every region.
    """
    if tracing_context is None:
        return list(example_inputs)
    fake_mode = tracing_context.fake_mode
    return [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy: inductor mutates the graph it compiles."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output).meta = dict(gm.graph.output_node().meta)  # keeps slimfit's tags
    return fx.GraphModule(gm, graph, gm.__class__.__name__)


def compile_region(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    backend: str,
    joint_pass: JointPass,
    partition_pass: PartitionPass,
    on_partition: OnPartition,
    tracing_context: Any,
    memory_budget: float | None = None,
    unsaved_outputs: int = 0,
) -> Callable[..., Any]:
    """Compile `gm` through AOTAutograd with `joint_pass` applied to its joint graph
    and `partition_pass` to the forward/backward pair the partitioner made.
    `memory_budget` (None: torch's setting) is the min-cut partitioner's
    activation_memory_budget.

    The joint pass runs before partitioning, so the partitioner only saves what
    the rewritten backward still reads; the partition pass changes how the
    saved tensors are stored. The last `unsaved_outputs` forward outputs are
    partitioned as if they were not outputs (see _Partitioner._partition_unsaved).
    """

    def joint_custom_pass(joint_gm: fx.GraphModule, joint_inputs: Any) -> fx.GraphModule:
        return joint_pass(joint_gm)

    patches = dict(
        joint_custom_pass=joint_custom_pass,
        # The autograd cache key does not see joint_custom_pass: a hit could hand
        # back a region compiled with other passes or another compression config.
        enable_autograd_cache=False,
        # Compile the backward now, so a region's compile cost is paid (and timed) once.
        force_non_lazy_backward_lowering=True,
        # A donated-buffer backward refuses retain_graph=True (a second backward
        # through one graph); eager allows it, so slimfit's regions must too.
        donated_buffer=False,
    )
    # Only the last three are optimizations a torch version may lack; without the
    # joint pass hook a region would silently keep every weight gradient.
    patches = {k: v for k, v in patches.items()
               if k == "joint_custom_pass" or hasattr(functorch_config, k)}
    if memory_budget is not None:
        patches["activation_memory_budget"] = memory_budget
    graph_copy = copy_graph_module(gm)
    # inductor fuses the compression math into its kernels; aot_eager keeps the
    # ops (each runs its eager kernel either way)
    partitioner = _Partitioner(on_partition, partition_pass, unsaved_outputs,
                               inline=ops.KERNELS if backend == "inductor" else None)
    with torch._guards.tracing(tracing_context), functorch_config.patch(**patches):
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            with inductor_config.patch(custom_partitioner_fn=partitioner):
                compiled = compile_fx(graph_copy, list(example_inputs))
        elif backend == "aot_eager":
            compiled = aot_autograd(
                fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partitioner,
                keep_inference_input_mutations=True,
            )(graph_copy, list(example_inputs))
        else:
            raise ValueError(f"unknown backend {backend!r}")
    _declare_no_donated_buffers(tracing_context)
    return compiled


def _declare_no_donated_buffers(tracing_context: Any) -> None:
    """AOTAutograd's backward refuses retain_graph=True unless its metadata lists no
    donated buffers, and a graph compiled with donated_buffer=False leaves that list
    unset (None), which the check reads as "some" while the global setting is on.
    The graph just compiled (its metadata is the tracing context's) donated none."""
    metadata = getattr(tracing_context, "fw_metadata", None)
    if metadata is not None and getattr(metadata, "bw_donated_idxs", []) is None:
        metadata.bw_donated_idxs = []


def graph_is_retained() -> bool:
    """Inside a backward: whether autograd keeps the graph for another backward
    (retain_graph=True), so what a node reads must outlive this pass. True
    outside a backward."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


class ShapeBinding:
    """Concrete shapes, at run time, for shapes a region was compiled with.

    A region compiled with dynamic shapes knows the sizes of what it makes (a
    tapped use's output, so its probe) only as expressions in dynamo's size
    symbols (`s0*s1`). Each symbol is also a size of one of the region's inputs
    (or a SymInt input itself); this reads the symbols' values off the real
    inputs and evaluates the expressions, once per distinct set of values.
    """

    def __init__(self, example_inputs: Sequence[Any], shapes: Sequence[Sequence[Any]]) -> None:
        self.sources: dict[Any, tuple[int, int | None]] = {}  # symbol -> (input, dim or None)
        for i, value in enumerate(example_inputs):
            for dim, symbol in _size_symbols(value):
                self.sources.setdefault(symbol, (i, dim))
        self.shapes = [tuple(_size_expr(d) for d in shape) for shape in shapes]
        self.static = all(isinstance(d, int) for shape in self.shapes for d in shape)
        unbound = {str(sym) for shape in self.shapes for d in shape if not isinstance(d, int)
                   for sym in d.free_symbols if sym not in self.sources}
        if unbound:
            raise NotImplementedError(
                f"a tapped layer use's output size depends on {sorted(unbound)}, which no input of "
                "its region carries as a size")
        self._cache: dict[tuple[int, ...], list[tuple[int, ...]]] = {}

    def __call__(self, args: Sequence[Any]) -> list[tuple[int, ...]]:
        if self.static:
            return self.shapes
        values = tuple(int(args[i]) if dim is None else args[i].shape[dim] for i, dim in self.sources.values())
        shapes = self._cache.get(values)
        if shapes is None:
            bound = dict(zip(self.sources, values))
            shapes = [tuple(d if isinstance(d, int) else int(d.xreplace(bound)) for d in shape)
                      for shape in self.shapes]
            self._cache[values] = shapes
        return shapes


def _size_expr(size: Any) -> Any:
    """An int, or the sympy expression of a symbolic size."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def _size_symbols(value: Any) -> list[tuple[int | None, Any]]:
    """(dim, symbol) for each size of `value` that is a bare dynamo size symbol:
    dim None for a SymInt itself, else a tensor dimension."""
    sizes = [(None, value)] if isinstance(value, torch.SymInt) else \
        list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else []
    return [(dim, size.node.expr) for dim, size in sizes
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol]


def size_producers(nodes: Sequence[fx.Node]) -> dict[Any, tuple[fx.Node, int | None]]:
    """Where each of dynamo's size symbols can be read in a graph: a SymInt input
    (dim None) or a dimension of a tensor input, among `nodes`."""
    found: dict[Any, tuple[fx.Node, int | None]] = {}
    for node in nodes:
        for dim, symbol in _size_symbols(node.meta.get("val", node.meta.get("example_value"))):
            if dim is None or symbol not in found:  # a SymInt input reads cheapest
                found[symbol] = (node, dim)
    return found


def can_materialize(sizes: Sequence[Any], producers: dict[Any, tuple[fx.Node, int | None]]) -> bool:
    """Whether `materialize_sizes` can build every one of `sizes` from `producers`."""
    for size in sizes:
        expr = _size_expr(size)
        if not isinstance(expr, int) and (not expr.free_symbols <= producers.keys() or
                                          not all(a.is_Integer or a.is_Symbol or a.is_Add or a.is_Mul
                                                  for a in _subexprs(expr))):
            return False
    return True


def _subexprs(expr: Any) -> list[Any]:
    return [expr, *(e for a in expr.args for e in _subexprs(a))]


def materialize_sizes(graph: fx.Graph, sizes: Sequence[Any],
                      producers: dict[Any, tuple[fx.Node, int | None]]) -> list[Any]:
    """`sizes` as arguments for a node of `graph`: ints as they are, a symbolic
    size as nodes (inserted at the graph's insertion point) that compute it at
    run time from `producers` (`aten.sym_size.int` of a tensor input, or a SymInt
    input, then + and *). Check with `can_materialize` first."""
    made: dict[Any, fx.Node] = {}

    def build(expr: Any) -> Any:
        if expr.is_Integer:
            return int(expr)
        if expr in made:
            return made[expr]
        if expr.is_Symbol:
            node, dim = producers[expr]
            value = node.meta.get("val", node.meta.get("example_value"))
            if dim is None:
                return node
            out = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
            out.meta["val"] = value.shape[dim]
        else:
            op = operator.add if expr.is_Add else operator.mul
            args = [build(a) for a in expr.args]
            out = args[0]
            for arg in args[1:]:
                left = out.meta["val"] if isinstance(out, fx.Node) else out
                right = arg.meta["val"] if isinstance(arg, fx.Node) else arg
                out = graph.call_function(op, (out, arg))
                out.meta["val"] = op(left, right)
        made[expr] = out
        return out

    return [size if isinstance(expr := _size_expr(size), int) else build(expr) for size in sizes]


def is_symbolic(value: Any) -> bool:
    """Whether a (fake) tensor has a symbolic size, or a value is a SymInt."""
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def fake_mode_of(values: Sequence[Any]) -> Any:
    """The fake mode of dynamo's fake example values (None for real tensors)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(values))


def size_hint(value: Any) -> int | None:
    """A concrete int for a possibly symbolic size: the value dynamo traced with."""
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def dynamo_compiled_frames() -> int:
    """How many graphs dynamo has compiled so far in this process (its own counter)."""
    return int(_dynamo_counters["stats"]["unique_graphs"])


def reset_dynamo() -> None:
    """Forget every dynamo-compiled frame (tests call this between cases)."""
    torch._dynamo.reset()


def memory_budget(value: float):
    """Context manager: torch.compile's partitioner (plain torch.compile included)
    uses activation_memory_budget `value` for graphs compiled inside it."""
    return functorch_config.patch(activation_memory_budget=value)
