"""The main job: fine-tune a text classifier with slimfit (and, if asked, without it).

`run(settings)` loads the model and data, trains with a progress bar, evaluates,
and writes the run directory (config, metrics, report, plots). Only the public
API (and `find_layers`, what a layer is) is used; this module must not reach
into the compiler.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimfit_fx

from .config import COMPRESSION_PRESETS, DEFAULT_COMPRESSION, FIXED_POINT_FIELDS, KIND_FIELDS
from .data import (TextClassificationData, digits_vit, load_classifier_and_new, load_digits, load_text_folders,
                   load_tokenizer, resolve_data_dir, resolve_model_dir)
from .layers import find_layers
from .memory import eager_saved_bytes


LR_SCHEDULES = ("linear", "constant")
# "text": --model on --data-dir (default: MiniLM on BBC News); "digits": scikit-learn's
# digits with a small ViT from random init (data.digits_vit), no checkpoint.
TASKS = ("text", "digits")
# "slimfit": slimfit_fx.compile; "eager": the same model, every layer trains;
# "lora": peft LoRA on the attention linears (LORA), the fresh head trains whole.
METHODS = ("slimfit", "eager", "lora")
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1,
            target_modules=["query", "key", "value", "attention.output.dense",  # BERT
                            "q_proj", "k_proj", "v_proj", "o_proj"])  # ViT (transformers 5)
# The presets, and each compressed kind alone ("only-<field>": that field at its
# paper value, or the default's where the paper has none, such as the default's
# float8 norms; every other kind kept whole) to find which kind costs accuracy;
# "only-<field>-row" is the same with a per-row scale (scale="row") for a field
# whose format is the paper's fixed point, to tell its format's cost from its width's.
_OFF = COMPRESSION_PRESETS["off"]
_DEFAULT = COMPRESSION_PRESETS[DEFAULT_COMPRESSION]
_ALONE = {field: dataclasses.replace(_OFF, **{field: value})
          for field, paper in KIND_FIELDS.items()
          if (value := paper if paper not in (None, False) else getattr(_DEFAULT, field)) not in (None, False)}
COMPRESSIONS = {**COMPRESSION_PRESETS,
                **{f"only-{field}": config for field, config in _ALONE.items()},
                **{f"only-{field}-row": dataclasses.replace(config, scale="row")
                   for field, config in _ALONE.items() if field in FIXED_POINT_FIELDS}}
# FinetuneSettings mirrors `slimfit-fx finetune`'s flags; errors name the flag.
FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "max_length": "--seq-len", "lr": "--lr",
         "eager_lr": "--eager-lr", "lr_schedule": "--lr-schedule", "schedule": "--schedule",
         "limit": "--limit", "freeze_ratio": "--freeze-ratio", "compression": "--compression",
         "backend": "--backend", "seed": "--seed", "optimizer_state": "--optimizer-state",
         "memory_budget": "--memory-budget", "task": "--task", "method": "--method"}


class SettingsError(ValueError):
    """A setting, the model or the data does not fit the job; the message names the flag."""


def _flags(message: str) -> str:
    for field, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w.-])(SlimFitConfig\.)?{field}(?= must| is|=| \(| >=)", flag, message)
    return message


@dataclass(frozen=True)
class FinetuneSettings:
    task: str = "text"
    method: str = "slimfit"
    model: str = "all-minilm-l6-v2"
    data_dir: str | None = None  # None: the bundled BBC News
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 128
    lr: float = 1e-4
    # --compare-eager's learning rate; None: `lr`. Freezing 90% of the layers trains
    # each for ~a tenth of the steps, and the paper's scripts give it a higher rate.
    eager_lr: float | None = None
    # "constant", or "linear": decay to 0 over the run (the paper's, over 3 epochs;
    # over the default single epoch it cost 8 points on BBC News, see README)
    lr_schedule: str = "constant"
    freeze_ratio: float = 0.9  # slimfit_fx.compile's default
    # "ils"; "lisa": LISA layer sampling (2 blocks train, redrawn every 20 steps);
    # or "fixed": one seeded draw for the whole run
    schedule: str = "ils"
    # "ils" never freezes the layers the checkpoint did not hold (the fresh head):
    # SlimFitConfig.always_train. False scores them like any layer, as the paper does.
    train_new_layers: bool = True
    compression: str = DEFAULT_COMPRESSION
    optimizer_state: str = "int8"  # SlimFitConfig.optimizer_state
    # SlimFitConfig.memory_budget ("2GiB"): "ils" then picks the freeze ratio (and,
    # where needed, the optimizer-state packing) that fits, instead of freeze_ratio
    memory_budget: str | int | None = None
    backend: str = "inductor"
    limit: int | None = None
    seed: int = 0
    out: str | None = None
    compare_eager: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def slimfit_config(self, new_layers: tuple[str, ...] = ()) -> slimfit_fx.SlimFitConfig:
        """The compile config; raises ValueError/TypeError naming a bad field.
        `new_layers` (layers the checkpoint did not hold) always train under "ils"
        if `train_new_layers`."""
        # "fixed" draws its set from freeze_ratio itself (seeded_frozen_set) and sets it
        # by hand, so the compile takes no ratio
        policies = {
            "ils": dict(schedule="ils", seed=self.seed,
                        always_train=new_layers if self.train_new_layers else (),
                        **(dict(memory_budget=self.memory_budget) if self.memory_budget is not None
                           else dict(freeze_ratio=self.freeze_ratio))),
            "lisa": dict(schedule=slimfit_fx.LISA(seed=self.seed)),
            "fixed": dict(schedule="manual"),
        }
        if self.memory_budget is not None and self.schedule != "ils":
            raise ValueError(f"memory_budget={self.memory_budget!r} chooses the freeze ratio, which only "
                             f"schedule 'ils' takes (got {self.schedule!r}); use --schedule ils")
        compression = COMPRESSIONS.get(self.compression, self.compression)  # unknown: the config says so
        return slimfit_fx.SlimFitConfig(backend=self.backend, compression=compression,
                                        optimizer_state=self.optimizer_state, **policies[self.schedule])

    def check(self) -> None:
        """Every setting the job can validate without loading anything; raises
        SettingsError naming the flag."""
        try:
            self._check()
        except (TypeError, ValueError) as err:
            raise SettingsError(_flags(str(err))) from err

    def _check(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"limit must be an integer >= 1, got {self.limit!r}")
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (("lr", self.lr), ("eager_lr", self.lr if self.eager_lr is None else self.eager_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.compare_eager and self.method != "slimfit":
            raise ValueError(f"--compare-eager compares slimfit with eager; it needs method='slimfit', "
                             f"got method={self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self.slimfit_config()


SCHEDULES = ("ils", "lisa", "fixed")


def seeded_frozen_set(layers: tuple[str, ...], ratio: float, seed: int) -> list[str]:
    """A fixed draw of int(ratio * len(layers)) layers; the last layer (the head) trains."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"freeze_ratio must be in [0, 1], got {ratio}")
    return random.Random(seed).sample(layers[:-1], min(int(ratio * len(layers)), len(layers) - 1))


def batches(split: dict[str, torch.Tensor], size: int, generator: torch.Generator | None):
    """Shuffled full batches for training: one graph shape, the remainder dropped."""
    count = len(split["labels"])
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count - size + 1, size):
        index = order[start:start + size]
        yield {k: v[index] for k, v in split.items()}


def evaluation_batches(split: dict[str, torch.Tensor], size: int):
    """Every example once, in order, as (batch, real rows): the last batch is padded
    with copies of its first row so evaluation keeps the training graph's shape."""
    count = len(split["labels"])
    for start in range(0, count, size):
        index = torch.arange(start, min(start + size, count))
        real = len(index)
        index = torch.cat([index, index[:1].expand(size - real)])
        yield {k: v[index] for k, v in split.items()}, real


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


def train(module: nn.Module, data: TextClassificationData, settings: FinetuneSettings,
          desc: str, frozen_share=lambda: 0.0, lr: float | None = None) -> dict[str, Any]:
    """Train `module` (slimfit-compiled or plain) with AdamW at `lr` (default
    settings.lr) and evaluate it; returns the metrics."""
    lr = settings.lr if lr is None else lr
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(settings.seed)
    per_epoch = len(data.train["labels"]) // settings.batch_size
    total = per_epoch * settings.epochs
    end_factor = 0.0 if settings.lr_schedule == "linear" else 1.0
    lr_decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, end_factor, total_iters=total)
    step_seconds: list[float] = []
    last_lr = lr
    bar = _progress(total, desc, settings.progress)
    module.train()
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        for batch in batches(data.train, settings.batch_size, generator):
            t0 = time.perf_counter()
            share = frozen_share()  # the set this step runs with, before the optimizer moves it
            loss = module(**batch).loss
            loss.backward()
            last_lr = opt.param_groups[0]["lr"]
            opt.step()
            lr_decay.step()
            opt.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", frozen=f"{share:.0%}", refresh=False)
            if bar.disable and len(step_seconds) % 20 == 0:
                print(f"{desc}: epoch {epoch} step {len(step_seconds)} loss {loss.item():.4f} "
                      f"frozen {share:.0%}", flush=True)
    bar.close()
    train_seconds = time.perf_counter() - start
    sample = next(batches(data.train, settings.batch_size, None))
    module.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch, real in evaluation_batches(data.test, settings.batch_size):
            logits = module(**batch).logits[:real]
            labels = batch["labels"][:real]
            correct += (logits.argmax(-1) == labels).sum().item()
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            total += real
    return {
        "accuracy": correct / max(total, 1),
        # mean cross-entropy over the test set: a finer measure than accuracy,
        # whose step is one test example
        "test_loss": loss_sum / max(total, 1),
        "test_articles": total,
        "steps": len(step_seconds),
        "train_seconds": train_seconds,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else 0.0,
        "lr": lr,
        "last_step_lr": last_lr,
        "optimizer": opt,
        "sample": sample,
    }


def load_task(settings: FinetuneSettings):
    """The task's data and a factory `build() -> (model, names of the parameters
    the checkpoint did not hold)`, seeded by settings.seed (the fresh head's init
    is the same on every call); raises SettingsError naming the flag."""
    if settings.task == "digits":
        head = ("classifier.weight", "classifier.bias")  # the rest is random init too: no checkpoint
        try:
            data = load_digits(seed=settings.seed, limit=settings.limit)
        except (ValueError, ImportError) as err:
            raise SettingsError(_flags(str(err))) from err
        return data, lambda: (digits_vit(settings.seed), frozenset(head))
    try:
        model_dir = resolve_model_dir(settings.model)
        data_dir = resolve_data_dir(settings.data_dir)
        data = load_text_folders(load_tokenizer(model_dir), data_dir, max_length=settings.max_length,
                                 seed=settings.seed, limit=settings.limit)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SettingsError(_flags(str(err))) from err
    return data, lambda: _with_head(model_dir, settings.seed, len(data.classes))


def with_lora(model: nn.Module, new_parameters: frozenset[str]) -> nn.Module:
    """peft LoRA (`LORA`) on `model`'s attention linears; the modules holding
    `new_parameters` (the fresh head) train whole (`modules_to_save`)."""
    try:
        import peft
    except ImportError as err:
        raise SettingsError("--method lora needs peft; install it with `pip install -e '.[peft]'`") from err
    heads = sorted({name.rsplit(".", 1)[0] for name in new_parameters})
    return peft.get_peft_model(model, peft.LoraConfig(**LORA, modules_to_save=heads))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(settings: FinetuneSettings) -> dict[str, Any]:
    """Fine-tune with `settings.method` (and eager too if `compare_eager`), print and
    write the results."""
    settings.check()
    data, build = load_task(settings)
    model, new_parameters = build()
    new_layers = tuple(n for n in find_layers(model) if n in new_parameters)
    positions = getattr(model.config, "max_position_embeddings", None)
    if settings.task == "text" and positions is not None and settings.max_length > positions:
        raise SettingsError(f"--seq-len {settings.max_length} is longer than {settings.model}'s "
                            f"{positions} positions (max_position_embeddings); use --seq-len <= {positions}")
    if len(data.train["labels"]) < settings.batch_size:
        raise SettingsError(f"only {len(data.train['labels'])} training articles, fewer than one batch "
                            f"of {settings.batch_size}; lower --batch-size or raise --limit")
    out = Path(settings.out) if settings.out else None
    name = settings.model if settings.task == "text" else "ViT from random init (digits)"
    if settings.method != "slimfit":
        if settings.method == "lora":
            model = with_lora(model, new_parameters)
        print(f"model: {name}, method: {settings.method}, classes: {len(data.classes)}, train "
              f"examples: {len(data.train['labels'])}, test examples: {len(data.test['labels'])}", flush=True)
        metrics = _train_plain(model, data, settings, settings.method)
        results: dict[str, Any] = {settings.method: metrics}
        print(json.dumps(results, indent=2))
        print(f"test accuracy: {metrics['accuracy']:.2%} ({settings.method}), "
              f"{metrics['test_articles']} test examples", flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(
                {"settings": asdict(settings), "torch": torch.__version__}, indent=2))
            (out / "metrics.json").write_text(json.dumps(results, indent=2))
            print(f"wrote {out}/: config.json, metrics.json")
        return results
    cm = slimfit_fx.compile(model, settings.slimfit_config(new_layers))
    if settings.schedule == "fixed":
        cm.slimfit.set_frozen(seeded_frozen_set(cm.slimfit.layers, settings.freeze_ratio, settings.seed))
    layers = cm.slimfit.layers
    ratio = ("" if settings.schedule == "lisa" else
             f" (ratio chosen at the first step to fit --memory-budget {settings.memory_budget})"
             if settings.memory_budget is not None else f" (ratio {settings.freeze_ratio})")
    print(f"model: {name}, layers: {len(layers)}, schedule: {settings.schedule}{ratio}, "
          f"compression: {settings.compression}, classes: "
          f"{len(data.classes)}, train articles: {len(data.train['labels'])}, test articles: "
          f"{len(data.test['labels'])}", flush=True)
    if cm.slimfit.config.always_train:
        print(f"always trains (not in the checkpoint): {', '.join(cm.slimfit.config.always_train)}")
    print(f"compiling with {settings.backend} during the first step (once; every later frozen set "
          "reuses it) ...", flush=True)
    metrics = train(cm, data, settings, "slimfit", lambda: len(cm.slimfit.frozen) / len(layers))
    metrics["peak_rss_bytes"] = _peak_rss_bytes()  # before the report and eager add their own
    stats = cm.slimfit.stats
    print(f"compiled in {stats['compile_seconds']:.1f} s", flush=True)
    opt, sample = metrics.pop("optimizer"), metrics.pop("sample")
    schedule = cm.slimfit.schedule
    metrics.update({
        "compile_seconds": stats["compile_seconds"],
        "compile_share": stats["compile_share"],  # the report's figure, from the same numbers
        "regions_compiled": stats["regions_compiled"],
        "dynamo_graphs": stats["graphs_captured"],
        "saved_bytes": cm.slimfit.saved_bytes,
        "frozen_layers": len(cm.slimfit.frozen),
        "layers": len(layers),
        "always_train": list(cm.slimfit.config.always_train),
        "trained_steps": dict(zip(layers, schedule.trained_counts())) if schedule else None,
        "distinct_frozen_sets": schedule.distinct_sets() if schedule else 1,
    })
    report = cm.slimfit.report()
    if report.memory_budget is not None:  # budget, predicted peak and its parts, measured peak
        metrics["memory_budget"] = report.memory_budget
    results: dict[str, Any] = {"slimfit": metrics}
    print(report)
    if out is not None:
        cm.train()
        paths = cm.slimfit.save_report(out, optimizer=opt, **sample)
        results["files"] = sorted(str(p) for p in paths.values())
    if settings.compare_eager:
        eager_model, _ = build()
        results["eager"] = _train_plain(eager_model, data, settings, "eager", lr=settings.eager_lr)
        print(side_by_side(results))
    print(json.dumps({k: v for k, v in results.items() if k != "files"}, indent=2))
    accuracy = f"test accuracy: {metrics['accuracy']:.2%} (slimfit"
    if "eager" in results:
        accuracy += f"), {results['eager']['accuracy']:.2%} (eager"
    print(accuracy + f"), {metrics['test_articles']} test articles", flush=True)
    if out is not None:
        (out / "config.json").write_text(json.dumps(
            {"settings": asdict(settings), "slimfit_config": str(cm.slimfit.config),
             "torch": torch.__version__}, indent=2))
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        print(f"wrote {out}/: config.json, metrics.json, " + ", ".join(Path(p).name for p in results["files"]))
    return results


def _train_plain(model: nn.Module, data: TextClassificationData, settings: FinetuneSettings, desc: str,
                 lr: float | None = None) -> dict[str, Any]:
    """Train `model` without slimfit; the metrics, with the bytes it saves for backward."""
    metrics = train(model, data, settings, desc, lr=lr)
    metrics["peak_rss_bytes"] = _peak_rss_bytes()  # a --compare-eager run's is the larger of both
    metrics.pop("optimizer")
    model.train()
    metrics["saved_bytes"] = eager_saved_bytes(model, **metrics.pop("sample"))
    metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return metrics


def _with_head(model_dir: Path, seed: int, num_labels: int) -> tuple[nn.Module, frozenset[str]]:
    torch.manual_seed(seed)  # the fresh head's init: the same for slimfit and eager
    return load_classifier_and_new(model_dir, num_labels)


def side_by_side(results: dict[str, dict[str, Any]]) -> str:
    s, e = results["slimfit"], results["eager"]
    rows = [
        ("test accuracy", f"{s['accuracy']:.2%}", f"{e['accuracy']:.2%}"),
        ("learning rate", f"{s['lr']:g}", f"{e['lr']:g}"),
        ("training seconds", f"{s['train_seconds']:.1f}", f"{e['train_seconds']:.1f}"),
        ("median step seconds", f"{s['median_step_seconds']:.3f}", f"{e['median_step_seconds']:.3f}"),
        ("saved for backward, MB/step", f"{s['saved_bytes'] / 1e6:.1f}", f"{e['saved_bytes'] / 1e6:.1f}"),
        ("compile seconds", f"{s['compile_seconds']:.1f}", "0"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'slimfit':>12}  {'eager':>12}"]
    lines += [f"{name:{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
    return "\n".join(lines)
