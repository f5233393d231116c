"""Compiling a region allocates no activation-sized real tensors.

The regions and every layer's weight-gradient graph are traced on dynamo's
fake values, so the compile's memory is the compiler's own, never a batch's
worth of tensors (which on a GPU would land in `max_memory_reserved` before
the first step runs). The allocations are read from torch's profiler, which
records every CPU allocation an operator makes.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import slimfit_fx
from slimfit_fx import engine
from tests import models


def _largest_allocation(fn, *args, **kwargs):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0), out


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_region_compile_allocates_no_activations(backend, monkeypatch):
    case = models.bert(batch=256, seq=128)
    # the attention probabilities alone: batch x heads x seq x seq fp32
    probs_bytes = 256 * case.model.config.num_attention_heads * 128 * 128 * 4

    largest = []
    compile_region = engine.CapturedGraph._compile_region

    def measured(self, *args, **kwargs):
        nbytes, compiled = _largest_allocation(compile_region, self, *args, **kwargs)
        largest.append(nbytes)
        return compiled

    monkeypatch.setattr(engine.CapturedGraph, "_compile_region", measured)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend=backend)
    case.loss(cm(**case.batch)).backward()
    # the control: the same profiler sees the next step's activation-sized allocations
    step_largest, out = _largest_allocation(cm, **case.batch)
    case.loss(out).backward()

    assert largest, "no region was compiled"
    # (its largest is a quarter of the fp32 probabilities or more: compressed or fused ones)
    assert step_largest >= probs_bytes / 4, (step_largest, probs_bytes)
    # weights and small constants only: the whole tiny model is about 0.1 MB
    assert max(largest) < probs_bytes / 100, (max(largest), step_largest)
