"""regions.tap_weight_grads and the run-time weight gradients: what a region's
backward no longer computes, what a step holds for frozen layers, and counters."""
from __future__ import annotations

import torch

import slimfit_fx

from .harness import step
from .models import FACTORIES

aten = torch.ops.aten


def _compiled(name):
    case = FACTORIES[name]()
    return slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off"), case


def test_a_regions_backward_computes_no_weight_gradient():
    """Every Linear in a BERT block is tapped: the block's backward holds only the
    input-gradient matmuls (one per Linear, Q/K/V/O and both FFN ones), none for weights."""
    cm, case = _compiled("bert")
    step(cm, case)
    block = cm.slimfit.compiled_regions()["bert.encoder.layer.0"]
    assert block.instances == 2  # both encoder layers run one compile
    assert len(block.taps) == 8  # 6 Linear weights + 2 LayerNorm weights
    backward = block.graphs["backward"].graph
    mms = backward.find_nodes(op="call_function", target=aten.mm.default)
    assert len(mms) == 6, [n.format_node() for n in mms]
    assert cm.slimfit.last_step.counters["weight_uses_tapped"] >= 8


def test_frozen_layers_hold_no_input_and_get_no_gradient():
    cm, case = _compiled("bert")
    cm.slimfit.set_frozen([])
    step(cm, case)
    all_trainable = cm.slimfit.last_step
    cm.slimfit.set_frozen(cm.slimfit.layers)
    _, _, grads = step(cm, case)
    all_frozen = cm.slimfit.last_step
    assert all_trainable.stash_bytes > 0 and all_frozen.stash_bytes == 0
    assert all_frozen.saved_bytes < all_trainable.saved_bytes
    assert all(grads[name] is None for name in cm.slimfit.layers)
    assert any(g is not None for name, g in grads.items() if name.endswith(".bias"))


def test_a_frozen_conv_computes_no_weight_gradient():
    cm, case = _compiled("convnet")
    step(cm, case)
    masks = [n.args[-1] for c in cm.slimfit.compiled_regions().values()
             for n in c.graphs["backward"].graph.nodes if n.target == aten.convolution_backward.default]
    assert masks and all(not mask[1] for mask in masks), masks  # output_mask: (input, weight, bias)


def test_placement_makes_the_partitioner_save_what_compression_stores(monkeypatch):
    """Inside a region inductor's min-cut saved GELU derivatives and attention scores
    (fp32, no format for them); place_static_saves steers it to the GELU input and
    the probabilities. Without the pass, neither is packed."""
    from slimfit_fx import engine, zoo

    def run():
        model, batch = zoo.bert_tiny(seed=0, batch=2, seq=12, dropout=0.1)
        cm = slimfit_fx.compile(model, schedule="manual", backend="inductor")
        cm(**batch).loss.backward()
        return cm.slimfit.last_step.counters

    counters = run()
    assert counters["placed_softmax_saves"] == counters["compressed_softmax"] == 2, counters
    assert counters["placed_gelu_input_saves"] == counters["compressed_gelu_input"] == 2, counters
    monkeypatch.setattr(engine, "JOINT_PASSES", ())
    counters = run()
    assert "compressed_gelu_input" not in counters, counters
