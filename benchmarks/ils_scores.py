"""ILS scores: whole tensors against the former strided sample, and host reads per step.

    python benchmarks/ils_scores.py [--steps 10] [--batch 8] [--seq 128] [--lr 5e-5]
                                    [--before-rev 20abac0] [--no-doc]

all-MiniLM-L6-v2 (pretrained, the bundled package) with a fresh 5-class head,
BBC News batches, dropout on, AdamW, aot_eager. Scores: freeze_ratio 0, so
every layer trains and is scored at every step. For each step and layer the
score slimfit_fx computes (the whole tensor) is compared with the float64
mean of the whole tensor, and with the estimate the schedule used to make from
a strided sample of about 65,536 elements (every n-th element, n = numel //
65,536; computed here, as the schedule did it). "Top-6 agreement": of the 6
layers with the highest whole-tensor scores (the 6 that would train next at the
default freeze_ratio 0.9 of 54 layers), how many the sampled scores rank top-6 too.

Host reads: the default config (freeze_ratio 0.9), counted while the schedule
runs (its optimizer hooks, its per-forward check, cm.slimfit.step()): every
call that turns a tensor into host values (`.tolist()`, `.item()`, `.cpu()`,
`.to("cpu")`, `bool()`, `torch.equal`...), except where the schedule sorts the
scores it keeps on the host. "Before"
is slimfit_fx/schedule.py at --before-rev, loaded from git, run on the same
loops. Writes its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import torch
from doc import write_section
from torch.overrides import TorchFunctionMode

import slimfit_fx
from slimfit_fx import capture
from slimfit_fx import module as slimfit_module
from slimfit_fx import schedule as current_schedule
from slimfit_fx.data import load_bbc_news, load_classifier, load_tokenizer, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = 65536  # the former SCORE_SAMPLE
HOST_READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.equal, torch.Tensor.equal, torch.Tensor.nonzero, torch.nonzero,
}


def strided_sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)]


def exact(old: torch.Tensor, new: torch.Tensor) -> float:
    """mean(|new - old| / |old|) in float64, with the floor the sampled score used."""
    old, new = old.double(), new.double()
    return ((new - old).abs() / old.abs().clamp_min(torch.finfo(torch.float64).tiny)).mean().item()


class Reads(TorchFunctionMode):
    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename, self.calls = filename, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is torch.Tensor.to and any(
            isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu"
            for t in (*args[1:], kwargs.get("device")))
        if func in HOST_READS or to_cpu:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != self.filename:
                frame = frame.f_back
            where = frame.f_code.co_name if frame else "outside"
            if where != "_choose":  # sorts the scores held on the host
                self.calls["reads"] += 1
        return func(*args, **kwargs)


def _schedule_at(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:slimfit_fx/schedule.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("slimfit_fx._schedule_before")
    module.__package__ = "slimfit_fx"
    module.__file__ = f"<slimfit_fx/schedule.py at {rev}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _watch(schedule, reads: Reads) -> None:
    for name in ("before_step", "after_step", "note_training_forward", "manual_step"):
        method = getattr(schedule, name)

        def run(*args, _method=method, **kwargs):
            with reads:
                return _method(*args, **kwargs)

        setattr(schedule, name, run)


def _batches(data, batch: int, steps: int):
    n = data.train["input_ids"].shape[0]
    return [{k: v[(i * batch) % n:(i * batch) % n + batch] for k, v in data.train.items()} for i in range(steps)]


def score_errors(model_dir, data, args) -> list[str]:
    torch.manual_seed(args.seed)
    model = load_classifier(model_dir, len(data.classes))
    cm = slimfit_fx.compile(model, backend="aot_eager", schedule="ils", freeze_ratio=0.0).train()
    layers, schedule = cm.slimfit.layers, cm.slimfit.schedule
    params = dict(cm.named_parameters())
    optimizer = torch.optim.AdamW(cm.parameters(), lr=args.lr)
    sampled_error, whole_error, overlap = [], [], []
    for batch in _batches(data, args.batch, args.steps):
        before = {n: params[n].detach().clone() for n in layers}
        cm(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        full, sampled = {}, {}
        for i, n in enumerate(layers):
            full[n] = exact(before[n], params[n].detach())
            whole_error.append(abs(schedule.policy.scores[i].item() / full[n] - 1))
            if params[n].numel() // SAMPLE >= 2:  # smaller tensors were scored whole
                sampled[n] = exact(strided_sample(before[n]), strided_sample(params[n].detach()))
                sampled_error.append(100 * (sampled[n] / full[n] - 1))
        ranked = sorted(layers, key=full.get, reverse=True)[:6]
        ranked_sampled = sorted(layers, key=lambda n: sampled.get(n, full[n]), reverse=True)[:6]
        overlap.append(len(set(ranked) & set(ranked_sampled)))
    capture.reset_dynamo()
    sampled_layers = sum(params[n].numel() // SAMPLE >= 2 for n in layers)
    return [
        f"{len(layers)} layers, all trained and scored at each of {args.steps} steps; {sampled_layers} "
        f"of them are large enough that the sample skipped elements.", "",
        "| score | error vs whole-tensor float64 mean, min / median / max | top-6 agreement (mean of steps) |",
        "|---|---|---:|",
        f"| former strided sample (~65,536 elements) | {min(sampled_error):+.1f}% / "
        f"{statistics.median(sampled_error):+.1f}% / {max(sampled_error):+.1f}% | "
        f"{statistics.mean(overlap):.1f} of 6 (min {min(overlap)}) |",
        f"| whole tensor (now) | max {max(whole_error):.1e} (relative) | - (the reference) |",
    ]


def host_reads(model_dir, data, args, schedule_module, loop: str) -> float:
    original = slimfit_module.Schedule
    if hasattr(schedule_module, "InterLayerSchedule"):  # before freeze policies: ILS built in
        def before_policies(layers, parameters, policy, *, apply_frozen, freeze_ratio, always_train, blocks):
            return schedule_module.InterLayerSchedule(
                layers, parameters, freeze_ratio, reschedule_every=policy.reschedule_every,
                seed=policy.seed, apply_frozen=apply_frozen, always_train=always_train)

        slimfit_module.Schedule = before_policies
    else:
        slimfit_module.Schedule = schedule_module.Schedule
    try:
        torch.manual_seed(args.seed)
        model = load_classifier(model_dir, len(data.classes))
        cm = slimfit_fx.compile(model, backend="aot_eager", schedule="ils").train()
    finally:
        slimfit_module.Schedule = original
    reads = Reads(schedule_module.__file__)
    _watch(cm.slimfit.schedule, reads)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=args.lr)
    micro = 2 if loop.endswith("micro-batches") else 1
    for batch in _batches(data, args.batch, args.steps):
        for _ in range(micro):
            cm(**batch).loss.backward()
        if loop.startswith("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        else:
            with torch.no_grad():
                for p in cm.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-args.lr)
                        p.grad = None
            cm.slimfit.step()
    assert cm.slimfit.schedule.step == args.steps
    capture.reset_dynamo()
    return reads.calls["reads"] / args.steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before-rev", default="20abac0")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    model_dir = resolve_model_dir("all-minilm-l6-v2")
    data = load_bbc_news(load_tokenizer(model_dir), args.seq, seed=args.seed)
    lines = [f"all-MiniLM-L6-v2 + fresh 5-class head, BBC News batches {args.batch} x {args.seq}, "
             f"dropout on, AdamW lr {args.lr}, aot_eager, {args.steps} steps.", ""]
    lines += score_errors(model_dir, data, args)
    before = _schedule_at(args.before_rev)
    lines += ["", f"Host reads per step while the schedule runs (default config, freeze_ratio 0.9); "
              f"before: slimfit_fx/schedule.py at {args.before_rev}. On a GPU each read is a "
              "device-to-host copy that waits for the device.", "",
              "| loop | reads before | reads now |", "|---|---:|---:|"]
    for loop in ("optimizer", "optimizer, 2 micro-batches", "hand-written + cm.slimfit.step()",
                 "hand-written + cm.slimfit.step(), 2 micro-batches"):
        old = host_reads(model_dir, data, args, before, loop)
        new = host_reads(model_dir, data, args, current_schedule, loop)
        lines.append(f"| {loop} | {old:.1f} | {new:.1f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        write_section("ils-scores", "ILS scores: whole tensor vs strided sample (main job's model)", body)


if __name__ == "__main__":
    main()
