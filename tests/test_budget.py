"""SlimFitConfig.memory_budget: sizes parsed, the prediction's rules from numbers,
its weights and optimizer terms against live tensors, and the report's figures."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfit_fx
from slimfit_fx import budget
from slimfit_fx.budget import BudgetError, BudgetTerms, LayerTerms, choose, parse_bytes, predict, predict_set
from slimfit_fx.optimizer_state import INT8_CODE, adam_state_nbytes, entry_bytes, moment_nbytes, pack, state_bytes

from .models import bert


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("2GB", 2 * 10**9), ("512 MiB", 512 * 2**20), ("1.5KiB", 1536),
    ("100", 100), ("7B", 7), ("3kb", 3000), (4096, 4096), (2e9, 2 * 10**9),
])
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("value, error, message", [
    ("16 parsecs", ValueError, r"not a size.*KiB"),
    ("GiB", ValueError, r"not a size"),
    (0.5, ValueError, r"activation_memory_budget"),
    (0, ValueError, r"positive"),
    (True, TypeError, r"size in bytes"),
    ([1], TypeError, r"size in bytes"),
])
def test_bad_sizes_name_the_fix(value, error, message):
    with pytest.raises(error, match=message):
        slimfit_fx.SlimFitConfig(memory_budget=value)


def test_a_fraction_moved_to_activation_memory_budget():
    with pytest.raises(ValueError, match=r"SlimFitConfig\.activation_memory_budget"):
        slimfit_fx.SlimFitConfig(memory_budget=0.1)
    assert slimfit_fx.SlimFitConfig(activation_memory_budget=0.1).activation_memory_budget == 0.1


@pytest.mark.parametrize("overrides, message", [
    (dict(schedule="manual"), r"schedule='manual' does not take"),
    (dict(freeze_ratio=0.5), r"freeze_ratio=0.5 would be overruled"),
])
def test_a_budget_chooses_the_ratio_so_it_refuses_what_fixes_one(overrides, message):
    with pytest.raises(ValueError, match=message):
        slimfit_fx.SlimFitConfig(memory_budget="1GiB", **overrides)


def _terms(sizes: list[int], saved: int = 1000, overhead: int = 100) -> BudgetTerms:
    layers = tuple(LayerTerms(f"l{i}", gradient=4 * n, stash=8 * n,
                              state={p: adam_state_nbytes(n, 4, p) for p in (*budget.PACKINGS, "offload")})
                   for i, n in enumerate(sizes))
    return BudgetTerms(weights=4 * sum(sizes), gradients=40, state=96, saved=saved, overhead=overhead,
                       layers=layers)


SIZES = [5000, 300, 12000, 800, 4096, 70000, 20, 9000, 1500, 33000, 250, 6000]


def test_predict_sums_the_costliest_layers():
    terms = _terms(SIZES)
    full = predict(terms, len(SIZES))
    assert full.peak == (terms.weights + terms.gradients + 4 * sum(SIZES) + terms.state
                         + sum(adam_state_nbytes(n, 4) for n in SIZES)
                         + max(terms.saved + 8 * sum(SIZES), budget.STEP_TEMPORARIES * 4 * max(SIZES))
                         + terms.overhead)
    # the optimizer step's temporaries outweigh a small saved set: the step is the peak
    small = dataclasses.replace(terms, saved=0, layers=tuple(dataclasses.replace(la, stash=0) for la in terms.layers))
    one = predict(small, 1)
    assert one.transients == budget.STEP_TEMPORARIES * 4 * max(SIZES)
    two = predict(terms, 2, "int8")
    top = sorted(SIZES, reverse=True)[:2]
    rest = sorted(SIZES, reverse=True)[2:]
    assert two.gradients == terms.gradients + 4 * sum(top)
    assert two.saved == terms.saved + 8 * sum(top)
    assert two.optimizer_state == terms.state + sum(adam_state_nbytes(n, 4) for n in top) + sum(
        adam_state_nbytes(n, 4, "int8") for n in rest)
    assert two.freeze_ratio == pytest.approx(10 / 12) and int(two.freeze_ratio * 12) == 10


def _cheapest(terms: BudgetTerms, count: int, packing: str) -> list[LayerTerms]:
    return sorted(terms.layers, key=lambda layer: layer.extra(packing))[:count]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=40),
       st.lists(st.integers(0, 10**8), min_size=2, max_size=8))
def test_the_chosen_ratio_falls_as_the_budget_grows(sizes, extras):
    terms = _terms(sizes)
    count = len(sizes)
    least = count - int(budget.MAX_FREEZE_RATIO * count)
    floor = predict(terms, least, "int8").peak
    chosen = [choose(terms, floor + extra) for extra in sorted(extras)]
    for smaller, larger in zip(chosen, chosen[1:]):
        assert (larger.most_trained, larger.trained) >= (smaller.most_trained, smaller.trained)
        assert larger.freeze_ratio <= smaller.freeze_ratio
    for extra, prediction in zip(sorted(extras), chosen):
        limit, packing = floor + extra, prediction.optimizer_state_packing
        assert prediction.peak <= limit
        assert prediction.freeze_ratio <= budget.MAX_FREEZE_RATIO
        assert int(prediction.freeze_ratio * count) == count - prediction.most_trained
        # any `trained` layers fit; `most_trained` fit where they are the cheapest
        assert least <= prediction.trained <= prediction.most_trained
        assert predict(terms, prediction.trained, packing).peak <= limit
        assert predict_set(terms, _cheapest(terms, prediction.most_trained, packing), packing).peak <= limit
        if prediction.most_trained < count:  # one more layer, under any packing, would not fit
            assert all(predict_set(terms, _cheapest(terms, prediction.most_trained + 1, p), p).peak > limit
                       for p in budget.PACKINGS)
        if prediction.most_trained > prediction.trained:  # the schedule trims each choice to the budget
            assert prediction.limit == limit == prediction.peak
        else:
            assert prediction.limit is None and prediction == predict(terms, prediction.trained, packing)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=30), st.floats(0.0, 1.0), st.data())
def test_what_the_cap_admits_fits_the_budget(sizes, share, data):
    terms = _terms(sizes)
    count = len(sizes)
    floor = predict(terms, count - int(budget.MAX_FREEZE_RATIO * count), "int8").peak
    top = predict(terms, count, "full").peak
    limit = int(floor + share * (top - floor))
    prediction = choose(terms, limit)
    admits = budget.admits(terms, prediction)
    if prediction.limit is None:
        assert admits is None
        return
    names = [layer.name for layer in terms.layers]
    by_name = {layer.name: layer for layer in terms.layers}
    packing = prediction.optimizer_state_packing
    for _ in range(5):
        picked = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=prediction.most_trained))
        peak = predict_set(terms, [by_name[n] for n in picked], packing).peak
        assert admits(picked) == (peak <= limit)
        if len(picked) <= prediction.trained:  # the guaranteed count fits whichever layers
            assert admits(picked)


def test_the_packing_that_trains_the_most_per_step_is_chosen():
    terms = _terms(SIZES)
    everything = predict(terms, len(SIZES), "full")
    assert choose(terms, everything.peak) == everything  # every packing trains all: the weakest
    full, int8 = predict(terms, 3, "full"), predict(terms, 3, "int8")
    assert int8.peak < full.peak
    got = choose(terms, int8.peak)
    assert got.optimizer_state_packing == "int8" and got.trained == 3 and got.most_trained > 3
    plain = choose(terms, int8.peak, packings=("full",))
    assert plain.trained < 3 and plain.most_trained <= got.most_trained


def test_below_the_floor_the_error_states_the_floor():
    terms = _terms(SIZES)
    floor = predict(terms, len(SIZES) - int(0.95 * len(SIZES)), "int8").peak
    with pytest.raises(BudgetError, match=rf"below the floor.*at least {floor} ") as info:
        choose(terms, floor - 1)
    assert "optimizer_state='int8'" in str(info.value) and "freeze_ratio 0.95" in str(info.value)
    assert choose(terms, floor).peak == floor


@pytest.mark.parametrize("numel", [100, 4095, 4096, 5000, 70000])
@pytest.mark.parametrize("packing", ["bf16", "int8"])
def test_state_bytes_rule_matches_what_packing_holds(numel, packing):
    p = torch.nn.Parameter(torch.randn(numel))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(numel)
    opt.step()
    entry = opt.state[p]
    assert entry_bytes(entry)[0] == adam_state_nbytes(numel, 4)
    for key in ("exp_avg", "exp_avg_sq"):
        held = (pack(entry[key], packing, INT8_CODE[key]).nbytes if numel >= 4096
                else entry[key].numel() * entry[key].element_size())
        assert held == moment_nbytes(numel, 4, packing)


def _train(cm, case, optimizer, steps):
    for _ in range(steps):
        case.loss(cm(**case.batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("compression", ["norms-float8", "paper", "off"])
def test_weights_and_optimizer_terms_equal_live_bytes_and_the_report_shows_both_peaks(compression):
    case = bert(batch=4, seq=16)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="4GiB", compression=compression)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 3)
    fit = cm.slimfit.fit
    prediction = fit.prediction
    assert prediction.trained == prediction.layers and prediction.freeze_ratio == 0.0  # 4 GiB fits everything
    assert cm.slimfit.schedule.num_frozen == 0
    weights = sum(t.numel() * t.element_size() for t in (*case.model.parameters(), *case.model.buffers()))
    assert prediction.weights == weights
    # every layer trained at the second and third steps: all the state exists, plain
    assert prediction.optimizer_state == state_bytes(optimizer).held
    step = cm.slimfit.last_step
    assert fit.terms_used.saved == step.saved_bytes - step.stash_bytes  # the regions' saved bytes, measured
    # every layer trains: its stash, measured per layer at the choosing forwards, is
    # what the step stashed, each storage once: free where a region saves it anyway
    # (with compression off, 7 of this model's 11 hidden states; predicted from the
    # compiled shapes it read 24% high), a view's whole storage (the pooler's first
    # token: the last hidden state; from the shapes 5% low under float8 norms). Off
    # by the bytes an even split among a storage's readers rounds away.
    assert abs(prediction.saved - step.saved_bytes) <= 16
    before = fit.meter.peak()
    text = str(cm.slimfit.report())
    after = fit.meter.peak()  # the process may reach a new peak while the report is built
    predicted = re.search(r"predicted peak\s+([\d,.]+) MiB", text)
    measured = re.search(r"measured peak\s+([\d,.]+) MiB \((\d+)% of predicted", text)
    assert predicted and measured, text
    assert float(predicted.group(1).replace(",", "")) == pytest.approx(prediction.peak / 2**20, abs=0.05)
    assert before / 2**20 - 0.05 <= float(measured.group(1).replace(",", "")) <= after / 2**20 + 0.05
    assert fit.meter.peak() > weights
    assert slimfit_fx.report.Report.from_json(cm.slimfit.report().to_json()).memory_budget["budget"] == 4 * 2**30


def test_a_chosen_packing_packs_frozen_layers_state():
    case = bert(batch=4, seq=16)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="4GiB")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 3)  # the third forward chooses for good
    fit = cm.slimfit.fit
    fit.apply(dataclasses.replace(fit.prediction, freeze_ratio=0.9, optimizer_state_packing="bf16"))
    _train(cm, case, optimizer, 3)
    held = state_bytes(optimizer)
    assert cm.slimfit.schedule.freeze_ratio == 0.9
    assert held.packed > 0 and held.held < held.plain


def test_a_budget_below_the_floor_raises_at_the_first_forward():
    """Below the floor with no runtime overhead at all, nothing can fit: the
    first forward says so (a budget the residue alone breaks waits for the final
    choice, since compiling's residue shrinks over the first steps)."""
    case = bert(batch=4, seq=16)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="20KB")
    with pytest.raises(BudgetError, match=r"memory_budget=20000 \(0\.0 MiB\) is below the floor.*at least \d+"):
        cm(**case.batch)


def test_a_run_under_a_budget_resumes_from_its_state():
    case = bert(batch=4, seq=16)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="4GiB")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 2)
    state = cm.slimfit.state_dict()
    resumed = slimfit_fx.compile(bert(batch=4, seq=16).model, backend="aot_eager", memory_budget="4GiB")
    resumed.slimfit.load_state_dict(state)  # saved at the ratio 4 GiB chose, not the first step's 0.95
    assert resumed.slimfit.frozen == cm.slimfit.frozen


def test_weights_mapped_from_a_file_are_resident_from_compile(tmp_path):
    """A checkpoint loaded as a lazy map of its file (transformers maps float32
    safetensors) pages its weights in at the first forward; the budget's baseline
    at compile reads them in first, or the residue would count them beside the
    weights (MiniLM: 81 MiB of a 183 MiB residue)."""
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(64 * 2**20))
    mapped = torch.from_file(str(path), shared=False, size=16 * 2**20, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False))
    model[0].weight = torch.nn.Parameter(mapped.view(4096, 4096))
    before = slimfit_fx.fitting.host_rss()
    cm = slimfit_fx.compile(model, backend="aot_eager", memory_budget="4GiB")
    assert cm.slimfit.fit.meter.rss_at_compile - before >= 60 * 2**20


def test_a_budget_between_the_bounds_caps_every_steps_trained_set():
    """A budget the costliest layers together would break, though cheaper ones
    fit: the schedule trains more than the safe count where they fit and never a
    set whose predicted peak passes the budget; the report says so."""
    case = bert(batch=4, seq=16)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="4GiB")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 3)
    fit, schedule = cm.slimfit.fit, cm.slimfit.schedule
    terms = fit.terms_used
    count = len(terms.layers)
    safe = predict(terms, count // 2, "full").peak  # the costliest half fit
    prediction = choose(terms, safe, packings=("full",))
    assert prediction.limit == safe and prediction.trained < prediction.most_trained
    fit.apply(prediction)
    by_name = {layer.name: layer for layer in terms.layers}
    sizes, ran = [], []

    def training():
        return [by_name[n] for n in schedule.scheduled if n not in schedule.frozen and n in by_name]

    for _ in range(6):
        ran.append(predict_set(terms, training(), "full").peak)  # the set this step's forward runs with
        _train(cm, case, optimizer, 1)
        assert predict_set(terms, training(), "full").peak <= safe
        sizes.append(len(training()))
    assert max(sizes) > prediction.trained  # more than the safe count trained where cheaper layers fit
    # the report's prediction for the sets that trained is the largest of theirs
    assert fit.sets_peak == max(ran)
    text = str(cm.slimfit.report())
    assert re.search(rf"{prediction.trained} to {prediction.most_trained} of {count} layers train, each step's "
                     "set capped at the budget", text)
    assert re.search(rf"predicted for the sets trained\s+{max(ran) / 2**20:,.1f} MiB", text)
    assert re.search(r"measured peak\s+[\d,.]+ MiB \(\d+% of predicted, \d+% of predicted for the sets trained",
                     text)


def test_the_cap_refuses_a_layer_no_prediction_counted():
    terms = _terms(SIZES)
    prediction = choose(terms, predict(terms, 3, "int8").peak)
    admits = budget.admits(terms, prediction)
    assert admits(["l0"])
    with pytest.raises(BudgetError, match=r"'late\.weight' joined an optimizer after memory_budget.*Fix: create"):
        admits(["l0", "late.weight"])
