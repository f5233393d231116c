"""BBC News accuracy: slimfit (ILS, paper compression) vs eager full fine-tune, per seed.

    python benchmarks/accuracy.py [--seeds 0 1] [--freeze-ratio 0.9] [--epochs 1]
        [--lr 1e-4] [--eager-lr LR] [--backend aot_eager]
        [--no-train-new-layers] [--keep runs/accuracy]

Each seed runs `slimfit-fx finetune --compare-eager` (same model, data split,
batch order, head init and epochs for both) and the table reports both
accuracies, their difference, and the spread over seeds. Writes its section of
docs/benchmarks.md. With --keep DIR each seed's run directory is kept as
DIR/seed-N, and a seed whose kept run used the very same finetune arguments is
read back instead of rerun, so seeds can be added to a table later. Only the
arguments are compared, not the code: empty DIR after changing slimfit_fx.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path

from doc import write_section

from slimfit_fx import capture, cli


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--freeze-ratio", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--compression", default="paper")
    parser.add_argument("--lr", type=float, default=1e-4, help="slimfit's AdamW learning rate")
    parser.add_argument("--eager-lr", type=float, default=None,
                        help="the full fine-tune's learning rate (default: --lr)")
    parser.add_argument("--lr-schedule", default="linear", choices=("linear", "constant"),
                        help="linear: the paper's decay to 0 (the main job's default is constant)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--train-new-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="ILS never freezes the fresh classification head (default); "
                             "--no-train-new-layers scores it like any layer, as the paper does")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each seed's run directory here; a seed already kept with the "
                             "same arguments is read back, not rerun")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        argv = ["finetune", "--seed", str(seed), "--freeze-ratio", str(args.freeze_ratio),
                "--epochs", str(args.epochs), "--compression", args.compression,
                "--lr", str(args.lr), "--lr-schedule", args.lr_schedule,
                *(["--eager-lr", str(args.eager_lr)] if args.eager_lr is not None else []),
                "--backend", args.backend, "--compare-eager",
                "--train-new-layers" if args.train_new_layers else "--no-train-new-layers",
                "--no-progress"]
        with (nullcontext(args.keep / f"seed-{seed}") if args.keep
              else tempfile.TemporaryDirectory()) as out:
            out = Path(out)
            kept = out / "argv.json"
            if not (kept.exists() and json.loads(kept.read_text()) == argv
                    and (out / "metrics.json").exists()):
                kept.unlink(missing_ok=True)
                cli.main([*argv, "--out", str(out)])
                kept.write_text(json.dumps(argv))  # written last: only a finished run is reused
            rows.append((seed, json.loads((out / "metrics.json").read_text())))
        capture.reset_dynamo()
        body = table(rows, args)  # written after every seed: a cut-short run keeps what it measured
        print(body)
        write_section("accuracy", "Accuracy: slimfit vs full fine-tune (BBC News)", body)


def table(rows, args) -> str:
    lines = ["| seed | slimfit accuracy | eager accuracy | difference (points) | slimfit train s | "
             "eager train s | slimfit saved MB/step | eager saved MB/step | compile s | frozen sets |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    diffs = []
    for seed, r in rows:
        s, e = r["slimfit"], r["eager"]
        diffs.append(100 * (s["accuracy"] - e["accuracy"]))
        lines.append(f"| {seed} | {s['accuracy']:.2%} | {e['accuracy']:.2%} | {diffs[-1]:+.2f} | "
                     f"{s['train_seconds']:.0f} | {e['train_seconds']:.0f} | {s['saved_bytes'] / 1e6:.1f} | "
                     f"{e['saved_bytes'] / 1e6:.1f} | {s['compile_seconds']:.1f} | "
                     f"{s['distinct_frozen_sets']} |")
    slim = [100 * r["slimfit"]["accuracy"] for _, r in rows]
    eager = [100 * r["eager"]["accuracy"] for _, r in rows]
    spread = lambda xs: f"{statistics.mean(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"
    test = rows[0][1]["slimfit"]["test_articles"]
    lines += ["", f"Mean over {len(rows)} of {len(args.seeds)} seeds: slimfit {spread(slim)}, eager "
              f"{spread(eager)}, difference {spread(diffs)} points. One test article is "
              f"{100 / test:.2f} points ({test} test articles)."]
    if len(diffs) > 1:  # how far the mean difference itself can move with the seeds drawn
        sd = statistics.stdev(diffs)
        lines.append(f"Per-seed difference: standard deviation {sd:.2f} points, standard error of "
                     f"the mean {sd / len(diffs) ** 0.5:.2f} points.")
    decay = "decaying linearly to 0" if args.lr_schedule == "linear" else "constant"
    eager_lr = args.lr if args.eager_lr is None else args.eager_lr
    head = ("the fresh classification head always trains" if args.train_new_layers
            else "the fresh classification head scored like any layer")
    return (f"all-MiniLM-L6-v2 on BBC News, {args.epochs} epoch(s), batch 16, seq 128, "
            f"AdamW ({decay}); slimfit: lr {args.lr:g}, ILS freezing {args.freeze_ratio:.0%} of the "
            f"layers ({head}), a new frozen set every step, compression {args.compression!r}, backend "
            f"{args.backend}; eager: lr {eager_lr:g}, every layer trains.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
