"""Batches of changing shape, as a collator that pads per batch makes them.

    python benchmarks/dynamic_shapes.py [--steps 1000] [--padded-steps 250] [--backend inductor]

A small BERT (hidden 128, 2 layers, 512 positions, random init, dropout 0.1)
trains `--steps` AdamW steps on batches whose size is drawn from 1..32 and
whose length (the longest row; shorter rows masked) from 8..512, the same
seeded draw for every row of the table:

* `mixed`: each batch at its own length (per-batch padding, HF's
  DataCollatorWithPadding);
* `padded to 512`: the same rows padded to 512 (fixed-length padding), over
  the first `--padded-steps` batches (its step time depends on the batch size
  only, drawn alike); its wall time is also given projected to `--steps`.

Rows: eager full fine-tune and slimfit's default `compile(model)` (ILS after
every step, 90% frozen, "paper" compression). Columns: dynamo graphs and
regions compiled, compile seconds, total wall seconds, mean step seconds after
the compiles. Then, per sample shape, the median step of slimfit's run-time
code compiled for dynamic sizes against the same shape compiled static (a fresh
model compiled on that shape alone). Each run in its own process. Writes
docs/benchmarks.md's `dynamic-shapes` section.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from doc import write_section
from processes import run_child

SAMPLE_SHAPES = ((8, 64), (16, 256), (32, 128))


def draw_shapes(steps: int, seed: int = 0) -> list[tuple[int, int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 33, (steps,), generator=g).tolist()
    lengths = torch.randint(8, 513, (steps,), generator=g).tolist()
    return list(zip(sizes, lengths))


def build(seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=512, num_labels=4,
                        problem_type="single_label_classification")
    return BertForSequenceClassification(config).train()


def batch_of(size: int, length: int, pad_to: int | None, step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(1, length + 1, (size,), generator=g)
    lengths[0] = length
    width = pad_to or length
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(1, 4096, (size, width), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 4, (size,), generator=g)}


def run_training(kind: str, padding: str, steps: int, backend: str) -> dict:
    import torch

    import slimfit_fx

    model = build()
    module = model if kind == "eager" else slimfit_fx.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    shapes = draw_shapes(steps)
    seconds, compiled_at = [], 0
    start = time.perf_counter()
    for i, (size, length) in enumerate(shapes):
        t0 = time.perf_counter()
        batch = batch_of(size, length, 512 if padding == "padded to 512" else None, i)
        module(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        if kind != "eager" and module.slimfit.stats["regions_compiled"] != compiled_at:
            compiled_at, last_compile = module.slimfit.stats["regions_compiled"], i
    wall = time.perf_counter() - start
    stats = module.slimfit.stats if kind != "eager" else {}
    after = seconds[last_compile + 1:] if kind != "eager" else seconds
    return {"graphs": stats.get("graphs_captured"), "regions_compiled": stats.get("regions_compiled"),
            "compile_s": stats.get("compile_seconds"), "last_compile_step": last_compile if kind != "eager" else None,
            "wall_s": wall, "mean_step_s": statistics.fmean(after) if after else None, "steps": steps}


def run_shape_check(mode: str, backend: str) -> dict:
    """Median step per sample shape: compiled static on that shape alone, or
    after two other shapes made its sizes dynamic."""
    import torch

    import slimfit_fx
    from slimfit_fx import capture

    result = {}
    for size, length in SAMPLE_SHAPES:
        capture.reset_dynamo()
        module = slimfit_fx.compile(build(), backend=backend)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        warmup = [(size, length)] * 2 if mode == "static" else [(3, 40), (5, 70), (size, length)]
        for i, shape in enumerate(warmup + [(size, length)] * 5):
            t0 = time.perf_counter()
            module(**batch_of(*shape, None, i)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= len(warmup):
                result.setdefault(f"{size}x{length}", []).append(time.perf_counter() - t0)
        result[f"graphs {size}x{length}"] = module.slimfit.stats["graphs_captured"]
    return {k: statistics.median(v) if isinstance(v, list) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--padded-steps", type=int, default=250)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "shapes":
            print(json.dumps(run_shape_check(args.child[1], args.backend)))
        else:
            print(json.dumps(run_training(args.child[0], args.child[1], args.steps, args.backend)))
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--backend", args.backend]
    rows = {}
    for kind in ("eager", "slimfit"):
        for padding in ("mixed", "padded to 512"):
            steps = args.steps if padding == "mixed" else args.padded_steps
            rows[kind, padding] = run_child([*me, "--steps", str(steps), "--child", kind, padding])
            print(kind, padding, rows[kind, padding], flush=True)
    shapes = {mode: run_child([*me, "--child", "shapes", mode]) for mode in ("static", "dynamic")}
    print(shapes, flush=True)
    text = table(rows, shapes, args)
    print(text)
    if not args.no_doc:
        write_section("dynamic-shapes", "Batches of changing shape", __doc__.split("\n\n", 2)[2].strip()
                      + "\n\n" + text)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: dict, shapes: dict, args) -> str:
    lines = [f"Backend {args.backend}.", "",
             "| model | batches | steps | dynamo graphs | regions compiled | last compile at step | compile s | "
             f"wall s | wall s for {args.steps} steps | mean step s after compiles |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (kind, padding), r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {kind} | {padding} | {r} |" + " |" * 7)
            continue
        # projected: the compile steps as run, every later step at the mean
        projected = r["wall_s"] + (args.steps - r["steps"]) * r["mean_step_s"]
        note = "" if r["steps"] == args.steps else " (projected)"
        lines.append(f"| {kind} | {padding} | {r['steps']} | {_cell(r['graphs'], 'd')} | "
                     f"{_cell(r['regions_compiled'], 'd')} | {_cell(r['last_compile_step'], 'd')} | "
                     f"{_cell(r['compile_s'], '.1f')} | {r['wall_s']:.1f} | {projected:.1f}{note} | "
                     f"{_cell(r['mean_step_s'], '.3f')} |")
    lines += ["", "| shape (batch x length) | slimfit compiled static, median step s | compiled dynamic | "
                  "dynamic / static |", "|---|---:|---:|---:|"]
    static, dynamic = shapes["static"], shapes["dynamic"]
    for size, length in SAMPLE_SHAPES:
        key = f"{size}x{length}"
        if isinstance(static, str) or isinstance(dynamic, str):
            lines.append(f"| {key} | {static if isinstance(static, str) else '-'} | "
                         f"{dynamic if isinstance(dynamic, str) else '-'} | - |")
            continue
        lines.append(f"| {key} | {static[key]:.3f} | {dynamic[key]:.3f} | {dynamic[key] / static[key]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
