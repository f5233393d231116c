"""cm.slimfit.graphs() and the saved-tensor table: read off the graphs the step ran."""
from __future__ import annotations

import pytest
import torch

import slimfit_fx

from .harness import step
from .models import FACTORIES


def _compiled(model_name="bert", **overrides):
    case = FACTORIES[model_name]()
    return slimfit_fx.compile(case.model, **{"backend": "aot_eager", "compression": "off", "schedule": "manual", **overrides}), case


def test_stages_in_pipeline_order_with_tags_and_a_diff():
    cm, case = _compiled(compression="paper")
    step(cm, case)
    graphs = cm.slimfit.graphs()
    assert graphs is cm.slimfit.compiled_regions()["bert.encoder.layer.0"].graphs
    assert list(graphs) == ["joint", "joint after place_static_saves", "forward before passes",
                            "backward before passes", "forward", "backward"]
    assert "# slimfit: {'compress_saved'" in graphs.format("forward")
    diff = graphs.diff("forward before passes", "forward")
    assert "+%quantize_fixed" in diff
    assert "=== backward ===" in str(graphs)


def test_saved_tensor_table_matches_what_the_step_saved():
    cm, case = _compiled()
    step(cm, case)
    tensors = cm.slimfit.last_step.saved_tensors()
    assert tensors and all(t.nbytes is not None for t in tensors)
    counted = [t for t in tensors if not t.resident]
    # saved_bytes counts each storage once (plus stashed layer inputs); the table lists each tensor
    assert sum(t.nbytes for t in counted) + cm.slimfit.last_step.stash_bytes >= cm.slimfit.saved_bytes
    assert cm.slimfit.saved_bytes >= max(t.nbytes for t in counted)
    report = cm.slimfit.report()
    assert report.saved_tensors == tuple(tensors)
    assert f"saved tensors: {len(tensors)}" in str(report)
    modules = {t.module for t in tensors}
    # a shared block's tensors are named after the block that ran them
    assert {"bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"} <= modules


def test_freezing_shrinks_what_the_step_holds():
    """The regions save the same tensors for any frozen set; what freezing drops
    is the stashed inputs of the layers' weight gradients."""
    cm, case = _compiled()
    step(cm, case)
    before = cm.slimfit.report()
    cm.slimfit.set_frozen(cm.slimfit.layers)
    step(cm, case)
    after = cm.slimfit.report()
    assert after.saved_bytes < before.saved_bytes
    assert len(after.saved_tensors) == len(before.saved_tensors)

def test_graphs_before_training_says_how_to_get_them():
    cm, case = _compiled("mlp")
    with pytest.raises(KeyError, match="run a training forward"):
        cm.slimfit.graphs()
    step(cm, case)
    assert isinstance(cm.slimfit.graphs()["forward"], torch.fx.GraphModule)
    with pytest.raises(KeyError, match="compiled regions are"):
        cm.slimfit.graphs("no such region")


def test_report_round_trips_through_json_and_renders_markdown():
    cm, case = _compiled()
    cm.slimfit.set_frozen(cm.slimfit.layers[:5])
    step(cm, case)
    report = cm.slimfit.report()
    assert report.frozen == tuple(sorted(cm.slimfit.layers[:5]))
    again = type(report).from_json(report.to_json())
    assert again == report
    markdown = report.to_markdown()
    assert "| layers | 22 (5 frozen, 17 trainable) |" in markdown
    assert markdown.count("\n| ") >= len(report.saved_tensors)
