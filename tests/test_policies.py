"""Freeze policies: a policy of the user's own, LISA, and the config that names them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfit_fx
from slimfit_fx.policies import StepView

BLOCKS, K, INTERVAL = 5, 2, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """Embedding, BLOCKS repeated blocks, head: the shape LISA is meant for."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def _stack(**config) -> slimfit_fx.SlimFitModule:
    torch.manual_seed(0)
    return slimfit_fx.compile(Stack(), backend="aot_eager", **config)


def _train(cm, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(cm.parameters(), lr=0.05)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 6), generator=g)
        nn.functional.cross_entropy(cm(ids), ids[:, 0] % 3).backward()
        optimizer.step()
        optimizer.zero_grad()


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


class FirstHalf:
    """Freezes the first half of the candidates; records what it was shown."""

    name = "first-half"
    observes_weight_change = True

    def __init__(self) -> None:
        self.views: list[StepView] = []

    def choose(self, view: StepView) -> frozenset[str]:
        self.views.append(view)
        return frozenset(view.candidates[: len(view.candidates) // 2])

    def state_dict(self) -> dict:
        return {"first_half_calls": len(self.views)}

    def load_state_dict(self, state) -> None:
        pass


def test_a_policy_of_ones_own_drives_the_frozen_set():
    cm = _stack(schedule=FirstHalf())
    layers = cm.slimfit.layers
    first_half = frozenset(layers[: len(layers) // 2])
    assert cm.slimfit.frozen == first_half
    _train(cm, 3)
    schedule = cm.slimfit.schedule
    assert schedule.step == 3
    assert schedule.history == [schedule._mask(first_half)] * 3
    policy = schedule.policy
    assert [v.step for v in policy.views] == [0, 1, 2, 3]
    # Only layers that trained were measured, each with a real relative change.
    for view in policy.views[1:]:
        assert set(view.changes) == set(layers) - first_half
        assert all(0 < c < float("inf") for c in view.changes.values())
    assert policy.views[0].changes is None
    assert "first-half, 3 optimizer steps" in str(cm.slimfit.report())
    state = cm.slimfit.state_dict()
    assert state["schedule"] == "first-half" and state["first_half_calls"] == 4


def test_each_model_runs_its_own_copy_of_the_policy_object():
    policy = FirstHalf()
    cm = _stack(schedule=policy)
    assert cm.slimfit.schedule.policy is not policy and policy.views == []


def test_a_policy_that_does_not_observe_change_is_shown_none():
    class Nothing(FirstHalf):
        observes_weight_change = False

        def choose(self, view):
            self.views.append(view)
            return frozenset()

    cm = _stack(schedule=Nothing())
    _train(cm, 2)
    views = cm.slimfit.schedule.policy.views
    assert len(views) == 3 and all(v.changes is None for v in views)


def test_a_policy_may_not_freeze_an_always_train_layer():
    class Everything(FirstHalf):
        def choose(self, view):
            return frozenset(view.layers)

    with pytest.raises(slimfit_fx.SlimFitError, match="not among the candidates"):
        _stack(schedule=Everything(), always_train=("head.weight",))


def _trained_blocks(cm) -> list[frozenset[int]]:
    """Per step, the blocks that trained; checks LISA's shape on the way."""
    layers = cm.slimfit.layers
    history = cm.slimfit.schedule.history_matrix()
    per_step = []
    for step in range(history.shape[1]):
        trained = {n for n, t in zip(layers, history[:, step].tolist()) if t}
        assert {n for n in layers if _block_of(n) is None} <= trained  # embedding, head
        blocks = {_block_of(n) for n in trained} - {None}
        assert len(blocks) == K
        # every layer of a drawn block trains, none of the others
        assert {n for n in layers if _block_of(n) in blocks} <= trained
        per_step.append(frozenset(blocks))
    return per_step


def test_lisa_trains_k_whole_blocks_and_every_layer_outside_them():
    cm = _stack(schedule=slimfit_fx.LISA(layers=K, interval=INTERVAL, seed=4))
    assert cm.slimfit.frozen and all(_block_of(n) is not None for n in cm.slimfit.frozen)
    steps = 6 * INTERVAL
    _train(cm, steps)
    per_step = _trained_blocks(cm)
    periods = [per_step[i:i + INTERVAL] for i in range(0, steps, INTERVAL)]
    assert all(len(set(p)) == 1 for p in periods)  # one draw per interval
    assert len({p[0] for p in periods}) > 1  # and new draws
    assert cm.slimfit.schedule.reschedule_every == INTERVAL
    assert f"lisa, {steps} optimizer steps, rescheduled every {INTERVAL}" in str(cm.slimfit.report())


def test_lisa_draws_are_seeded():
    runs = []
    for seed in (7, 7, 8):
        cm = _stack(schedule=slimfit_fx.LISA(layers=K, interval=1, seed=seed))
        _train(cm, 8)
        runs.append(_trained_blocks(cm))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_lisa_state_round_trip_resumes_the_same_draws():
    lisa = slimfit_fx.LISA(layers=K, interval=2, seed=3)
    whole = _stack(schedule=lisa)
    _train(whole, 12)
    first = _stack(schedule=lisa)
    _train(first, 5)
    state = first.slimfit.state_dict()
    assert {"generator", "lisa_period", "lisa_trained_blocks"} <= set(state)
    resumed = _stack(schedule=lisa)
    resumed.slimfit.load_state_dict(state)
    assert resumed.slimfit.frozen == first.slimfit.frozen
    _train(resumed, 7)
    assert resumed.slimfit.schedule.history == whole.slimfit.schedule.history


def test_lisa_by_name_uses_its_defaults():
    cm = _stack(schedule="lisa")
    trained_blocks = {_block_of(n) for n in cm.slimfit.layers if n not in cm.slimfit.frozen} - {None}
    assert len(trained_blocks) == slimfit_fx.LISA().layers


@pytest.mark.parametrize("config, error, match", [
    (dict(schedule="nope"), ValueError, r"\('ils', 'manual', 'lisa'\)"),
    (dict(schedule=object()), TypeError, r"\('ils', 'manual', 'lisa'\).*FreezePolicy"),
    (dict(schedule=slimfit_fx.LISA(), freeze_ratio=0.5), ValueError, "freeze_ratio=0.5 has no effect with LISA"),
    (dict(schedule="lisa", seed=3), ValueError, "seed=3 has no effect with schedule='lisa'"),
    (dict(schedule=slimfit_fx.LISA(), reschedule_every=2), ValueError,
     "reschedule_every=2 .* pass it to the policy object"),
    (dict(schedule="manual", seed=1), ValueError, "seed=1 has no effect with schedule='manual'"),
])
def test_config_errors_name_the_choices(config, error, match):
    with pytest.raises(error, match=match):
        slimfit_fx.SlimFitConfig(**config)


def test_lisa_needs_as_many_blocks_as_it_trains():
    with pytest.raises(ValueError, match=f"trains {BLOCKS + 1} repeated blocks, but this model has {BLOCKS}"):
        _stack(schedule=slimfit_fx.LISA(layers=BLOCKS + 1))


@pytest.mark.parametrize("bad", [dict(layers=0), dict(interval=0), dict(seed=-1)])
def test_bad_lisa_options_name_the_option(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        slimfit_fx.LISA(**bad)
