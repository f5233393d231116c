"""Compiled slimfit training steps match eager PyTorch, for every model x frozen set x backend."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfit_fx
from slimfit_fx import capture

from .harness import assert_matches_eager
from .models import FACTORIES

MODELS = sorted(FACTORIES)


def frozen_sets(layers: tuple[str, ...]) -> dict[str, frozenset[str]]:
    rng = random.Random(0)
    half = rng.sample(layers, len(layers) // 2)
    other = [name for name in layers if name not in half][: max(1, len(layers) // 3)]
    return {
        "none": frozenset(),
        "all": frozenset(layers),
        "random": frozenset(half),
        "other": frozenset(other),
    }


@pytest.mark.parametrize("model_name", MODELS)
def test_every_frozen_set_matches_eager_aot_eager(model_name):
    case = FACTORIES[model_name]()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", compression="off")
    sets = frozen_sets(cm.slimfit.layers)
    for name in ("none", "all", "random"):
        assert_matches_eager(cm, case, sets[name])
    assert cm.slimfit.stats["variants_compiled"] == 3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("model_name", MODELS)
def test_switch_a_b_a_without_dynamo_recompile(model_name, backend):
    """A -> B -> A: each step runs its own set's variant; going back to A is a cache hit."""
    case = FACTORIES[model_name]()
    cm = slimfit_fx.compile(case.model, backend=backend, compression="off")
    sets = frozen_sets(cm.slimfit.layers)
    a, b = sets["random"], sets["other"]
    assert_matches_eager(cm, case, a)
    frames = capture.dynamo_compiled_frames()
    assert_matches_eager(cm, case, b)
    assert_matches_eager(cm, case, a)
    assert capture.dynamo_compiled_frames() == frames, "a frozen-set switch recompiled in dynamo"
    stats = cm.slimfit.stats
    assert stats["graphs_captured"] == 1
    assert stats["variants_compiled"] == 2
    assert stats["cache_hits"] >= 1


@pytest.mark.parametrize("model_name", ["bert", "mlp"])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_switch_sequences_match_eager(model_name, data):
    case = FACTORIES[model_name]()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", max_variants=3, compression="off")
    layers = cm.slimfit.layers
    pool = data.draw(st.lists(st.sets(st.sampled_from(layers)), min_size=1, max_size=3), label="sets")
    order = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=2, max_size=5), label="order")
    frames = None
    for index in order:
        assert_matches_eager(cm, case, pool[index])
        if frames is None:
            frames = capture.dynamo_compiled_frames()
    assert capture.dynamo_compiled_frames() == frames
    assert cm.slimfit.stats["variants_live"] <= 3
