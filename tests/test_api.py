"""The user-facing contract: passthrough, state_dict, no_grad, stats, eviction, errors."""
from __future__ import annotations

import gc
import inspect
import time
import weakref

import pytest
import torch
from torch import nn

import slimfit_fx
from slimfit_fx import AlreadyCompiledError, CaptureError, SlimFitConfig

from .harness import step
from .models import FACTORIES, MLP


def test_module_still_looks_like_the_model():
    case = FACTORIES["bert"]()
    keys = list(case.model.state_dict())
    names = [n for n, _ in case.model.named_parameters()]
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    assert list(cm.state_dict()) == keys
    assert [n for n, _ in cm.named_parameters()] == names
    assert cm.config is case.model.config  # attribute passthrough
    assert cm.bert is case.model.bert
    cm.load_state_dict(case.model.state_dict())
    assert cm.eval() is cm and not case.model.training
    assert cm.train() is cm and case.model.training
    assert {id(p) for p in cm.parameters()} == {id(p) for p in case.model.parameters()}


def test_layers_follow_the_method():
    cm = slimfit_fx.compile(MLP(), schedule="manual", backend="aot_eager")
    # rank >= 2 weights and the LayerNorm weight; no bias, no LayerNorm bias
    assert cm.slimfit.layers == ("net.0.weight", "net.1.weight", "net.3.weight", "net.5.weight")


def test_tied_weights_are_one_layer_and_aliases_resolve():
    case = FACTORIES["gpt2"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    assert "lm_head.weight" not in cm.slimfit.layers
    cm.slimfit.set_frozen(["lm_head.weight"])  # alias of transformer.wte.weight
    assert cm.slimfit.frozen == frozenset({"transformer.wte.weight"})


def test_no_grad_saves_nothing_and_serves_every_set_from_one_compile():
    case = FACTORIES["mlp"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = cm(**case.batch)
        cm.slimfit.set_frozen(cm.slimfit.layers[:2])
        out2 = cm(**case.batch)
    assert not out.requires_grad and not out2.requires_grad
    assert packed == []
    assert cm.slimfit.stats["graphs_captured"] == 1 and cm.slimfit.stats["regions_compiled"] == 0
    torch.testing.assert_close(out, out2)


def test_stats_count_regions_and_compile_time():
    case = FACTORIES["mlp"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    layers = cm.slimfit.layers
    cm.slimfit.set_frozen([])
    step(cm, case)
    first = dict(cm.slimfit.stats)
    for frozen in (layers[:1], [], layers[:1]):
        cm.slimfit.set_frozen(frozen)
        step(cm, case)
    stats = cm.slimfit.stats
    assert stats["compile_seconds"] == first["compile_seconds"] > 0
    assert 1 <= stats["regions_compiled"] <= stats["regions"]
    text = str(cm.slimfit.report())
    assert "1 frozen" in text and "regions" in text
    # One compile share: compile over the training wall time, which stops when training does.
    assert 0 < stats["compile_share"] == stats["compile_seconds"] / stats["wall_seconds"] <= 1
    time.sleep(0.2)
    assert cm.slimfit.stats["wall_seconds"] == stats["wall_seconds"]


def test_removed_per_set_fields_say_why():
    with pytest.raises(TypeError, match="compiles each distinct region once"):
        slimfit_fx.compile(MLP(), max_variants=2)


def test_frozen_grads_are_none_and_optimizer_skips_them():
    case = FACTORIES["mlp"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    frozen = cm.slimfit.layers[:2]
    cm.slimfit.set_frozen(frozen)
    before = {n: p.detach().clone() for n, p in cm.named_parameters()}
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    step(cm, case)
    opt.step()
    for name, p in cm.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == (name not in frozen), name


# ---- bad input gets a clear error ----


def test_compile_rejects_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        slimfit_fx.compile(lambda x: x)


def test_compile_rejects_models_without_trainable_parameters():
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        slimfit_fx.compile(model)


def test_compile_twice_is_an_error():
    model = MLP()
    cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager")
    with pytest.raises(AlreadyCompiledError, match="already called"):
        slimfit_fx.compile(model)
    with pytest.raises(AlreadyCompiledError, match="already a slimfit_fx module"):
        slimfit_fx.compile(cm)
    with pytest.raises(TypeError, match="_orig_mod"):
        slimfit_fx.compile(torch.compile(MLP()))


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["net.9.weight"], KeyError, "not a parameter"),
        (["net.0.wieght"], KeyError, "Did you mean"),
        (["net.0.bias"], ValueError, "biases always train"),
        ("net.0.weight", TypeError, "iterable of parameter names"),
        ([3], TypeError, "must be str"),
    ],
)
def test_set_frozen_rejects_bad_names(names, error, match):
    cm = slimfit_fx.compile(MLP(), schedule="manual", backend="aot_eager")
    with pytest.raises(error, match=match):
        cm.slimfit.set_frozen(names)
    assert cm.slimfit.frozen == frozenset()


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("freeze_ratio", 1.5, ValueError),
        ("freeze_ratio", -0.1, ValueError),
        ("freeze_ratio", "0.9", TypeError),
        ("schedule", "sometimes", ValueError),
        ("backend", "tensorrt", ValueError),
        ("activation_memory_budget", 0.0, ValueError),
        ("activation_memory_budget", 1.5, ValueError),
        ("activation_memory_budget", "low", TypeError),
        ("memory_budget", "16 parsecs", ValueError),
        ("memory_budget", 0.5, ValueError),
        ("memory_budget", -1, ValueError),
    ],
)
def test_config_names_field_and_value(field, value, error):
    with pytest.raises(error, match=rf"SlimFitConfig\.{field}.*{value!r}"):
        SlimFitConfig(**{field: value})


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="unknown SlimFitConfig field"):
        slimfit_fx.compile(MLP(), freez_ratio=0.5)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # branch on a tensor value: dynamo cannot put this in one graph
            return y * 2
        return y


def test_uncapturable_model_says_what_broke():
    cm = slimfit_fx.compile(DataDependent(), schedule="manual", backend="aot_eager")
    with pytest.raises(CaptureError, match=r"DataDependent.forward.*Dynamo said:.*test_api.py"):
        cm(torch.randn(2, 4))


class ManyBreaks(nn.Module):
    """Three graph breaks in one forward, and a buffer the forward updates."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.norm(self.lin(x))
        scale = y.abs().max().item()  # break 1: a Python number from a tensor
        if y.sum() > 0:  # break 2: a branch on a tensor value
            y = y * 2
        print("step")  # break 3: printing
        return y / scale + torch.rand_like(y)


def test_uncapturable_model_lists_every_break_and_changes_nothing():
    model = ManyBreaks()
    model.norm.running_mean.fill_(0.5)
    cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager")
    x = torch.randn(2, 4)
    rng = torch.get_rng_state()
    with pytest.raises(CaptureError) as caught:
        cm(x)
    message = str(caught.value)
    assert "All 3 graph breaks" in message, message
    lines = [line for line in message.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3 and all("test_api.py:" in line for line in lines), message
    source = inspect.getsource(ManyBreaks.forward).splitlines()
    first = inspect.getsourcelines(ManyBreaks.forward)[1]
    broke_at = sorted(int(line.rsplit(":", 1)[1].rstrip(")")) - first for line in lines)
    assert ["item()" in source[broke_at[0]], "if y.sum()" in source[broke_at[1]],
            "print(" in source[broke_at[2]]] == [True] * 3, message
    # The listing ran the forward again: buffers and the RNG stream are as they were.
    assert torch.equal(model.norm.running_mean, torch.full((4,), 0.5))
    assert torch.equal(torch.get_rng_state(), rng)


def test_pass_effects_are_logged_on_request_and_silent_by_default(caplog):
    case = FACTORIES["mlp"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    cm.slimfit.set_frozen(cm.slimfit.layers[:2])
    with caplog.at_level("INFO", logger="slimfit_fx"):
        step(cm, case)
    assert any("compiled a aot_eager region" in r.message and "weight uses tapped" in r.message
               for r in caplog.records)
    import logging
    assert logging.getLogger("slimfit_fx").getEffectiveLevel() > logging.INFO  # silent default


# ---- copies, many models, memory -------------------------------------------------


def test_deepcopy_is_an_independent_compiled_model():
    """The copy runs its own weights (zeroing them changes its outputs, not the
    original's), its backward fills its own .grad, and it starts from the
    original's frozen set; copying after a training step works too."""
    import copy

    case = FACTORIES["mlp"]()
    cm = slimfit_fx.compile(case.model, backend="aot_eager")
    optimizer = torch.optim.SGD(cm.parameters(), lr=0.1)
    for _ in range(2):
        cm(**case.batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        clone = copy.deepcopy(cm)
        assert type(clone) is type(cm) and clone.slimfit.frozen == cm.slimfit.frozen
        assert clone.slimfit.schedule.step == cm.slimfit.schedule.step
        with torch.no_grad():
            reference = cm(**case.batch).clone()
            for p in clone.parameters():
                p.zero_()
            assert torch.equal(cm(**case.batch), reference)
            assert not torch.equal(clone(**case.batch), reference)
        clone(**case.batch).sum().backward()
        assert all(p.grad is None for p in cm.parameters())
        assert any(p.grad is not None for p in clone.parameters())


def test_many_models_of_one_class_compile_in_one_process_and_are_freed():
    """A sweep: each model has its own compiled frames, so the 9th (and 12th) model
    of a class compiles, and a deleted model's engine and weights are freed."""
    refs = []
    for _ in range(12):
        case = FACTORIES["mlp"]()
        cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
        cm(**case.batch).sum().backward()
        refs.append(weakref.ref(case.model))
        del cm, case
        gc.collect()
    assert not [r for r in refs if r() is not None]
