"""Activation checkpointing composes with slimfit: HF's gradient_checkpointing_enable()
and torch.utils.checkpoint (reentrant or not) give eager's gradients, and the
checkpointed blocks' activations are recomputed, so less is held than without."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import slimfit_fx
from slimfit_fx import SlimFitError

from .harness import assert_matches_eager
from .models import Case, bert

FROZEN_EVERY_OTHER = slice(None, None, 2)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}],
                         ids=["hf-default", "non-reentrant", "reentrant"])
def test_hf_gradient_checkpointing_matches_eager(kwargs):
    case = bert(batch=3, seq=16)
    case.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off")
    layers = cm.slimfit.layers
    for frozen in (layers[FROZEN_EVERY_OTHER], (), layers[1::3]):
        assert_matches_eager(cm, case, frozen)
    assert cm.slimfit.stats["graphs_captured"] == 1


class CheckpointedMLP(nn.Module):
    """Blocks run under torch.utils.checkpoint, as a hand-written model would."""

    def __init__(self, reentrant: bool, context_fn=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16)) for _ in range(3))
        self.head = nn.Linear(16, 4)
        self.reentrant, self.context_fn = reentrant, context_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            extra = {} if self.context_fn is None else {"context_fn": self.context_fn}
            x = x + checkpoint(block, x, use_reentrant=self.reentrant, **extra)
        return self.head(x)


def _mlp_case(reentrant: bool, context_fn=None) -> Case:
    torch.manual_seed(0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), requires_grad=reentrant)
    target = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
    return Case(CheckpointedMLP(reentrant, context_fn).train(), {"x": x},
                lambda out: nn.functional.cross_entropy(out, target))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_matches_eager(reentrant, backend):
    case = _mlp_case(reentrant)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend=backend, compression="off")
    assert_matches_eager(cm, case, cm.slimfit.layers[FROZEN_EVERY_OTHER])
    assert_matches_eager(cm, case, cm.slimfit.layers[1::2])


@pytest.mark.parametrize("compression", ["off", "paper"])
def test_checkpointing_holds_less_than_slimfit_alone(compression):
    """The same frozen set, with and without HF checkpointing: checkpointed blocks
    keep their inputs only (and the inputs of the layers that train)."""
    saved = {}
    for enabled in (False, True):
        case = bert(batch=4, seq=32)
        if enabled:
            case.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression=compression)
        cm.slimfit.set_frozen(cm.slimfit.layers[FROZEN_EVERY_OTHER])
        cm(**case.batch).loss.backward()
        saved[enabled] = cm.slimfit.saved_bytes
    assert saved[True] < 0.8 * saved[False], saved


def test_selective_checkpointing_is_refused_naming_what_works():
    policy = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    case = _mlp_case(False, context_fn=policy)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    with pytest.raises(SlimFitError, match=r"selective activation checkpointing .*context_fn.* "
                                           r"gradient_checkpointing_enable\(\)"):
        cm(**case.batch)
