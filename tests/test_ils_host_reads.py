"""ILS reads device values on the host once per optimizer step, whatever the layer count.

Every trained layer's score is reduced where its weight lives; one step's
scores are stacked and read in one transfer (`Schedule._to_host`,
counted in `host_reads`). On CPU a copy to the host is invisible, so the test
watches every call the schedule makes that turns a tensor into host values
(`.tolist()`, `.item()`, `.cpu()`, `.to("cpu")`, `.numpy()`, `bool()`,
`float()`, `int()`, `torch.equal`, `.nonzero()`) and asserts they come only
from `_to_host`, once per step, and from `_choose`, which sorts the scores the
schedule keeps on the host.
"""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

import slimfit_fx
from slimfit_fx import schedule as schedule_module

from . import models

HOST_READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.equal, torch.Tensor.equal, torch.Tensor.nonzero, torch.nonzero,
}


def _to_cpu(func, args, kwargs) -> bool:
    if func is not torch.Tensor.to:
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class HostReads(TorchFunctionMode):
    """Counts host reads by the schedule function that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS or _to_cpu(func, args, kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != schedule_module.__file__:
                frame = frame.f_back
            self.calls[frame.f_code.co_name if frame else "<outside the schedule>"] += 1
        return func(*args, **kwargs)


def _watched(schedule) -> HostReads:
    """Run the schedule's entry points under one HostReads mode."""
    reads = HostReads()
    for name in ("before_step", "after_step", "note_training_forward", "manual_step"):
        method = getattr(schedule, name)

        def run(*args, _method=method, **kwargs):
            with reads:
                return _method(*args, **kwargs)

        setattr(schedule, name, run)
    return reads


def _sgd_by_hand(cm, lr=0.1):
    with torch.no_grad():
        for p in cm.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


@pytest.mark.parametrize("loop", ["optimizer", "hand-written"])
def test_one_host_read_per_step(loop):
    case = models.bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="ils", freeze_ratio=0.5)
    schedule = cm.slimfit.schedule
    reads = _watched(schedule)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    assert len(cm.slimfit.layers) - schedule.num_frozen >= 10  # many layers scored each step
    for step in range(1, 5):
        case.loss(cm(**case.batch)).backward()
        if loop == "optimizer":
            optimizer.step()
            optimizer.zero_grad()
        else:
            _sgd_by_hand(cm)
            cm.slimfit.step()
        assert schedule.step == step
        assert schedule.host_reads == step
        assert reads.calls["_to_host"] == step
        assert set(reads.calls) <= {"_to_host", "_ask"}, reads.calls  # _ask: the policy sorts its host-held scores
    assert schedule.policy.scores.device.type == "cpu"  # what _choose sorts


def test_a_hand_written_loop_with_micro_batches_reads_once_more_per_extra_forward():
    """Without an optimizer, each forward after an update's first checks that no
    update happened without cm.slimfit.step(): one read for all layers."""
    case = models.bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="ils", freeze_ratio=0.5)
    schedule = cm.slimfit.schedule
    reads = _watched(schedule)
    for _ in range(2):
        for _ in range(3):
            case.loss(cm(**case.batch)).backward()
        _sgd_by_hand(cm)
        cm.slimfit.step()
    assert schedule.step == 2
    assert schedule.host_reads == reads.calls["_to_host"] == 2 * (1 + 2)
    assert set(reads.calls) <= {"_to_host", "_ask"}, reads.calls  # _ask: the policy sorts its host-held scores
