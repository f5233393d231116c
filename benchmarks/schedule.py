"""What ILS costs in compile time, and what bounding it does to accuracy.

    python benchmarks/schedule.py [--steps 300] [--skip-bert-base] [--skip-accuracy]

1. BERT-base config (random init, bs 8, seq 64, synthetic batches), freeze ratio
   0.9, schedule "ils" with new frozen sets admitted within the 3% compile budget
   (calibrated at step 4): compile share of wall time, variants built, distinct
   frozen sets, dynamo graphs, score bookkeeping bytes vs weight bytes.
2. all-MiniLM-L6-v2 on BBC News (the main job, 1 epoch, seed 0): per-step ILS
   (a new compiled set every step, as in the paper) vs budgeted ILS vs one fixed
   random set: accuracy, compile share, variants.
Prints the tables and writes them to docs/schedule-<part>.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import slimfit_fx
from slimfit_fx import cli, zoo

DOC = Path(__file__).resolve().parent.parent / "docs" / "schedule.md"  # sections: schedule-*.md


def bert_base_run(steps: int, backend: str) -> dict[str, object]:
    model, batch = zoo.bert_base(seed=0, batch=8, seq=64)
    g = torch.Generator().manual_seed(0)
    batches = [{**batch, "input_ids": torch.randint(0, 30522, batch["input_ids"].shape, generator=g),
                "labels": torch.randint(0, 2, batch["labels"].shape, generator=g)} for _ in range(16)]
    cm = slimfit_fx.compile(model, backend=backend, schedule="ils", freeze_ratio=0.9)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4)
    step_seconds = []
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        cm(**batches[i % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    stats, schedule = cm.slimfit.stats, cm.slimfit.schedule
    params = dict(cm.named_parameters())
    return {
        "steps": steps, "wall s": wall, "compile s": stats["compile_seconds"],
        "compile share": stats["compile_seconds"] / wall,
        "variants built": stats["variants_compiled"], "variants live": stats["variants_live"],
        "distinct frozen sets": schedule.distinct_sets(), "new set every": schedule.new_set_every,
        "dynamo graphs": stats["graphs_captured"],
        "median step s": statistics.median(step_seconds),
        "bookkeeping peak MiB": schedule.snapshot_bytes_peak / 2**20,
        "layer weights MiB": sum(params[n].numel() * params[n].element_size()
                                 for n in cm.slimfit.layers) / 2**20,
        "min/max trained steps per layer": (min(schedule.trained_counts()), max(schedule.trained_counts())),
    }


def accuracy_runs(backend: str, seed: int) -> dict[str, dict[str, object]]:
    modes = {
        "ILS per step (new set every step)": ["--new-set-every", "1"],
        "ILS, 3% compile budget": [],
        "fixed random set": ["--schedule", "fixed"],
    }
    rows = {}
    for name, flags in modes.items():
        with tempfile.TemporaryDirectory() as out:
            cli.main(["finetune", "--backend", backend, "--seed", str(seed), "--out", out, *flags])
            rows[name] = json.loads((Path(out) / "metrics.json").read_text())["slimfit"]
        slimfit_fx.capture.reset_dynamo()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", default="aot_eager", choices=("aot_eager", "inductor"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bert-base", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, backend {args.backend}.", ""]
    if not args.skip_bert_base:
        row = bert_base_run(args.steps, args.backend)
        lines += [f"### BERT-base config, ratio 0.9, {args.steps} steps, bs 8, seq 64, ILS within the "
                  "3% compile budget", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in row.items()]
        lines.append("")
        print("\n".join(lines), flush=True)
    if not args.skip_accuracy:
        rows = accuracy_runs(args.backend, args.seed)
        cols = ["accuracy", "steps", "train_seconds", "compile_seconds", "train_compile_share",
                "variants_compiled", "distinct_frozen_sets", "new_set_every", "median_step_seconds"]
        lines += [f"### all-MiniLM-L6-v2 on BBC News, ratio 0.8, 1 epoch, seed {args.seed}", "",
                  "| schedule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, r in rows.items():
            cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    part = "bert-base" if args.skip_accuracy else "accuracy" if args.skip_bert_base else "all"
    command = " ".join(["python benchmarks/schedule.py", *__import__("sys").argv[1:]])
    (DOC.parent / f"schedule-{part}.md").write_text(
        f"# ILS: compile cost and accuracy\n\nCommand: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
