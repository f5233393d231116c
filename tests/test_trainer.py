"""ILS inside HF Trainer (accelerate's optimizer wrapper), with no callback added."""
from __future__ import annotations

import pytest
import torch

import slimfit_fx

from . import models

transformers = pytest.importorskip("transformers")


def test_hf_trainer_drives_the_schedule(tmp_path):
    case = models.bert(batch=8)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="ils", freeze_ratio=0.8,
                            new_set_every=1)
    rows = [{k: v[i] for k, v in case.batch.items()} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    before = {n: p.detach().clone() for n, p in cm.named_parameters()}
    result = transformers.Trainer(model=cm, args=args, train_dataset=rows).train()
    schedule = cm.slimfit.schedule
    assert result.global_step == 4
    assert schedule.step == 4  # optimizer steps, not the 8 micro-batches
    assert len(set(schedule.history)) > 1
    assert cm.slimfit.stats["graphs_captured"] == 1
    moved = [n for n, p in cm.named_parameters() if not torch.equal(p, before[n])]
    never_trained = [n for n, c in zip(cm.slimfit.layers, schedule.trained_counts()) if c == 0]
    assert moved and not set(never_trained) & set(moved)
