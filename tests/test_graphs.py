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
    cm, case = _compiled()
    encoder = [n for n in cm.slimfit.layers if ".encoder." in n]
    cm.slimfit.set_frozen(encoder)
    step(cm, case)
    graphs = cm.slimfit.graphs()
    assert list(graphs) == ["joint", "joint after cut_frozen_grads", "forward before passes",
                            "backward before passes", "forward", "backward"]
    after = graphs.format("joint after cut_frozen_grads")
    assert "# slimfit: {'cut_frozen_grads': {'grads_cut':" in after
    diff = graphs.diff("joint", "joint after cut_frozen_grads")
    removed = [line for line in diff.splitlines() if line.startswith("-%mm")]
    assert len(removed) == 12, "each frozen Linear's weight-gradient mm should be gone"
    assert "=== backward ===" in str(graphs)


def test_saved_tensor_table_matches_what_the_step_saved():
    cm, case = _compiled()
    step(cm, case)
    variant = cm.slimfit._variant_for_current_set()
    tensors = variant.saved_tensors()
    assert tensors and all(t.nbytes is not None for t in tensors)
    counted = [t for t in tensors if not t.resident]
    # saved_bytes counts each storage once; the table lists each tensor
    assert sum(t.nbytes for t in counted) >= cm.slimfit.saved_bytes >= max(t.nbytes for t in counted)
    report = cm.slimfit.report()
    assert report.saved_tensors == tuple(tensors)
    assert f"saved tensors: {len(tensors)}" in str(report)


def test_before_passes_view_saves_what_the_unfrozen_variant_saves():
    cm, case = _compiled()
    step(cm, case)
    unfrozen = cm.slimfit._variant_for_current_set().saved_tensors()
    cm.slimfit.set_frozen(cm.slimfit.layers)
    step(cm, case)
    variant = cm.slimfit._variant_for_current_set()
    before = variant.saved_tensors_before_passes()
    assert not any(t.measured for t in before)
    # same graph, same partitioner: the tensors the unfrozen run saved. Bytes from
    # shapes equal the measured storage bytes except for views (a slice holds its
    # base's storage, an expand less than its shape says): 3 of 61 here.
    assert [(t.producer, t.shape) for t in before] == [(t.producer, t.shape) for t in unfrozen]
    assert sum(b.nbytes == u.nbytes for b, u in zip(before, unfrozen)) >= 0.9 * len(before)
    dropped = [t for t in before if t.changed_by]
    assert dropped and all(t.changed_by == "cut_frozen_grads: no longer saved" for t in dropped)
    kept = {t.name for t in variant.saved_tensors()}
    assert {t.name for t in before if not t.changed_by} == kept
    modules = {t.module for t in variant.saved_tensors()}
    assert "bert.encoder.layer.0.attention.self" in modules  # from nn_module_stack
    assert "bert.embeddings.LayerNorm.weight" in modules  # a parameter input, by name


def test_freezing_shrinks_the_saved_tensor_list():
    cm, case = _compiled()
    step(cm, case)
    before = [t for t in cm.slimfit.report().saved_tensors if not t.resident]
    cm.slimfit.set_frozen(cm.slimfit.layers)
    step(cm, case)
    after = [t for t in cm.slimfit.report().saved_tensors if not t.resident]
    assert len(after) < len(before)


def test_graphs_for_an_unbuilt_set_says_how_to_get_it():
    cm, case = _compiled("mlp", max_variants=1)
    with pytest.raises(KeyError, match="run a training step"):
        cm.slimfit.graphs()
    step(cm, case)
    cm.slimfit.graphs()  # built now
    cm.slimfit.set_frozen(cm.slimfit.layers[:1])
    step(cm, case)
    with pytest.raises(KeyError, match="max_variants=1"):
        cm.slimfit.graphs(frozen=[])  # evicted
    assert isinstance(cm.slimfit.graphs()["forward"], torch.fx.GraphModule)


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


def test_computed_before_bytes_count_each_storage_once():
    """The no-pass view of a variant predicts what the unfrozen variant measured."""
    from slimfit_fx.graphs import distinct_bytes

    cm, case = _compiled()
    step(cm, case)
    measured = cm.slimfit.saved_bytes
    cm.slimfit.set_frozen(cm.slimfit.layers[:3])
    step(cm, case)
    computed = distinct_bytes(cm.slimfit.report().saved_tensors_before)
    # measured storages may be a little larger (a slice of an input-derived base)
    assert 0.9 * measured <= computed <= measured, (computed, measured)


def test_graphs_default_to_the_set_the_last_step_ran_under_ils():
    """ILS moves the frozen set on at optimizer.step(); graphs() still shows the
    variant that step ran (as report() does), not the next step's set."""
    cm, case = _compiled("mlp", schedule="ils", freeze_ratio=0.5, new_set_every=1)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    for _ in range(3):
        ran = cm.slimfit.frozen
        case.loss(cm(**case.batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert cm.slimfit.frozen != ran  # the scheduler moved on (random initial scores, seeded)
    assert cm.slimfit.graphs() is cm.slimfit.graphs(frozen=ran)
