"""`compile(model, blocks=...)`: naming the repeated blocks the finder cannot see,
and the warning when it falls back to one whole-model region."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimfit_fx
from tests.harness import assert_matches_eager, step
from tests.models import Case, PreNormBlock


class NamedBlocks(nn.Module):
    """Two identical blocks held as plain attributes, not in a ModuleList: the
    finder sees no repeated block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 32)
        self.first, self.second = PreNormBlock(), PreNormBlock()
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(self.stem(x))))


def case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(4, 6, 12, generator=g), torch.randint(0, 5, (4,), generator=g)
    return Case(NamedBlocks().train(), {"x": x},
                lambda out: nn.functional.cross_entropy(out.mean(dim=1), target))


def test_no_repeated_block_warns_and_names_the_fix():
    with pytest.warns(UserWarning, match=r"found no repeated blocks in NamedBlocks.*blocks=") as record:
        slimfit_fx.compile(NamedBlocks(), backend="aot_eager")
    assert record[0].filename == __file__  # points at the user's compile call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimfit_fx.compile(NamedBlocks(), backend="aot_eager", blocks=())  # one region, on purpose


@pytest.mark.parametrize("blocks", [("first", "second"), ("f*", "sec?nd"), (PreNormBlock,)],
                         ids=["names", "patterns", "class"])
def test_named_blocks_share_one_compiled_region_and_match_eager(blocks):
    c = case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = slimfit_fx.compile(c.model, schedule="manual", backend="aot_eager", compression="off",
                                blocks=blocks)
    for frozen in ({"first.fc.weight"}, set(), {"second.norm.weight", "head.weight"}):
        assert_matches_eager(cm, c, frozen)
    shared = [r for r in cm.slimfit.compiled_regions().values() if r.instances == 2]
    assert len(shared) == 1 and shared[0].name == "first"


def test_one_region_without_blocks_compiles_no_shared_code():
    c = case()
    cm = slimfit_fx.compile(c.model, schedule="manual", backend="aot_eager", compression="off", blocks=())
    step(cm, c)
    assert [r.instances for r in cm.slimfit.compiled_regions().values()] == [1]


@pytest.mark.parametrize("blocks, error, match", [
    (("third",), ValueError, r"names no submodule of NamedBlocks.*Fix"),
    (("first", "first.fc"), ValueError, "nested"),
    (("*", "first.*"), ValueError, "nested"),
    ("first", TypeError, "tuple of module names"),
    ((3,), TypeError, "tuple of module names"),
])
def test_bad_blocks_name_the_problem(blocks, error, match):
    with pytest.raises(error, match=match):
        slimfit_fx.compile(NamedBlocks(), backend="aot_eager", blocks=blocks)
