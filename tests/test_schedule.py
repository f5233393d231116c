"""The ILS scheduler: scores, selection, loops it must fit, resume."""
from __future__ import annotations

import io

import pytest
import torch

import slimfit_fx
from slimfit_fx.report import Report
from slimfit_fx.schedule import relative_change

from . import models


def ils(case: models.Case, **overrides) -> slimfit_fx.SlimFitModule:
    config = dict(backend="aot_eager", schedule="ils", freeze_ratio=0.8)
    return slimfit_fx.compile(case.model, **{**config, **overrides})


def train(cm, case: models.Case, optimizer, steps: int, micro_batches: int = 1, on_step=None) -> list[float]:
    losses = []
    for _ in range(steps):
        for _ in range(micro_batches):
            loss = case.loss(cm(**case.batch)) / micro_batches
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return losses


def test_relative_change_is_the_papers_score():
    old = torch.tensor([1.0, -2.0, 4.0, 0.0])
    new = torch.tensor([1.5, -2.0, 3.0, 0.0])
    # (0.5/1 + 0/2 + 1/4 + 0) / 4; a zero weight that stays zero counts 0, not nan
    assert relative_change(old, new).item() == pytest.approx(0.1875)


def test_every_layer_trains_before_measured_scores_compete():
    case = models.bert()
    cm = ils(case)
    layers = cm.slimfit.layers
    trainable = len(layers) - int(0.8 * len(layers))
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    rounds = -(-len(layers) // trainable)
    train(cm, case, optimizer, rounds)
    counts = cm.slimfit.schedule.trained_counts()
    assert min(counts) >= 1, dict(zip(layers, counts))
    assert len(cm.slimfit.frozen) == int(0.8 * len(layers))


def test_the_lowest_scores_are_frozen_next():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, 3)
    schedule = cm.slimfit.schedule
    order = torch.argsort(schedule.policy.scores, stable=True).tolist()
    expected = {cm.slimfit.layers[i] for i in order[: schedule.num_frozen]}
    assert cm.slimfit.frozen == expected


def test_always_train_layers_train_every_step_and_the_frozen_share_holds():
    case = models.bert()
    head = "classifier.weight"
    cm = ils(case, always_train=(head,))
    layers = cm.slimfit.layers
    assert head in layers
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    sizes = []
    train(cm, case, optimizer, 6, on_step=lambda: sizes.append(len(cm.slimfit.frozen)))
    counts = dict(zip(layers, cm.slimfit.schedule.trained_counts()))
    assert counts[head] == 6, counts
    assert set(sizes) == {int(0.8 * len(layers))}
    # without it the head is scored like any layer and sits out some steps
    cm = ils(models.bert())
    train(cm, case, torch.optim.SGD(cm.parameters(), lr=1e-2), 6)
    assert dict(zip(layers, cm.slimfit.schedule.trained_counts()))[head] < 6


def test_always_train_leaves_room_it_cannot_take_from_the_ratio():
    layers = slimfit_fx.compile(models.mlp().model, schedule="manual", backend="aot_eager").slimfit.layers
    cm = ils(models.mlp(), freeze_ratio=1.0, always_train=layers[:1])
    assert cm.slimfit.frozen == frozenset(layers[1:])


@pytest.mark.parametrize("names, error, match", [
    (("not.a.parameter",), KeyError, "SlimFitConfig.always_train: 'not.a.parameter' is not a parameter"),
    (("classifier.bias",), ValueError, "is a parameter but not a layer"),
])
def test_always_train_names_must_be_layers(names, error, match):
    with pytest.raises(error, match=match):
        ils(models.bert(), always_train=names)


@pytest.mark.parametrize("value, error, match", [
    ("classifier.weight", TypeError, "tuple of layer names"),
    ((1,), TypeError, "tuple of layer names"),
])
def test_bad_always_train_is_refused(value, error, match):
    with pytest.raises(error, match=match):
        slimfit_fx.SlimFitConfig(schedule="ils", always_train=value)


def test_always_train_needs_the_ils_schedule():
    with pytest.raises(ValueError, match="schedule='ils'"):
        slimfit_fx.SlimFitConfig(schedule="manual", always_train=("classifier.weight",))


def test_frozen_layers_do_not_move_under_adamw_with_stale_grads():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    params = dict(cm.named_parameters())
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in params.items()}
        frozen = cm.slimfit.frozen
        case.loss(cm(**case.batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # zero tensors stay on frozen layers
        for name in frozen:
            assert torch.equal(params[name], before[name]), f"frozen {name} moved"
        assert any(not torch.equal(params[n], before[n]) for n in cm.slimfit.layers if n not in frozen)


def test_per_step_ils_visits_new_sets_every_step_and_never_compiles_after_step_one():
    """The paper's schedule: a new frozen set after every optimizer step, all
    served by the regions compiled at the first step (no dynamo recompile)."""
    case = models.bert()
    cm = ils(case)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    seen = []
    train(cm, case, optimizer, 9, on_step=lambda: seen.append(
        (dict(cm.slimfit.stats), slimfit_fx.capture.dynamo_compiled_frames())))
    distinct = len(set(cm.slimfit.schedule.history))
    assert distinct >= 8  # a new set nearly every step (only 22 layers here)
    first_stats, first_frames = seen[0]
    for stats, frames in seen[1:]:
        assert frames == first_frames, "a frozen-set change recompiled in dynamo"
        assert stats["compile_seconds"] == first_stats["compile_seconds"]
        assert stats["regions_compiled"] == first_stats["regions_compiled"]
    assert first_stats["graphs_captured"] == 1


def test_the_same_seed_gives_the_same_sets_whatever_the_timing():
    """No clock in the schedule: two runs of one seed pick identical sets even
    when one of them is slowed down."""
    import time as _time

    histories = []
    for delay in (0.0, 0.05):
        case = models.mlp()
        cm = ils(case)
        train(cm, case, torch.optim.SGD(cm.parameters(), lr=1e-2), 6,
              on_step=lambda: _time.sleep(delay))
        histories.append(list(cm.slimfit.schedule.history))
        slimfit_fx.capture.reset_dynamo()
    assert histories[0] == histories[1]


def test_gradient_accumulation_scores_once_per_optimizer_step():
    case = models.bert()
    cm = ils(case)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    sets = []
    original = cm.forward

    def forward(*args, **kwargs):
        sets.append(cm.slimfit.frozen)
        return original(*args, **kwargs)

    cm.forward = forward
    train(cm, case, optimizer, 3, micro_batches=2)
    schedule = cm.slimfit.schedule
    assert schedule.step == 3 and len(schedule.history) == 3
    assert sets[0] == sets[1] and sets[2] == sets[3] and sets[4] == sets[5]
    assert sets[0] != sets[2]


def test_works_with_a_learning_rate_scheduler():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    lr = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=4)
    train(cm, case, optimizer, 4, on_step=lr.step)
    assert cm.slimfit.schedule.step == 4


def test_freeze_ratio_zero_freezes_nothing():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.0)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, 2)
    assert cm.slimfit.frozen == frozenset()
    assert cm.slimfit.schedule.trained_counts() == [2] * len(cm.slimfit.layers)


def test_an_optimizer_without_the_models_layers_is_ignored():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    other = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(other.parameters(), lr=1e-2)
    other(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert cm.slimfit.schedule.step == 0


def test_set_frozen_is_refused_under_ils():
    cm = ils(models.mlp())
    with pytest.raises(RuntimeError, match="schedule='manual'"):
        cm.slimfit.set_frozen([])


@pytest.mark.parametrize("field, value, error", [
    ("schedule", "every-step", ValueError),
    ("reschedule_every", 0, ValueError),
    ("seed", -1, ValueError),
])
def test_bad_schedule_settings_name_the_field(field, value, error):
    with pytest.raises(error, match=field):
        slimfit_fx.SlimFitConfig(**{field: value})


def _checkpoint(*objects) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return buffer


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_losses():
    steps, cut = 8, 3

    def fresh():
        case = models.bert(seed=0)
        cm = ils(case)
        return case, cm, torch.optim.AdamW(cm.parameters(), lr=1e-3)

    case, cm, optimizer = fresh()
    uninterrupted = train(cm, case, optimizer, steps)
    frozen_sets = cm.slimfit.schedule.history

    case, cm, optimizer = fresh()
    first = train(cm, case, optimizer, cut)
    buffer = _checkpoint(cm, optimizer, cm.slimfit)
    del case, cm, optimizer
    slimfit_fx.capture.reset_dynamo()

    case, cm, optimizer = fresh()
    model_state, optimizer_state, slimfit_state = torch.load(buffer, weights_only=True)
    cm.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    cm.slimfit.load_state_dict(slimfit_state)
    rest = train(cm, case, optimizer, steps - cut)
    assert first + rest == uninterrupted
    assert cm.slimfit.schedule.history == frozen_sets


def test_state_from_another_model_is_refused():
    cm = ils(models.mlp())
    state = cm.slimfit.state_dict()
    state["layers"] = state["layers"][:-1]
    other = ils(models.mlp(seed=1))
    with pytest.raises(ValueError, match="different set of layers"):
        other.slimfit.load_state_dict(state)
    manual = slimfit_fx.compile(models.mlp(seed=2).model, schedule="manual", backend="aot_eager")
    with pytest.raises(ValueError, match="schedule='ils'"):
        manual.slimfit.load_state_dict(cm.slimfit.state_dict())


def test_schedule_heatmap_and_report(tmp_path):
    case = models.bert()
    cm = ils(case)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, 5)
    schedule = cm.slimfit.schedule
    trained = schedule.history_matrix()
    assert trained.shape == (len(cm.slimfit.layers), 5)
    assert trained.sum(dim=1).tolist() == schedule.trained_counts()
    path = cm.slimfit.plot_schedule(tmp_path / "schedule.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = cm.slimfit.report()
    assert report.schedule["steps"] == 5
    assert report.schedule["trained_steps"] == dict(zip(cm.slimfit.layers, schedule.trained_counts()))
    assert "schedule" in str(report)
    assert Report.from_json(report.to_json()) == report


def test_zero_weights_score_zero_when_they_stay_and_inf_when_they_move():
    old = torch.tensor([0.0, 0.0, 2.0])
    assert relative_change(old, torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(0.5 / 3)
    assert relative_change(old, torch.tensor([0.0, 1e-30, 2.0])).item() == float("inf")
    assert relative_change(old, old.clone()).item() == 0.0


def test_a_score_is_the_mean_over_every_element():
    """Changes only in elements a strided sample skips still count, exactly."""
    big = torch.randn(1000, 300, dtype=torch.float64)
    moved = big.clone()
    moved[:, 1::2] *= 1.01  # every other column: 1% each, the rest unchanged
    assert relative_change(big, moved).item() == pytest.approx(0.005, rel=1e-12)
    # float32 weights: summed in float32, divided in float64
    assert relative_change(big.float(), moved.float()).item() == pytest.approx(0.005, rel=1e-5)


def test_a_score_over_a_large_layer_allocates_slices_not_copies():
    """The score's temporaries stay a slice's size however large the layer (a
    vocabulary-sized embedding trains at the optimizer step, the step's peak),
    and slicing changes the sum by float32 rounding only."""
    from torch.overrides import TorchFunctionMode

    from slimfit_fx import schedule

    class LargestAllocation(TorchFunctionMode):
        """The most elements one call's new tensor holds (views of an input excluded)."""
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, out.numel())
            return out

    old = torch.randn(int(3.5 * schedule._CHANGE_SLICE), generator=torch.Generator().manual_seed(0))
    new = old * (1 + 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)))
    new[::7] = old[::7]  # unchanged elements add 0
    with LargestAllocation() as mode:
        got = schedule.change_sum(old.reshape(-1, 512), new.reshape(-1, 512))
    assert mode.largest <= schedule._CHANGE_SLICE
    expected = ((new.double() - old.double()).abs() / old.double().abs()).sum()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_score_bookkeeping_is_one_copy_of_the_layers_that_train():
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    params = dict(cm.named_parameters())
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    trained_bytes = []
    for _ in range(3):
        trained_bytes.append(sum(params[n].nbytes for n in cm.slimfit.layers if n not in cm.slimfit.frozen))
        train(cm, case, optimizer, 1)
    schedule = cm.slimfit.schedule
    assert schedule.snapshot_bytes_peak == max(trained_bytes)
    assert not schedule._snapshots and not schedule._reference  # freed once scored


def test_scores_are_the_whole_tensors_relative_change():
    """Each trained layer's score is mean(|W_t - W_t-1| / |W_t-1|) of its whole
    weight; a frozen layer keeps its old score."""
    case = models.bert()
    cm = ils(case, freeze_ratio=0.5)
    params = dict(cm.named_parameters())
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    schedule = cm.slimfit.schedule
    for _ in range(4):
        before = {n: params[n].detach().clone() for n in cm.slimfit.layers}
        frozen, scores = cm.slimfit.frozen, schedule.policy.scores.clone()
        train(cm, case, optimizer, 1)
        for i, name in enumerate(cm.slimfit.layers):
            if name in frozen:
                assert schedule.policy.scores[i] == scores[i], name
            else:
                expected = relative_change(before[name].double(), params[name].detach().double()).item()
                assert schedule.policy.scores[i].item() == pytest.approx(expected, rel=1e-5), name


def test_per_step_ils_on_a_second_model_of_the_same_class():
    """Dynamo sees the second BERT's forward as a recompile of the first, so its
    sizes and float constants turn symbolic; later regions must still build."""
    from transformers import BertConfig, BertForSequenceClassification

    first = models.bert()
    slimfit_fx.compile(first.model, schedule="manual", backend="aot_eager")(**first.batch).loss.backward()
    case = models.bert(seed=1, batch=3, seq=16)
    config = BertConfig(**{**case.model.config.to_dict(), "num_attention_heads": 4, "hidden_size": 48})
    case.model = BertForSequenceClassification(config).train()
    cm = ils(case)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, 3)
    assert cm.slimfit.stats["graphs_captured"] == 1


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_memory_stays_flat_over_1000_distinct_frozen_sets():
    """1,000 steps, each with a new random half of the layers frozen: nothing
    compiled after step 1, and the process RSS after step 1,000 within 8 MiB of
    its value after step 100 (a per-set compile used to leave 0.1-2.6 MB each)."""
    import gc
    import random

    case = models.bert()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    layers = cm.slimfit.layers
    rng = random.Random(0)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-3)
    seen, rss = set(), {}
    for step in range(1, 1001):
        frozen = frozenset(rng.sample(layers, len(layers) // 2))
        seen.add(frozen)
        cm.slimfit.set_frozen(frozen)
        case.loss(cm(**case.batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            compiled = cm.slimfit.stats["compile_seconds"]
        if step in (100, 1000):
            gc.collect()
            rss[step] = _rss_mib()
    assert len(seen) >= 990
    assert cm.slimfit.stats["compile_seconds"] == compiled
    assert rss[1000] - rss[100] <= 8.0, rss


def _sgd_by_hand(cm, lr=0.1):
    with torch.no_grad():
        for p in cm.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)  # as torch.optim.SGD updates
                p.grad = None


def test_a_hand_written_update_loop_is_told_to_call_step():
    """No torch.optim optimizer, so no step hook: the first forward after weights
    moved says so instead of keeping the first set forever."""
    case = models.mlp()
    cm = ils(case)
    case.loss(cm(**case.batch)).backward()
    _sgd_by_hand(cm)
    with pytest.raises(slimfit_fx.SlimFitError, match=r"no torch.optim optimizer step.*cm\.slimfit\.step\(\)"):
        cm(**case.batch)


def test_slimfit_step_drives_ils_from_a_hand_written_loop():
    """cm.slimfit.step() after each update scores the trained layers by how far
    they moved and picks the next set, as an optimizer step does."""
    runs = []
    for manual in (True, False):
        case = models.mlp()
        cm = ils(case)
        optimizer = torch.optim.SGD(cm.parameters(), lr=0.1)
        for _ in range(6):
            case.loss(cm(**case.batch)).backward()
            if manual:
                _sgd_by_hand(cm)
                cm.slimfit.step()
            else:
                optimizer.step()
                optimizer.zero_grad()
        schedule = cm.slimfit.schedule
        trained_bytes = sum(p.nbytes for n, p in cm.named_parameters()
                            if n in cm.slimfit.layers and n not in cm.slimfit.frozen)
        runs.append((list(schedule.history), schedule.policy.scores.clone(), schedule.snapshot_bytes_peak, trained_bytes))
        slimfit_fx.capture.reset_dynamo()
    (manual_history, manual_scores, manual_peak, held), (optim_history, optim_scores, _, _) = runs
    assert len(set(manual_history)) > 1 and manual_history == optim_history
    torch.testing.assert_close(manual_scores, optim_scores)
    # The copies a hand loop is scored against count as score bookkeeping.
    assert manual_peak >= held > 0


@pytest.mark.parametrize("count", [20, 200])
def test_schedule_plot_names_every_layer_from_20_to_200(tmp_path, monkeypatch, count):
    """Every layer gets a named row of at least 0.09 in (9 px at 100 dpi), the
    picture growing with the layer count, and a legend says which shade trained."""
    import matplotlib.axes
    import matplotlib.image

    from slimfit_fx.plots import plot_schedule

    seen = {}
    for method in ("set_yticks", "legend"):
        original = getattr(matplotlib.axes.Axes, method)
        monkeypatch.setattr(matplotlib.axes.Axes, method,
                            lambda self, *a, _o=original, _m=method, **k: seen.setdefault(_m, (a, k)) and _o(self, *a, **k))
    layers = tuple(f"model.encoder.layer.{i // 8}.block.weight_{i % 8}" for i in range(count))
    trained = torch.rand(count, 30, generator=torch.Generator().manual_seed(0)) < 0.1
    pixels = matplotlib.image.imread(plot_schedule(trained, layers, tmp_path / "s.png"))
    assert pixels.shape[0] >= 9 * count
    ticks, labels = seen["set_yticks"][0]
    assert len(ticks) == count and list(labels) == list(layers)
    assert [h.get_label() for h in seen["legend"][1]["handles"]] == ["trained", "frozen"]


def test_slimfit_step_is_idempotent_per_update():
    """A second cm.slimfit.step() for one update changes nothing: scoring again
    would give the layers that just trained 0 and freeze them."""
    runs = []
    for calls in (1, 2):
        case = models.mlp()
        cm = ils(case, freeze_ratio=0.5)
        schedule = cm.slimfit.schedule
        for _ in range(5):
            case.loss(cm(**case.batch)).backward()
            _sgd_by_hand(cm)
            cm.slimfit.step()
            after_first = (schedule.step, cm.slimfit.frozen, schedule.policy.scores.clone())
            for _ in range(calls - 1):
                cm.slimfit.step()
            assert (schedule.step, cm.slimfit.frozen) == after_first[:2]
            assert torch.equal(schedule.policy.scores, after_first[2])
        runs.append((list(schedule.history), schedule.policy.scores.clone()))
        slimfit_fx.capture.reset_dynamo()
    assert runs[0][0] == runs[1][0] and len(set(runs[0][0])) > 1
    assert torch.equal(runs[0][1], runs[1][1])


def _embeddings_left_out(cm) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for n, p in cm.named_parameters() if not n.startswith("bert.embeddings.")],
                           lr=1e-2)


def test_layers_in_no_optimizer_are_not_scheduled():
    """An optimizer without the embeddings: they never move, so their initial
    scores would keep them training for good and hold the training slots.
    They are frozen from the first step on, outside freeze_ratio, and the
    report names them; every layer the optimizer holds trains."""
    case = models.bert()
    cm = ils(case, freeze_ratio=0.9)
    layers = cm.slimfit.layers
    left_out = [n for n in layers if n.startswith("bert.embeddings.")]
    held = [n for n in layers if n not in left_out]
    assert len(left_out) == 4 and len(held) == 18
    assert len(cm.slimfit.frozen) == int(0.9 * len(layers))  # before any step: drawn over all layers
    optimizer = _embeddings_left_out(cm)
    sizes = []
    train(cm, case, optimizer, 20, on_step=lambda: sizes.append(len(cm.slimfit.frozen - set(left_out))))
    schedule = cm.slimfit.schedule
    counts = dict(zip(layers, schedule.trained_counts()))
    assert all(counts[n] >= 1 for n in held), counts
    assert all(counts[n] == 0 for n in left_out), counts
    assert set(sizes) == {int(0.9 * len(held))} == {schedule.num_frozen}
    assert set(left_out) <= cm.slimfit.frozen
    params = dict(cm.named_parameters())
    assert all(params[n].grad is None for n in left_out)  # no gradient kept for them
    assert cm.slimfit.not_scheduled == dict.fromkeys(left_out, "in no optimizer that stepped, so kept frozen")
    report = cm.slimfit.report()
    assert report.not_scheduled == cm.slimfit.not_scheduled
    text = str(report)
    assert "4 not scheduled" in text and "4 in no optimizer that stepped" in text and left_out[0] in text
    assert Report.from_json(report.to_json()) == report


def test_layers_frozen_by_the_user_are_reported_and_stay_out():
    case = models.bert()
    embeddings = [n for n, p in case.model.named_parameters() if n.startswith("bert.embeddings.")]
    for name, p in case.model.named_parameters():
        if name in embeddings:
            p.requires_grad_(False)
    cm = ils(case, freeze_ratio=0.5)
    assert not set(embeddings) & set(cm.slimfit.layers)
    train(cm, case, torch.optim.SGD(cm.parameters(), lr=1e-2), 2)
    layer_weights = [n for n in embeddings if not n.endswith(".bias")]
    assert cm.slimfit.not_scheduled == dict.fromkeys(layer_weights, "requires_grad=False before compile")
    assert cm.slimfit.schedule.num_frozen == int(0.5 * len(cm.slimfit.layers))
    assert "requires_grad=False before compile" in str(cm.slimfit.report())


def test_several_optimizers_make_one_update():
    """One optimizer for the head and one for the body: the schedule advances
    once per update, as with a single optimizer holding both (SGD: the same
    weights, so the same scores and sets)."""
    runs = []
    for split in (False, True):
        case = models.bert()
        cm = ils(case)
        params = dict(cm.named_parameters())
        head = [p for n, p in params.items() if n.startswith(("classifier.", "bert.pooler."))]
        body = [p for n, p in params.items() if not n.startswith(("classifier.", "bert.pooler."))]
        optimizers = [torch.optim.SGD(head, lr=1e-2), torch.optim.SGD(body, lr=1e-2)] if split else \
            [torch.optim.SGD(params.values(), lr=1e-2)]
        for _ in range(6):
            case.loss(cm(**case.batch)).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        schedule = cm.slimfit.schedule
        runs.append((schedule.step, list(schedule.history), schedule.policy.scores.clone(), cm.slimfit.frozen, cm))
        slimfit_fx.capture.reset_dynamo()
    (one_step, one_history, one_scores, one_frozen, _), (step, history, scores, frozen, cm) = runs
    assert step == one_step == 6
    assert history == one_history and frozen == one_frozen
    torch.testing.assert_close(scores, one_scores)
    assert cm.slimfit.not_scheduled == {}  # every layer is in one of the two


def test_the_held_layers_survive_a_checkpoint():
    case = models.bert()
    cm = ils(case, freeze_ratio=0.9)
    train(cm, case, _embeddings_left_out(cm), 3)
    buffer = _checkpoint(cm.slimfit)
    resumed = ils(models.bert(), freeze_ratio=0.9)
    resumed.slimfit.load_state_dict(torch.load(buffer, weights_only=True)[0])
    assert resumed.slimfit.not_scheduled == cm.slimfit.not_scheduled
    assert resumed.slimfit.frozen == cm.slimfit.frozen
    assert resumed.slimfit.schedule.num_frozen == cm.slimfit.schedule.num_frozen == int(0.9 * 18)


def test_loading_weights_before_the_first_step_is_not_an_update():
    """cm.load_state_dict, then two micro-batches, then the optimizer step: the
    weights changed between compile and the second forward, but by loading,
    not by a hand-written update."""
    case = models.mlp()
    cm = ils(case)
    weights = {k: v + 0.5 for k, v in models.mlp(seed=1).model.state_dict().items()}
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    case.loss(cm(**case.batch)).backward()
    cm.load_state_dict(weights)  # between micro-batches of the first step, too
    train(cm, case, optimizer, 2, micro_batches=2)
    assert cm.slimfit.schedule.step == 2


def test_a_step_the_grad_scaler_skips_does_not_advance_the_schedule():
    """GradScaler skips optimizer.step() when a gradient is inf or nan, so no
    step hook fires: no score, no new set, nothing moved."""
    case = models.mlp()
    cm = ils(case, freeze_ratio=0.5)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    params = dict(cm.named_parameters())

    def scaled_step(poison: bool) -> None:
        scaler.scale(case.loss(cm(**case.batch))).backward()
        if poison:
            trained = next(n for n in cm.slimfit.layers if n not in cm.slimfit.frozen)
            params[trained].grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    scaled_step(poison=False)
    schedule = cm.slimfit.schedule
    before = (schedule.step, cm.slimfit.frozen, schedule.policy.scores.clone(), list(schedule.history))
    weights = {n: p.detach().clone() for n, p in params.items()}
    scaled_step(poison=True)
    assert (schedule.step, cm.slimfit.frozen, list(schedule.history)) == (before[0], before[1], before[3])
    assert torch.equal(schedule.policy.scores, before[2])
    assert all(torch.equal(p, weights[n]) for n, p in params.items())
    assert scaler.get_scale() < 65536.0  # the scaler did see the inf and backed off
    scaled_step(poison=False)
    assert schedule.step == before[0] + 1


def test_freeze_ratio_defaults_under_ils_and_manual_takes_none():
    assert slimfit_fx.SlimFitConfig().freeze_ratio == 0.9
    assert slimfit_fx.SlimFitConfig(schedule="manual").freeze_ratio is None
    # a defaulted ratio stays a default, so a config switches to manual and back
    manual = slimfit_fx.SlimFitConfig(backend="aot_eager").replace(schedule="manual")
    assert manual.freeze_ratio is None and manual.replace(schedule="ils").freeze_ratio == 0.9
    cm = slimfit_fx.compile(models.mlp().model, slimfit_fx.SlimFitConfig(backend="aot_eager"), schedule="manual")
    assert cm.slimfit.config.freeze_ratio is None and cm.slimfit.frozen == frozenset()


def _capped(cm, share: float) -> dict[str, int]:
    """Set a cap on the compiled model's schedule: the layers training at once hold
    at most `share` of the parameters' elements. Returns each layer's size."""
    schedule = cm.slimfit.schedule
    sizes = {n: p.numel() for n, p in schedule.parameters.items()}
    cap = sum(sizes.values()) * share
    schedule.admits = lambda names: sum(sizes[n] for n in names) <= cap
    return sizes


def test_a_cap_trains_down_the_policys_ranking_skipping_what_breaks_it():
    """With `admits` set (memory_budget sets it), each step trains down ILS's
    ranking, highest score first, skipping a layer that would break the cap,
    up to the count freeze_ratio leaves; a set that passes is ILS's own."""
    case = models.bert()
    cm = ils(case, freeze_ratio=0.25)
    schedule = cm.slimfit.schedule
    sizes = _capped(cm, 0.3)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    skipped = 0
    for _ in range(8):
        train(cm, case, optimizer, 1)
        candidates = [n for n in schedule.scheduled if n not in schedule.always_train]
        ranked = [cm.slimfit.layers[i] for i in torch.argsort(schedule.policy.scores, stable=True).tolist()[::-1]
                  if cm.slimfit.layers[i] in candidates]
        room = len(candidates) - schedule.num_frozen
        if schedule.admits(ranked[:room]):
            expected = ranked[:room]
        else:
            expected = []
            for name in ranked:
                if len(expected) < room and schedule.admits([*expected, name]):
                    expected.append(name)
            skipped += 1
        assert set(candidates) - schedule.frozen == set(expected)
        assert sum(sizes[n] for n in expected) <= sum(sizes.values()) * 0.3
    assert skipped  # the cap bit on some step


class FirstInModelOrder:
    """Freezes the first num_frozen candidates in model order; ranks nothing."""

    name = "first-in-model-order"
    observes_weight_change = False
    default_freeze_ratio = 0.5

    def choose(self, view):
        return frozenset(view.candidates[: view.num_frozen])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_cap_on_a_policy_that_does_not_rank_freezes_the_fewest_more():
    case = models.bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule=FirstInModelOrder(), freeze_ratio=0.25)
    schedule = cm.slimfit.schedule
    _capped(cm, 0.3)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, 2)
    candidates = [n for n in schedule.scheduled if n not in schedule.always_train]
    fewest = next(f for f in range(schedule.num_frozen, len(candidates) + 1)
                  if schedule.admits(candidates[f:]))
    assert fewest > schedule.num_frozen  # the cap bit
    assert schedule.frozen == set(candidates[:fewest]) | schedule.not_held


class RanksAStranger(FirstInModelOrder):
    name = "ranks-a-stranger"

    def rank(self, view):
        return ["not.a.layer", *view.candidates]


def test_a_ranking_outside_the_candidates_is_refused_under_a_cap():
    case = models.bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule=RanksAStranger(), freeze_ratio=0.25)
    _capped(cm, 0.3)
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    with pytest.raises(slimfit_fx.SlimFitError, match=r"ranked \['not\.a\.layer'\].*rank\(\)"):
        train(cm, case, optimizer, 2)


def test_an_optimizer_step_walks_no_module_tree(monkeypatch):
    # The step hooks run every step; on a small model walking the module tree
    # to find the model's parameters cost 2.5% of each step. The hooks keep the
    # identities they need and refresh them only when the parameters are replaced.
    case = models.mlp()
    cm = ils(case, optimizer_state="int8")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    train(cm, case, optimizer, steps=2)
    walks = []
    original = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original(self, *args, **kwargs)

    case.loss(cm(**case.batch)).backward()
    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    optimizer.step()
    monkeypatch.undo()
    assert walks == []
    assert cm.slimfit.schedule.step == 3  # the hooks did run
