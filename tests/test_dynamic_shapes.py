"""Batches of any shape: sequence length and batch size may change every step
(HF's DataCollatorWithPadding pads each batch to its own longest row), in
training and in evaluation, compiled a few times at most, never once per length."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfit_fx
from slimfit_fx import CaptureError, capture

from .harness import TOLERANCE, eager_step, step
from .models import Case, bert, hf_loss

# Dynamo compiles the first shape static, then once more with the sizes that
# changed made dynamic (once for sequence length, once more if the batch size
# changes later), and specializes a size of 1 (a last batch of one row).
MAX_GRAPHS = 4


def bert_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A seeded tiny-BERT batch padded to `seq`, its shorter rows masked as a
    collator pads them."""
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # the longest row sets the padded length
    for row, length in enumerate(lengths.tolist()):
        mask[row, length:] = 0
    return {"input_ids": torch.randint(0, 64, (batch, seq), generator=g) * mask,
            "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}


def _compare(grads, ref_grads) -> None:
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, f"{name} is frozen but got a gradient"
        else:
            torch.testing.assert_close(grads[name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_changing_batch_shapes_match_eager_every_step(data):
    """Shapes and frozen sets drawn per step; every step matches eager with the
    same set frozen, weights included after each SGD step; once both sizes have
    changed, new shapes compile nothing."""
    case = bert()
    reference = copy.deepcopy(case.model)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off")
    layers = cm.slimfit.layers
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 5), st.integers(2, 40)), min_size=2, max_size=4),
                       label="shapes")
    # both sizes change at least once, so the dims are dynamic before the last steps
    shapes += [(2, 7), (3, 9)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (case.model, reference)]
    for batch, seq in shapes:
        frozen = data.draw(st.sets(st.sampled_from(layers)), label="frozen")
        cm.slimfit.set_frozen(frozen)
        stepped = Case(case.model, bert_batch(batch, seq), hf_loss)
        loss, _, grads = step(cm, stepped)
        ref_loss, _, ref_grads = eager_step(reference, stepped, frozenset(frozen))
        torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
        _compare(grads, ref_grads)
        for opt in optimizers:
            opt.step()
    compiled = dict(cm.slimfit.stats)
    assert compiled["graphs_captured"] <= MAX_GRAPHS, compiled
    for batch, seq in [(4, 33), (2, 61), (5, 3)]:  # new sizes, none of them 1
        step(cm, Case(case.model, bert_batch(batch, seq), hf_loss))
    for key in ("graphs_captured", "regions_compiled"):
        assert cm.slimfit.stats[key] == compiled[key], f"{key}: a new shape compiled again"


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compressed_formats_work_with_dynamic_shapes(backend):
    """The paper's formats apply to regions compiled with symbolic sizes exactly
    as to a static compile: same kinds packed, none skipped for a dynamic shape,
    and the same gradients for the same batch."""
    def grads_after(shapes):
        capture.reset_dynamo()
        case = bert()
        cm = slimfit_fx.compile(case.model, schedule="manual", backend=backend)
        cm.slimfit.set_frozen(cm.slimfit.layers[::2])
        for batch, seq in shapes:
            _, _, grads = step(cm, Case(case.model, bert_batch(batch, seq), hf_loss))
        return grads, cm

    static, cm_static = grads_after([(3, 20)])
    dynamic, cm_dynamic = grads_after([(2, 7), (4, 9), (3, 20)])
    assert cm_static.slimfit.stats["graphs_captured"] == 1
    assert cm_dynamic.slimfit.stats["graphs_captured"] == 2  # static, then both sizes dynamic
    counters = cm_dynamic.slimfit.last_step.counters
    assert not [k for k in counters if k.endswith("_dynamic_shape")], counters
    packed = {k: v for k, v in counters.items() if k.startswith("compressed_")}
    static_packed = {k: v for k, v in cm_static.slimfit.last_step.counters.items() if k.startswith("compressed_")}
    assert packed.get("compressed_qkv") and packed.get("compressed_gelu_input")
    # the same static activations packed (inductor's dynamic graph may save one
    # dropout mask fewer: it can fold it into another saved tensor)
    assert {k: v for k, v in packed.items() if k != "compressed_mask"} == \
        {k: v for k, v in static_packed.items() if k != "compressed_mask"}
    _compare(dynamic, static)


def test_eval_with_changing_lengths_matches_eager():
    case = bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager")
    cm.eval()
    with torch.no_grad():
        for batch, seq in [(2, 12), (3, 17), (1, 40), (4, 9), (2, 25), (3, 31)]:
            inputs = bert_batch(batch, seq)
            torch.testing.assert_close(cm(**inputs).logits, case.model(**inputs).logits,
                                       rtol=TOLERANCE, atol=TOLERANCE)
    assert cm.slimfit.stats["graphs_captured"] <= MAX_GRAPHS


def test_recompile_limit_is_a_capture_error_that_names_the_cause():
    import torch._dynamo

    case = bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", compression="off")
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(CaptureError, match=r"recompiled BertForSequenceClassification.forward 1 times .*"
                                           r"(?s:.*)Fix: .*recompile_limit"):
        cm(**bert_batch(2, 12)).loss.backward()
        cm(**bert_batch(2, 15))


@pytest.mark.slow  # inductor with dropout and every kind; the default run keeps the aot_eager cases above
def test_default_compile_with_dropout_trains_batches_of_odd_sizes():
    """compile(model)'s defaults (inductor, ILS, the paper's formats) with dropout
    on: bit-packed dropout masks of every count, not only whole bytes."""
    from slimfit_fx import zoo

    model, _ = zoo.bert_tiny(dropout=0.1)
    cm = slimfit_fx.compile(model)
    optimizer = torch.optim.AdamW(cm.parameters())
    for batch, seq in [(2, 12), (3, 17), (5, 13), (7, 9)]:  # odd counts of mask bits
        loss = cm(**bert_batch(batch, seq)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    assert cm.slimfit.last_step.counters.get("compressed_mask")
    assert cm.slimfit.stats["graphs_captured"] == 2
