"""Run one step compiled and one eager, and compare them under one stated tolerance.

The reference is eager PyTorch on the same module with the frozen parameters
set to requires_grad=False, which is what freezing means.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import slimfit_fx
from slimfit_fx.memory import eager_frozen

from .models import Case

# One tolerance for every comparison. aot_eager runs the same aten kernels as
# eager; inductor fuses and reorders float sums, which moves results by ~1e-6
# relative on these tiny models. 1e-4 leaves headroom for that and still fails
# on any real error (a missing or wrong gradient term is O(1) relative).
TOLERANCE = 1e-4


def cases(*axes, slow=()) -> list:
    """The cross product of `axes` as pytest parameters, with the ids stacked
    parametrize decorators give them; the combinations in `slow` run under
    `pytest -m slow` only (each is an inductor compile of tens of seconds on 2 CPU
    cores, and an inductor case of the same test stays in the default run)."""
    slow = {tuple(combo) for combo in slow}
    return [pytest.param(*combo, id="-".join(map(str, combo)), marks=[pytest.mark.slow] if combo in slow else [])
            for combo in itertools.product(*axes)]


def main_output(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def step(module: nn.Module, case: Case, autocast: torch.dtype | None = None):
    """Forward + backward once; returns the loss, the output and every parameter's grad.
    `autocast`: run the forward under CPU autocast to that dtype (backward outside
    it, as torch.amp recommends)."""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        output = module(**case.batch)
        loss = case.loss(output)
    loss.backward()
    grads = {name: (None if p.grad is None else p.grad.detach().clone())
             for name, p in module.named_parameters()}
    return loss.detach(), main_output(output).detach(), grads


def eager_step(model: nn.Module, case: Case, frozen: frozenset[str],
               autocast: torch.dtype | None = None):
    """Reference: plain eager with frozen parameters requires_grad=False."""
    with eager_frozen(model, frozen):
        return step(model, case, autocast)


def assert_matches_eager(cm: slimfit_fx.SlimFitModule, case: Case, frozen) -> None:
    """Set `frozen` on `cm`, step it, and compare loss and gradients with eager."""
    frozen = frozenset(frozen)
    cm.slimfit.set_frozen(frozen)
    loss, output, grads = step(cm, case)
    ref_loss, ref_output, ref_grads = eager_step(case.model, case, frozen)

    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(output, ref_output, rtol=TOLERANCE, atol=TOLERANCE)
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values() if g is not None))
    for name, ref in ref_grads.items():
        got = grads[name]
        if ref is None:
            assert got is None, f"{name} is frozen but got a gradient"
            continue
        assert got is not None, f"{name} trains but got no gradient"
        err = (got.double() - ref.double()).norm() / max(ref_norm.item(), 1e-12)
        assert err <= TOLERANCE, f"{name}: gradient error {err:.2e} of the model's grad norm"


def packed_count(counters, *kinds: str) -> int:
    """How many saved tensors compress_saved packed as any of `kinds`."""
    return sum(counters.get(f"compressed_{kind}", 0) for kind in kinds)


def exit_rank() -> None:
    """End a spawned process-group rank that finished its work (its results on disk).

    Skips the gloo process group's destructor: torch joins the group's worker
    threads from it while holding the GIL, and a worker releasing its last work's
    Python state waits for the GIL, a teardown deadlock (the class of
    pytorch/pytorch#56297) that hung a CI run here once. mp.spawn only checks the
    exit code. Ranks that fail call dist.destroy_process_group() and raise.
    """
    dist.barrier()  # no rank leaves while another still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
