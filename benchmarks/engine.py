"""One step of a fixed frozen set, measured as a user pays it; and ILS at scale.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/engine.py step [--backend inductor]
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/engine.py ils [--steps 300] [--backend inductor]

`step`: BERT-base config (random init), bs 8, seq 128, one seeded random set of
90% of the layers frozen, AdamW over every parameter. After two warm-up steps,
five timed steps; for each, the process's peak RSS during the step (the kernel's
high-water mark, reset right before the step through /proc/self/clear_refs, so
no sampling thread competes for the GIL) minus the RSS before it, and the
bytes held from forward to backward (`cm.slimfit.saved_bytes`). It uses only
`compile(schedule="manual")`, `set_frozen` and `saved_bytes`, so the same script
measures another slimfit_fx version put first on PYTHONPATH.

`ils`: the same model at bs 8, seq 64, `compile(model)`'s default schedule
(ILS after every optimizer step, ratio 0.9) for `--steps` steps: compile share
of wall time, distinct frozen sets, layers ever trained, dynamo graphs, RSS
every 50 steps. Prints one JSON object per run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import slimfit_fx
from slimfit_fx import capture, zoo


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _batches(batch: dict, count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{**batch, "input_ids": torch.randint(0, 30522, batch["input_ids"].shape, generator=g),
             "labels": torch.randint(0, 2, batch["labels"].shape, generator=g)} for _ in range(count)]


def step_run(backend: str, seq: int, batch_size: int) -> dict[str, object]:
    model, batch = zoo.bert_base(seed=0, batch=batch_size, seq=seq)
    cm = slimfit_fx.compile(model, schedule="manual", backend=backend)
    layers = cm.slimfit.layers
    frozen = random.Random(0).sample(layers, int(0.9 * len(layers)))
    cm.slimfit.set_frozen(frozen)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4)
    batches = _batches(batch, 7)
    seconds, peaks = [], []
    for i, b in enumerate(batches):
        before = _rss_kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        cm(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:
            seconds.append(time.perf_counter() - t0)
            peaks.append((_rss_kib("VmHWM") - before) / 1024)
    return {"run": "step", "slimfit_fx": slimfit_fx.__file__, "backend": backend, "seq": seq,
            "batch": batch_size, "frozen": len(frozen), "layers": len(layers),
            "median step s": round(statistics.median(seconds), 3),
            "step peak RSS rise MiB": round(statistics.median(peaks), 1),
            "saved MiB": round(cm.slimfit.saved_bytes / 2**20, 1),
            "RSS after MiB": round(_rss_kib("VmRSS") / 1024, 1),
            "compile s": round(cm.slimfit.stats["compile_seconds"], 1)}


def ils_run(backend: str, steps: int) -> dict[str, object]:
    model, batch = zoo.bert_base(seed=0, batch=8, seq=64)
    cm = slimfit_fx.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4)
    batches = _batches(batch, 16)
    frames = None
    rss = {}
    start = time.perf_counter()
    for i in range(steps):
        cm(**batches[i % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i == 0:
            frames, first_compile = capture.dynamo_compiled_frames(), cm.slimfit.stats["compile_seconds"]
        if (i + 1) % 50 == 0:
            rss[i + 1] = round(_rss_kib("VmRSS") / 1024)
    wall = time.perf_counter() - start
    stats, schedule = cm.slimfit.stats, cm.slimfit.schedule
    trained = schedule.trained_counts()
    return {"run": "ils", "backend": backend, "steps": steps, "wall s": round(wall, 1),
            "compile s": round(stats["compile_seconds"], 1),
            "compile s after step 1": round(stats["compile_seconds"] - first_compile, 2),
            "compile share": round(stats["compile_share"], 4),
            "dynamo recompiles after step 1": capture.dynamo_compiled_frames() - frames,
            "regions": stats["regions"], "regions compiled": stats["regions_compiled"],
            "distinct frozen sets": schedule.distinct_sets(),
            "layers": len(trained), "layers ever trained": sum(c > 0 for c in trained),
            "min/max trained steps per layer": (min(trained), max(trained)),
            "RSS MiB by step": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", choices=("step", "ils"))
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = step_run(args.backend, args.seq, args.batch) if args.run == "step" else ils_run(args.backend, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
