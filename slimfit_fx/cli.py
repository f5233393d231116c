"""`slimfit-fx finetune` (the main job) and `slimfit-fx inspect`.

finetune: all-MiniLM-L6-v2 on BBC News through slimfit_fx.compile; prints
accuracy, bytes saved for backward, step and compile time. inspect: one step
of a bundled model, then the report, memory breakdown, graphs and PNGs.
Only the public API is used here; this module must not reach into the compiler.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import slimfit_fx

from . import zoo
from .config import COMPRESSION_PRESETS
from .data import load_bbc_news, load_default_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfit-fx")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune all-MiniLM-L6-v2 on BBC News (offline)")
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--max-length", type=int, default=128)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--freeze-ratio", type=float, default=0.8, help="share of layers frozen")
    ft.add_argument("--schedule", choices=("ils", "fixed"), default="ils",
                    help="ils: training-dynamics scheduling; fixed: one seeded draw of layers "
                         "frozen for the whole run (the classifier always trains)")
    ft.add_argument("--new-set-every", type=int, default=None,
                    help="ils: steps that pay for one new compiled frozen set (1 = per-step "
                         "scheduling); default: derived from --compile-budget")
    ft.add_argument("--compile-budget", type=float, default=0.03,
                    help="ils: share of training time new frozen sets may spend compiling")
    ft.add_argument("--compression", choices=tuple(COMPRESSION_PRESETS), default="paper",
                    help="how saved activations are stored (see README)")
    ft.add_argument("--backend", choices=("inductor", "aot_eager"), default="inductor")
    ft.add_argument("--limit", type=int, default=None, help="use only the first N articles")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--json", default=None, help="also write the results to this file")

    ins = sub.add_parser("inspect", help="compile a bundled model, run one step, show what slimfit did")
    ins.add_argument("--model", default="bert-tiny", help=f"one of {sorted(zoo.MODELS)}")
    ins.add_argument("--freeze-ratio", type=float, default=0.9)
    ins.add_argument("--backend", choices=("inductor", "aot_eager"), default="aot_eager")
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument("--out", default=None, help="write report.json/.md and PNG charts here")
    ins.add_argument("--graphs", action="store_true", help="print every graph stage")
    return parser


def seeded_frozen_set(layers: tuple[str, ...], ratio: float, seed: int) -> list[str]:
    """A fixed draw of int(ratio * len(layers)) layers; the last layer (the head) trains."""
    if not 0.0 <= ratio <= 1.0:
        raise SystemExit(f"--freeze-ratio must be in [0, 1], got {ratio}")
    return random.Random(seed).sample(layers[:-1], min(int(ratio * len(layers)), len(layers) - 1))


def inspect(args: argparse.Namespace) -> slimfit_fx.SlimFitModule:
    try:
        model, batch = zoo.build(args.model, seed=args.seed)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    cm = slimfit_fx.compile(model, backend=args.backend)
    cm.slimfit.set_frozen(seeded_frozen_set(cm.slimfit.layers, args.freeze_ratio, args.seed))
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-4)
    for _ in range(2):  # the second step runs with optimizer state and measures grads
        opt.zero_grad(set_to_none=True)
        cm(**batch).loss.backward()
        opt.step()
    print(cm.slimfit.report())
    print()
    print(cm.slimfit.memory_breakdown(optimizer=opt, **batch))
    if args.graphs:
        print(cm.slimfit.graphs())
    if args.out:
        paths = cm.slimfit.save_report(args.out, optimizer=opt, **batch)
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return cm


def _batches(split: dict[str, torch.Tensor], size: int, generator: torch.Generator | None):
    count = len(split["labels"])
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count - size + 1, size):  # full batches only: one graph shape
        index = order[start:start + size]
        yield {k: v[index] for k, v in split.items()}


def finetune(args: argparse.Namespace) -> dict[str, float]:
    try:  # bad settings fail here, before the model and data load
        config = slimfit_fx.SlimFitConfig(
            backend=args.backend, freeze_ratio=args.freeze_ratio, seed=args.seed,
            compression=args.compression,
            **(dict(schedule="ils", new_set_every=args.new_set_every,
                    compile_budget=args.compile_budget) if args.schedule == "ils" else {}),
        )
    except (TypeError, ValueError) as err:
        raise SystemExit(f"slimfit-fx finetune: {err}") from err
    torch.manual_seed(args.seed)
    model, tokenizer = load_default_model(num_labels=5)
    data = load_bbc_news(tokenizer, max_length=args.max_length, seed=args.seed, limit=args.limit)
    if len(data.classes) != 5:
        raise RuntimeError(f"expected BBC News' 5 classes, found {data.classes}")
    cm = slimfit_fx.compile(model, config)
    if args.schedule == "fixed":
        cm.slimfit.set_frozen(seeded_frozen_set(cm.slimfit.layers, args.freeze_ratio, args.seed))
    layers = cm.slimfit.layers
    frozen = cm.slimfit.frozen
    print(f"layers: {len(layers)}, frozen: {len(frozen)} ({args.schedule}), train articles: "
          f"{len(data.train['labels'])}, test articles: {len(data.test['labels'])}")

    opt = torch.optim.AdamW(cm.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    steps, start, step_seconds = 0, time.perf_counter(), []
    cm.train()
    for epoch in range(args.epochs):
        for batch in _batches(data.train, args.batch_size, generator):
            t0 = time.perf_counter()
            loss = cm(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t0)
            steps += 1
            if steps % 20 == 0:
                print(f"epoch {epoch} step {steps} loss {loss.item():.4f}")
    train_seconds = time.perf_counter() - start
    compile_seconds = cm.slimfit.stats["compile_seconds"]
    schedule = cm.slimfit.schedule

    cm.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in _batches(data.test, args.batch_size, None):
            logits = cm(**batch).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    stats = cm.slimfit.stats
    results = {
        "accuracy": correct / max(total, 1),
        "steps": steps,
        "train_seconds": train_seconds,
        "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else 0.0,
        "compile_seconds": stats["compile_seconds"],
        "train_compile_share": compile_seconds / train_seconds if train_seconds else 0.0,
        "variants_compiled": stats["variants_compiled"],
        "dynamo_graphs": stats["graphs_captured"],
        "saved_bytes": cm.slimfit.saved_bytes,
        "frozen_layers": len(frozen),
        "layers": len(layers),
        "schedule": args.schedule,
        "compression": args.compression,
        "distinct_frozen_sets": schedule.distinct_sets() if schedule else 1,
        "new_set_every": schedule.new_set_every if schedule else None,
    }
    print(cm.slimfit.report())
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "finetune":
        finetune(args)
    elif args.command == "inspect":
        inspect(args)


if __name__ == "__main__":
    main()
