"""ILS under DistributedDataParallel: 2 CPU processes (gloo), each with its own data.

Scores depend only on weights, which DDP keeps identical, so every rank must
pick the same frozen set every step without any extra communication. Each step
accumulates two micro-batches, the first under `no_sync()` (gradients reduced
once, with the second), as DDP users accumulate.
"""
from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slimfit_fx

from . import models
from .harness import exit_rank

WORLD = 2
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, port: int, out_dir: str, body) -> None:
    """One rank: joins the gloo group, runs `body(rank)` (a module-level function,
    so spawn can pickle it) and writes the record it returns as rank<N>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        record = body(rank)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(json.dumps(record))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()


def _run_ranks(tmp_path, body) -> list[dict]:
    mp.spawn(_spawned, args=(_free_port(), str(tmp_path), body), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _ils_under_ddp(rank: int) -> dict:
    case = models.bert(seed=0)
    data = models.bert(seed=100 + rank).batch  # each rank sees different data
    first = models.bert(seed=200 + rank, batch=3, seq=9).batch  # another shape too
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="ils",
                            freeze_ratio=0.8)
    # The one line DDP needs: frozen layers get no gradient in a step.
    ddp = torch.nn.parallel.DistributedDataParallel(cm, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    record = {"frozen": [], "loss": []}
    for _ in range(STEPS):
        with ddp.no_sync():
            ddp(**first).loss.backward()
        loss = ddp(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record["frozen"].append(sorted(cm.slimfit.frozen))
        record["loss"].append(loss.item())
    record["weights"] = float(sum(p.double().sum() for p in cm.parameters()))
    return record


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_every_rank_holds_the_same_frozen_set_every_step(tmp_path):
    ranks = _run_ranks(tmp_path, _ils_under_ddp)
    assert ranks[0]["frozen"] == ranks[1]["frozen"]
    assert len({tuple(s) for s in ranks[0]["frozen"]}) > 1  # the set did change
    assert ranks[0]["loss"] != ranks[1]["loss"]  # different data, so DDP had work to do
    assert ranks[0]["weights"] == ranks[1]["weights"]


def _budget_under_ddp(rank: int) -> dict:
    case = models.bert(seed=0)
    data = models.bert(seed=100 + rank).batch
    cm = slimfit_fx.compile(case.model, backend="aot_eager", memory_budget="4GiB")
    ddp = torch.nn.parallel.DistributedDataParallel(cm, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    # rank 1 holds 64 MiB more than rank 0 from here on: its residue differs
    held = torch.ones(16 * 2**20) if rank == 1 else None
    record = {"frozen": []}
    for _ in range(4):
        ddp(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record["frozen"].append(sorted(cm.slimfit.frozen))
    fit = cm.slimfit.fit
    return dict(record, terms=repr(fit.terms_used), prediction=repr(fit.prediction), residue=fit.residue,
                held=0 if held is None else held.numel())


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_a_memory_budget_chooses_the_same_on_every_rank(tmp_path):
    """Each rank measures its own residue; the budget's terms are agreed (the
    largest of each) before choosing, so every rank follows the same cap."""
    ranks = _run_ranks(tmp_path, _budget_under_ddp)
    assert ranks[1]["residue"] - ranks[0]["residue"] > 32 * 2**20  # what each measured differed
    assert ranks[0]["terms"] == ranks[1]["terms"]
    assert ranks[0]["prediction"] == ranks[1]["prediction"]
    assert ranks[0]["frozen"] == ranks[1]["frozen"]
