"""Batches of changing shape, as a collator that pads per batch makes them.

    python benchmarks/dynamic_shapes.py [--steps 1000] [--padded-steps 250] [--backend inductor] [--shapes-only]

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
the compiles. Then, per sample shape, slimfit's run-time code compiled for
dynamic sizes against the same shape compiled static, and plain torch.compile
timed the same way (`run_shape_check`; `--shapes-only` runs just this, into
the `dynamic-shapes-step` section). Each run in its own process. Writes
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
SHAPE_STEPS = 15  # timed steps per sample shape, after the compiles


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


def run_shape_check(backend: str, compiler: str = "slimfit") -> dict:
    """Per sample shape, two models in one process: one compiled static on that
    shape alone, one compiled after two other shapes made its sizes dynamic. Their
    steps alternate, 15 each (SHAPE_STEPS), so both see the same machine; the fastest
    step of each (the least disturbed on a shared CPU) and the median of the
    step-by-step ratios. `compiler` "torch.compile" times plain torch.compile the
    same way: the cost of dynamic sizes to inductor itself."""
    import torch

    import slimfit_fx
    from slimfit_fx import capture

    def compiled():
        model = build()
        if compiler == "slimfit":
            return slimfit_fx.compile(model, backend=backend), model
        return torch.compile(model, backend=backend), model

    def train_step(module, optimizer, shape, seed):
        t0 = time.perf_counter()
        module(**batch_of(*shape, None, seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    result = {}
    for size, length in SAMPLE_SHAPES:
        capture.reset_dynamo()
        runs = {}
        for mode, warmup in (("static", [(size, length)] * 2), ("dynamic", [(3, 40), (5, 70), (size, length)])):
            module, model = compiled()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for i, shape in enumerate(warmup):
                train_step(module, optimizer, shape, i)
            runs[mode] = module, optimizer
        times = {"static": [], "dynamic": []}
        for i in range(SHAPE_STEPS):
            for mode, (module, optimizer) in runs.items():
                times[mode].append(train_step(module, optimizer, (size, length), 10 + i))
        key = f"{size}x{length}"
        result[key] = {"static": min(times["static"]), "dynamic": min(times["dynamic"]),
                       "ratio": statistics.median(d / s for s, d in zip(times["static"], times["dynamic"]))}
        if compiler == "slimfit":
            result[key]["graphs"] = {m: module.slimfit.stats["graphs_captured"] for m, (module, _) in runs.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--padded-steps", type=int, default=250)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--shapes-only", action="store_true",
                        help="only the static-vs-dynamic step check (section dynamic-shapes-step)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "shapes":
            print(json.dumps(run_shape_check(args.backend, args.child[1])))
        else:
            print(json.dumps(run_training(args.child[0], args.child[1], args.steps, args.backend)))
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--backend", args.backend]
    if args.shapes_only:
        shapes = {compiler: run_child([*me, "--child", "shapes", compiler]) for compiler in ("slimfit", "torch.compile")}
        text = "\n".join(shape_table(shapes))
        print(text)
        if not args.no_doc:
            write_section("dynamic-shapes-step", "Step time, compiled for dynamic sizes vs one shape",
                          run_shape_check.__doc__.replace("\n    ", "\n") + "\n\n" + text)
        return
    rows = {}
    for kind in ("eager", "slimfit"):
        for padding in ("mixed", "padded to 512"):
            steps = args.steps if padding == "mixed" else args.padded_steps
            rows[kind, padding] = run_child([*me, "--steps", str(steps), "--child", kind, padding])
            print(kind, padding, rows[kind, padding], flush=True)
    shapes = {compiler: run_child([*me, "--child", "shapes", compiler]) for compiler in ("slimfit", "torch.compile")}
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
    return "\n".join([*lines, "", *shape_table(shapes)])


def shape_table(shapes: dict) -> list[str]:
    lines = ["| compiler | shape (batch x length) | compiled static, fastest step s | compiled dynamic, "
             "fastest step s | dynamic / static, median of step pairs |", "|---|---|---:|---:|---:|"]
    for compiler, result in shapes.items():
        for size, length in SAMPLE_SHAPES:
            key = f"{size}x{length}"
            if isinstance(result, str):
                lines.append(f"| {compiler} | {key} | {result} | - | - |")
                continue
            r = result[key]
            lines.append(f"| {compiler} | {key} | {r['static']:.3f} | {r['dynamic']:.3f} | {r['ratio']:.2f} |")
    return lines


if __name__ == "__main__":
    main()
