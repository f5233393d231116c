"""`slimfit-fx finetune` (the main job) and `slimfit-fx inspect`: argument parsing.

finetune: slimfit_fx/finetune.py (default: all-MiniLM-L6-v2 on BBC News);
inspect: one step of a bundled model, then the report, memory breakdown,
graphs and PNGs.
Only the public API is used here; this module must not reach into the compiler.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import slimfit_fx

from . import zoo
from .config import OPTIMIZER_STATES
from .data import BUNDLED_MODEL
from .finetune import (COMPRESSIONS, LR_SCHEDULES, METHODS, SCHEDULES, TASKS, FinetuneSettings, SettingsError,
                       run, seeded_frozen_set)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None ones (their help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfit-fx")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune a text classifier offline (default: "
                        "all-MiniLM-L6-v2 on BBC News) and write a run directory",
                        formatter_class=_Help)
    d = FinetuneSettings()
    ft.add_argument("--task", choices=TASKS, default=d.task,
                    help="text: --model on --data-dir; digits: scikit-learn's 8x8 digits with a small "
                         "ViT trained from random init (no checkpoint; --model, --data-dir and "
                         "--seq-len do not apply)")
    ft.add_argument("--method", choices=METHODS, default=d.method,
                    help="slimfit: slimfit_fx.compile; eager: plain PyTorch, every layer trains; "
                         "lora: peft LoRA r=8 on the attention linears, the fresh head trains whole")
    ft.add_argument("--model", default=d.model,
                    help=f"{BUNDLED_MODEL!r} (bundled) or a local Hugging Face model directory")
    ft.add_argument("--data-dir", default=None,
                    help="one sub-folder of .txt files per class (default: the bundled BBC News)")
    ft.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training articles")
    ft.add_argument("--batch-size", type=int, default=d.batch_size, help="articles per optimizer step")
    ft.add_argument("--seq-len", "--max-length", dest="max_length", type=int, default=d.max_length,
                    help="tokens per article (padded/truncated)")
    ft.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    ft.add_argument("--eager-lr", type=float, default=d.eager_lr,
                    help="--compare-eager's learning rate (default: --lr)")
    ft.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                    help="constant: no decay; linear: decay to 0 over the run (the paper's)")
    ft.add_argument("--freeze-ratio", type=float, default=None,
                    help=f"share of layers frozen; not with --memory-budget (default: {d.freeze_ratio})")
    ft.add_argument("--memory-budget", default=None,
                    help="total memory to fit in, e.g. 2GiB or 1500MB: the freeze ratio (up to 0.95) and, "
                         "where needed, the optimizer-state packing are chosen at the first step; the report "
                         "shows predicted vs measured peak")
    ft.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                    help="ils: training-dynamics scheduling; lisa: LISA layer sampling (2 blocks "
                         "train, redrawn every 20 steps; embeddings and head always train); fixed: "
                         "one seeded draw of layers frozen for the whole run (the classifier always trains)")
    ft.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default=d.optimizer_state,
                    help="how frozen layers' optimizer state is held (see README)")
    ft.add_argument("--train-new-layers", action=argparse.BooleanOptionalAction, default=d.train_new_layers,
                    help="ILS never freezes layers the checkpoint did not hold (the fresh head); "
                         "--no-train-new-layers scores them like any layer, as the paper does")
    ft.add_argument("--compression", choices=tuple(COMPRESSIONS), default=d.compression,
                    help="how saved activations are stored (see README); only-<field>: that one "
                         "compressed kind at the paper's format, every other kind kept whole")
    ft.add_argument("--backend", choices=("inductor", "aot_eager"), default=d.backend,
                    help="inductor: compiled kernels; aot_eager: slimfit's graphs run op by op "
                         "(no C++ compile)")
    ft.add_argument("--limit", type=int, default=None,
                    help="use only N articles, spread over the classes (at least 2 per class)")
    ft.add_argument("--seed", type=int, default=d.seed,
                    help="data split, batch order, head init and the schedule's initial scores")
    ft.add_argument("--out", default=None,
                    help="run directory for config.json, metrics.json, the report and its PNGs "
                         "(default: runs/finetune-<date>-<time>)")
    ft.add_argument("--compare-eager", action="store_true",
                    help="also run the same fine-tune without slimfit and print both side by side")
    ft.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    ft.add_argument("--json", default=None, help="also write metrics.json's content to this file")

    ins = sub.add_parser("inspect", help="compile a bundled model, run one step, show what slimfit did",
                         formatter_class=_Help)
    ins.add_argument("--model", default="bert-tiny", help=f"one of {sorted(zoo.MODELS)}")
    ins.add_argument("--freeze-ratio", type=float, default=0.9, help="share of layers frozen (one seeded draw)")
    ins.add_argument("--backend", choices=("inductor", "aot_eager"), default="aot_eager",
                     help="the compile backend")
    ins.add_argument("--seed", type=int, default=0, help="model init, batch and frozen draw")
    ins.add_argument("--out", default=None, help="write report.json/.md and PNG charts here")
    ins.add_argument("--graphs", action="store_true", help="print every graph stage")
    return parser


def inspect(args: argparse.Namespace) -> slimfit_fx.SlimFitModule:
    try:
        model, batch = zoo.build(args.model, seed=args.seed)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    cm = slimfit_fx.compile(model, schedule="manual", backend=args.backend)
    try:
        frozen = seeded_frozen_set(cm.slimfit.layers, args.freeze_ratio, args.seed)
    except ValueError as err:
        raise SystemExit(f"slimfit-fx inspect: {err}") from err
    cm.slimfit.set_frozen(frozen)
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


def finetune(args: argparse.Namespace) -> dict:
    fields = set(FinetuneSettings.__dataclass_fields__)
    if args.memory_budget is not None and args.freeze_ratio is not None:
        raise SystemExit("slimfit-fx finetune: --memory-budget chooses the freeze ratio itself; "
                         "drop --freeze-ratio (or --memory-budget)")
    unset = {k for k in ("freeze_ratio", "memory_budget") if getattr(args, k) is None}  # the settings' default
    settings = FinetuneSettings(**{k: v for k, v in vars(args).items() if k in fields and k not in unset})
    if settings.out is None:
        settings = dataclasses.replace(settings, out=time.strftime("runs/finetune-%Y%m%d-%H%M%S"))
    try:  # bad settings, model or data fail with one line naming the flag, before training
        results = run(settings)
    except SettingsError as err:
        raise SystemExit(f"slimfit-fx finetune: {err}") from err
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
