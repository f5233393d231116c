"""HF Trainer and accelerate with the compiled module as it is: ILS driven through
accelerate's optimizer wrapper with no callback added, checkpoints that are the
plain HF model, resuming, and `Accelerator.prepare`."""
from __future__ import annotations

import json

import pytest
import torch

import slimfit_fx

from . import models

transformers = pytest.importorskip("transformers")

# A manual frozen set: one embedding, one attention and one MLP weight.
FROZEN = ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
          "bert.encoder.layer.1.intermediate.dense.weight")


def test_hf_trainer_drives_the_schedule(tmp_path):
    case = models.bert(batch=8)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="ils", freeze_ratio=0.8)
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


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]


def _manual_run(out_dir, resume_from=None):
    """4 Trainer steps of BERT with a fixed frozen set, a checkpoint every 2."""
    case = models.bert(batch=8)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    cm.slimfit.set_frozen(FROZEN)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=cm, args=args, train_dataset=_rows(case.batch))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, case.model


def test_trainer_checkpoints_are_the_plain_model_and_resume(tmp_path):
    from safetensors import safe_open

    trainer, model = _manual_run(tmp_path / "run")
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}
    initial = models.bert(batch=8).model.state_dict()
    assert all(torch.equal(trained[n], initial[n]) for n in FROZEN)
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])

    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(trained)  # the model's own names, no wrapper prefix
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
        loaded = transformers.BertForSequenceClassification.from_pretrained(str(folder))
        assert type(loaded) is transformers.BertForSequenceClassification
        for name, weight in loaded.state_dict().items():
            assert torch.equal(weight, trained[name]), name

    # Weights, optimizer, scheduler and RNG come back; the frozen set is the
    # caller's (set again before training, as for the first run).
    _, resumed = _manual_run(tmp_path / "resumed", resume_from=str(tmp_path / "run" / "checkpoint-2"))
    for name, weight in resumed.state_dict().items():
        assert torch.equal(weight, trained[name]), name  # same steps, same kernels: bit-equal


def test_accelerate_prepares_the_compiled_model(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors import safe_open

    case = models.bert(batch=8)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    cm.slimfit.set_frozen(FROZEN)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(_rows(case.batch), batch_size=2)
    accelerator = accelerate.Accelerator(cpu=True)
    before = {n: p.detach().clone() for n, p in cm.named_parameters()}
    model, optimizer, loader = accelerator.prepare(cm, optimizer, loader)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in cm.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not moved & set(FROZEN)
    assert cm.slimfit.stats["graphs_captured"] == 1

    accelerator.save_model(model, str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(before)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_trainer_with_per_batch_padding_and_the_bundled_tokenizer(tmp_path, backend):
    """HF Trainer given a tokenizer pads each batch to its own longest row
    (DataCollatorWithPadding): every batch a new length, trained under compile(model)'s
    defaults (inductor is the default backend; aot_eager runs the same engine faster)."""
    from slimfit_fx.data import BUNDLED_MODEL, load_tokenizer, resolve_data_dir, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(BUNDLED_MODEL))
    root = resolve_data_dir(None)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    texts = [(p.read_text(encoding="utf-8", errors="replace"), label)
             for label, name in enumerate(classes) for p in sorted((root / name).glob("*.txt"))[:8]]
    # articles cut to different word counts, so batches differ in length
    rows = [dict(tokenizer(" ".join(text.split()[: 6 + 7 * (i % 9)]), truncation=True, max_length=96),
                 labels=label) for i, (text, label) in enumerate(texts)]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, num_labels=len(classes),
                                     problem_type="single_label_classification")
    cm = slimfit_fx.compile(transformers.BertForSequenceClassification(config),
                            **({} if backend == "inductor" else {"backend": backend}))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    lengths = {len(collator(rows[i:i + 4])["input_ids"][0]) for i in range(0, len(rows), 4)}
    assert len(lengths) >= 4, lengths  # the batches really differ
    trainer = transformers.Trainer(model=cm, args=args, train_dataset=rows, data_collator=collator)
    result = trainer.train()
    assert result.global_step == 12
    assert torch.isfinite(torch.tensor(result.training_loss))
    stats = cm.slimfit.stats
    assert stats["graphs_captured"] <= 3, stats  # static, then sizes dynamic (a size of 1 once more)
    assert cm.slimfit.schedule.distinct_sets() > 1
