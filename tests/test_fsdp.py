"""FSDP2 (`fully_shard`) under slimfit_fx: 2 CPU processes (gloo), each with its own data.

FSDP2 runs its all-gather and reshard hooks under torch._dynamo.disable, so a
sharded submodule would split the one forward graph slimfit_fx needs. The root
module can be sharded: `fully_shard(model)`, then `slimfit_fx.compile(model)`;
parameters are gathered for the whole forward and backward, gradients and
optimizer state stay sharded.
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
from slimfit_fx.memory import eager_frozen
from slimfit_fx.schedule import relative_change

from . import models
from .harness import exit_rank

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
DTensor = pytest.importorskip("torch.distributed.tensor").DTensor

WORLD = 2
STEPS = 3
ILS_STEPS = 3  # the first step's scores already pick a new set for the second
LR = 1e-3
# A manual frozen set: two embeddings and the first layer's query and key.
FROZEN = ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
          "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.key.weight")
# Sharded and single-process runs differ only in float32 summation order (two
# half-batch gradients averaged by reduce_scatter vs one full batch); after 3 Adam
# steps of at most 1e-3 each that moves weights by < 1e-6. A wrong or missing
# gradient, or a frozen layer that moved, is off by ~1e-3.
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int) -> dict[str, torch.Tensor]:
    return models.bert(seed=100 + rank).batch  # each rank sees different data


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered from its shards (a collective: all ranks call it)."""
    return {n: p.detach().full_tensor() for n, p in model.named_parameters()}


def _error(run) -> str:
    try:
        run()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    fully_shard = fsdp.fully_shard
    try:
        record: dict = {"loss": [], "frozen_grads": []}
        data = _batch(rank)

        # Root shard, manual frozen set.
        model = models.bert(seed=0).model
        fully_shard(model)
        # Compression off: its quantized activations would change gradients on purpose.
        cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager", compression="off")
        cm.slimfit.set_frozen(FROZEN)
        optimizer = torch.optim.AdamW(cm.parameters(), lr=LR)
        for _ in range(STEPS):
            loss = cm(**data).loss
            loss.backward()
            record["frozen_grads"].append(sorted(n for n, p in cm.named_parameters()
                                                 if n in FROZEN and p.grad is not None))
            optimizer.step()
            optimizer.zero_grad()
            record["loss"].append(loss.item())
        weights = _full_weights(model)
        record["graphs_captured"] = cm.slimfit.stats["graphs_captured"]

        # Root shard, ILS: each rank sums its shard of every trained layer's score and one
        # all_reduce per step adds them up, so the ranks agree and no weight is gathered.
        model = models.bert(seed=0).model
        fully_shard(model)
        before = _full_weights(model)
        cm = slimfit_fx.compile(model, backend="aot_eager", schedule="ils", freeze_ratio=0.5)
        schedule = cm.slimfit.schedule
        optimizer = torch.optim.AdamW(cm.parameters(), lr=LR)
        record["ils_frozen"], record["ils_score_error"] = [], []
        calls = {"full_tensor": 0, "all_reduce": 0}
        full_tensor, all_reduce = DTensor.full_tensor, dist.all_reduce

        def counted_full_tensor(self, *args, **kwargs):
            calls["full_tensor"] += 1
            return full_tensor(self, *args, **kwargs)

        def counted_all_reduce(*args, **kwargs):
            calls["all_reduce"] += 1
            return all_reduce(*args, **kwargs)

        for _ in range(ILS_STEPS):
            start = _full_weights(model)
            trained = [n for n in cm.slimfit.layers if n not in cm.slimfit.frozen]
            DTensor.full_tensor = counted_full_tensor
            try:
                cm(**data).loss.backward()
                dist.all_reduce = counted_all_reduce  # FSDP2 reduce-scatters gradients in backward
                optimizer.step()
            finally:
                DTensor.full_tensor, dist.all_reduce = full_tensor, all_reduce
            optimizer.zero_grad()
            record["ils_frozen"].append(sorted(cm.slimfit.frozen))
            end = _full_weights(model)
            record["ils_score_error"].append(max(
                abs(schedule.policy.scores[cm.slimfit.layers.index(n)].item() / relative_change(start[n], end[n]).item() - 1)
                for n in trained))
        record.update(ils_gathers=calls["full_tensor"], ils_all_reduces=calls["all_reduce"],
                      ils_host_reads=schedule.host_reads)
        after = _full_weights(model)
        record["ils_moved"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        counts = schedule.trained_counts()
        record["ils_never_trained"] = [n for n, c in zip(cm.slimfit.layers, counts) if c == 0]

        # What cannot work is refused with the fix named.
        def shard_layers_then_compile():
            model = models.bert(seed=0).model
            for layer in model.bert.encoder.layer:
                fully_shard(layer)
            fully_shard(model)
            slimfit_fx.compile(model, schedule="manual", backend="aot_eager")

        def compile_then_shard_layers():
            model = models.bert(seed=0).model
            cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager")
            for layer in model.bert.encoder.layer:
                fully_shard(layer)
            cm(**data)  # the capture fails at the first layer's hook

        def compile_then_shard():
            fully_shard(slimfit_fx.compile(models.bert(seed=0).model, schedule="manual", backend="aot_eager"))

        record["errors"] = {run.__name__: _error(run) for run in (
            shard_layers_then_compile, compile_then_shard_layers, compile_then_shard)}

        if rank == 0:
            torch.save(weights, os.path.join(out_dir, "weights.pt"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return records, torch.load(out / "weights.pt", weights_only=True)


def _single_process_reference() -> dict[str, torch.Tensor]:
    """Eager, frozen parameters requires_grad=False, both ranks' batches as one."""
    model = models.bert(seed=0).model
    batches = [_batch(r) for r in range(WORLD)]
    data = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with eager_frozen(model, frozenset(FROZEN)):
        for _ in range(STEPS):
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


@needs_dist
def test_root_sharded_model_trains_like_single_process_eager(ranks):
    records, weights = ranks
    for r in records:
        assert r["frozen_grads"] == [[]] * STEPS, f"frozen layers got gradients: {r['frozen_grads']}"
    assert records[0]["loss"] != records[1]["loss"]  # different data: reduce_scatter had work to do
    assert records[0]["graphs_captured"] == 1
    reference = _single_process_reference()
    initial = dict(models.bert(seed=0).model.named_parameters())
    assert weights.keys() == reference.keys()
    for name, ref in reference.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=TOLERANCE, msg=name)
        if name in FROZEN:
            assert torch.equal(weights[name], initial[name]), f"{name} is frozen but moved"


@needs_dist
def test_ils_picks_the_same_frozen_set_on_every_rank(ranks):
    records, _ = ranks
    assert records[0]["ils_frozen"] == records[1]["ils_frozen"]
    assert len({tuple(s) for s in records[0]["ils_frozen"]}) > 1  # the set did change
    assert records[0]["ils_moved"] and not set(records[0]["ils_never_trained"]) & set(records[0]["ils_moved"])


@needs_dist
def test_ils_scores_whole_weights_from_local_shards_without_gathering(ranks):
    """Each rank reduces its own shards; one all_reduce and one host read per
    step; no DTensor.full_tensor() gather. The scores are the whole weights'
    relative change (float32 sums of two shards vs one: within 1e-5)."""
    records, _ = ranks
    for r in records:
        assert r["ils_gathers"] == 0
        assert r["ils_all_reduces"] == ILS_STEPS
        assert r["ils_host_reads"] == ILS_STEPS
        assert max(r["ils_score_error"]) < 1e-5, r["ils_score_error"]


@needs_dist
def test_what_cannot_work_is_refused_with_the_fix(ranks):
    records, _ = ranks
    for r in records:
        errors = r["errors"]
        for run in ("shard_layers_then_compile", "compile_then_shard_layers"):
            assert errors[run].startswith("TypeError") and "torch._dynamo.disable" in errors[run], errors[run]
        for message in errors.values():
            assert "fully_shard(model); cm = slimfit_fx.compile(model)" in message, message
