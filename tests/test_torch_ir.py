"""The torch IR facts the passes match on (slimfit_fx/torch_ir.py) hold for the
installed torch. A torch upgrade that renames an argument, an op or a naming
convention fails here, by name, instead of making compression match nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import slimfit_fx
from slimfit_fx import capture, regions, torch_ir
from tests import models
from slimfit_fx.config import KIND_FIELDS, CompressionConfig
from slimfit_fx.passes.compress import KINDS, MATCHERS

aten = torch.ops.aten


def test_every_fused_attention_backward_names_q_k_v_and_out():
    present = [name for name in torch_ir.ATTENTION_BACKWARD_OPS if hasattr(aten, name)]
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in present
    missing = [name for name in present if getattr(aten, name).default not in torch_ir.ATTENTION_BACKWARD]
    assert not missing, f"no query/key/value/out argument any more in {missing}"
    for op, args in torch_ir.ATTENTION_BACKWARD.items():
        names = [a.name for a in op._schema.arguments]
        assert [names[i] for i in (*args.qkv, args.out)] == ["query", "key", "value", "out"], op


def test_layer_norm_and_dropout_positions_exist():
    for fact in ("LAYER_NORM_BACKWARD_INPUT", "LAYER_NORM_BACKWARD_MEAN", "LAYER_NORM_BACKWARD_RSTD",
                 "LAYER_NORM_BACKWARD_WEIGHT", "DROPOUT_P"):
        assert getattr(torch_ir, fact) is not None, f"torch_ir.{fact}: argument renamed"
    returns = [r.name for r in aten.native_layer_norm.default._schema.returns]
    assert len(returns) == 3  # (output, mean, rstd)
    assert len(aten.native_dropout.default._schema.returns) == 2  # (output, mask)


def test_conv_pool_and_batch_norm_backward_positions_exist():
    for fact in ("CONVOLUTION_BACKWARD_GRAD", "CONVOLUTION_BACKWARD_INPUT", "CONVOLUTION_BACKWARD_WEIGHT",
                 "CONVOLUTION_BACKWARD_MASK", "MAX_POOL2D_BACKWARD_SELF", "BATCH_NORM_BACKWARD_INPUT",
                 "BATCH_NORM_BACKWARD_WEIGHT"):
        assert getattr(torch_ir, fact) is not None, f"torch_ir.{fact}: argument renamed"
    # inductor's BatchNorm: var_mean over every dim but the channels, (var, mean)
    graph = make_fx(lambda x: nn.functional.batch_norm(x, None, None, training=True),
                    decomposition_table=capture.inductor_decompositions())(torch.randn(2, 3, 4, 4)).graph
    stats = [n for n in graph.nodes if n.target == aten.var_mean.correction]
    assert stats and sorted(stats[0].args[1]) == [0, 2, 3], [str(n.target) for n in graph.nodes]
    means = [u for u in stats[0].users if u.args[1] == 1]
    assert any(v.target == aten.sub.Tensor for m in means for v in m.users), "x - mean no longer there"


def test_inductors_softmax_decomposition_is_the_one_matched():
    graph = make_fx(lambda x: torch.softmax(x, -1),
                    decomposition_table=capture.inductor_decompositions())(torch.randn(2, 3)).graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch_ir.DECOMPOSED_SOFTMAX_FIRST in targets, targets
    last = [n for n in graph.nodes if n.op == "call_function"][-1]
    assert last.target == torch_ir.DECOMPOSED_SOFTMAX_LAST, targets
    assert last.args[0].target == torch_ir.DECOMPOSED_SOFTMAX_EXP, targets


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return self.head(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8))


def test_partitioned_graphs_use_the_names_and_ops_the_passes_expect():
    """primals_N / tangents_N placeholders, and a fused attention backward that
    reads the saved q, k, v: compression then packs them (counters > 0)."""
    torch.manual_seed(0)
    cm = slimfit_fx.compile(_Attention(), schedule="manual", backend="aot_eager", compression="paper")
    cm.slimfit.set_frozen([])
    cm(torch.randn(2, 5, 8)).sum().backward()
    graphs = cm.slimfit.last_step.graphs
    forward_inputs = [n.name for n in graphs["forward before passes"].graph.nodes if n.op == "placeholder"]
    assert all(torch_ir.forward_input_index(name) == i for i, name in enumerate(forward_inputs)), forward_inputs
    backward = graphs["backward before passes"].graph
    assert any(n.name.startswith(torch_ir.TANGENT_PREFIX) for n in backward.nodes if n.op == "placeholder")
    attention = [n for n in backward.nodes if n.target in torch_ir.ATTENTION_BACKWARD]
    assert attention, sorted({str(n.target) for n in backward.nodes})
    assert cm.slimfit.last_step.counters.get("compressed_qkv", 0) >= 1, cm.slimfit.last_step.counters


def test_forward_input_index_reads_primals_names():
    assert torch_ir.forward_input_index("primals_1") == 0
    assert torch_ir.forward_input_index("primals_12") == 11
    assert torch_ir.forward_input_index("tangents_1") is None
    assert torch_ir.forward_input_index("primals_x") is None


def test_every_kind_has_one_matcher_and_a_config_field():
    assert set(MATCHERS) == {k.name for k in KINDS}
    assert {k.field for k in KINDS} == set(KIND_FIELDS)
    for k in KINDS:
        assert getattr(CompressionConfig(), k.field) == k.paper, k.name


def test_writes_to_inputs_are_found_even_where_a_schema_hides_them():
    """native_batch_norm updates running statistics its schema does not declare
    written; under hidden_write_decompositions() they show as written inputs, as
    does an in-place op through a view. Eval mode writes nothing."""
    def batch_norm(x, running_mean, running_var, weight, training):
        return nn.functional.batch_norm(x, running_mean, running_var, weight, None, training)

    def add_in_place(x, w):
        x.view(-1).add_(1)
        return x * w

    args = (torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), torch.ones(3))

    def trace(f, *a):
        return make_fx(f, tracing_mode="fake", decomposition_table=torch_ir.hidden_write_decompositions())(*a)

    assert torch_ir.mutated_inputs(trace(lambda *a: batch_norm(*a, True), *args)) == {1, 2}
    assert torch_ir.mutated_inputs(trace(lambda *a: batch_norm(*a, False), *args)) == set()
    assert torch_ir.mutated_inputs(trace(add_in_place, torch.randn(2, 3), torch.randn(3))) == {0}
    assert not any(a.alias_info and a.alias_info.is_write
                   for a in aten.native_batch_norm.default._schema.arguments), \
        "native_batch_norm now declares its writes: HIDDEN_WRITE_OPS may drop it"


def _dynamo_graph(model: nn.Module, **inputs) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    capture.reset_dynamo()
    torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    capture.reset_dynamo()
    return graphs[0]


@pytest.mark.parametrize("factory", ["bert", "llama", "llama_lora"])
def test_dynamo_names_modules_as_named_modules_does(factory):
    # BERT's forward is a plain method (L['self']); transformers 5 wraps Llama's
    # as wrapper(*args, **kwargs), so dynamo roots it at L['args'][0]. peft's
    # wrappers hand out the model they wrap from __getattr__, so dynamo reaches
    # it through __dict__['_modules'] (its blocks are found all the same).
    if factory == "llama_lora":
        pytest.importorskip("peft")
    case = getattr(models, factory)()
    gm = _dynamo_graph(case.model, **case.batch)
    names = {name for name, _ in case.model.named_modules()}
    paths = [path for n in gm.graph.nodes if n.op == "call_function" for path in [torch_ir.module_path(n)] if path]
    assert paths, "dynamo recorded no module stack on any call"
    unknown = {p for path in paths for p in path} - names
    assert not unknown, f"dynamo module paths that are not named_modules() names: {sorted(unknown)[:3]}"
    blocks = set(regions.block_prefixes(case.model))
    assert blocks <= {p for path in paths for p in path}, "the repeated blocks are not found in the graph"
    # the engine reads inputs' and weight uses' traced values (regions.structural_key, tap_weight_grads)
    values = [torch_ir.dynamo_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    assert values and all(isinstance(v, torch.Tensor) for v in values), \
        f"dynamo keeps no traced value in meta[{torch_ir.DYNAMO_VALUE!r}]"


def test_is_aten_op_sees_the_aten_graph_ops():
    gm = make_fx(lambda x: torch.relu(x) + 1, tracing_mode="fake")(torch.randn(3))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls and all(torch_ir.is_aten_op(n) for n in calls)
    assert not any(torch_ir.is_aten_op(n) for n in gm.graph.nodes if n.op != "call_function")


def test_capture_provides_the_tracer_and_splitter_the_engine_uses():
    import inspect
    assert "keep_original_node_name" in inspect.signature(capture.split_module).parameters
    assert "tracing_mode" in inspect.signature(capture.make_fx).parameters
