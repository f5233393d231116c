"""Accuracy side by side: full fine-tune, slimfit (default, with its frozen
layers' optimizer state kept whole, with the paper's norm pruning, freezing
only, each compressed kind alone), LoRA and LISA, over seeds, on two tasks.

    python benchmarks/accuracy.py [--task bbc|digits] [--seeds 0 1 ...] [--rows NAME ...]
        [--epochs N] [--keep DIR [--kept-only]]

Every (row, seed) is one `slimfit-fx finetune` process, so each row's total
peak (the process's peak RSS, read by the run itself after training and
evaluation) is its own. Tasks: "bbc", all-MiniLM-L6-v2 on BBC News (the main
job); "digits", scikit-learn's digits with a small ViT trained from random
init (there is no checkpoint). Runs go seed by seed, rows in the task's order,
so a cut-short run holds paired seeds. Per row the table gives mean accuracy ±
its standard error over the seeds, the mean difference from the full fine-tune
over the seeds both hold ± its standard error, for slimfit rows the same
against freezing only (what one compressed kind alone costs), for a row
that changes one setting of another (the default's int8 frozen optimizer state
against it kept whole, the paper's norm pruning against float8 norms) the same
against that row (what the setting alone costs, also stated under the table
against that standard error), mean train
seconds (compile included) and the largest peak RSS. Under the table, each row
against freezing only seed by seed in test examples, with its 95% interval
(Student's t), its paired t-test's p and that p Holm-adjusted over the rows
compared together (they share the freezing-only runs; scipy.stats does the
statistics); the same for each row against the row it varies, and, when
LoRA is among the rows, for every slimfit row against LoRA (what users pick
instead). Writes its task's section of docs/benchmarks.md after every
run. With --keep DIR each run directory is kept as DIR/<task>/<row>/seed-N
(DIR/<task>-<N>-epochs/... at an epoch count other than the task's) and
a run whose kept arguments are the very same is read back instead of rerun,
so seeds and rows can be added later; --kept-only writes the table from the
kept runs and runs nothing. Only the arguments are compared, not the code:
empty DIR after changing slimfit_fx. `--keep benchmarks/runs` keeps them in the
repository (.gitignore leaves out the plots and full reports), so a table can
grow by seeds over several sittings and anyone can rewrite it with --kept-only.
With --section NAME the table goes to a section of its own, so a table of some
rows (--rows) leaves the task's full table in place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from scipy import stats

from doc import write_section

ROOT = Path(__file__).resolve().parent.parent
# Each row: (method, finetune arguments, learning-rate key in the task's LRS).
# The frozen layers' optimizer state kept whole (the default before "int8"): the
# rows that compare activation storage and schedules all keep it so, so that
# one thing differs between a row and the row it is compared with.
FULL_STATE = ["--optimizer-state", "full"]
# The paper's pruning of frozen norms (the default stores them in float8).
PAPER = ["--compression", "paper"]
ROWS = {
    "eager full fine-tune": ("eager", [], "full"),
    "slimfit default": ("slimfit", [], "slimfit"),
    "slimfit, full optimizer state": ("slimfit", FULL_STATE, "slimfit"),
    "slimfit, paper's norm pruning": ("slimfit", PAPER, "slimfit"),
    "slimfit, paper's norm pruning, full optimizer state": ("slimfit", [*PAPER, *FULL_STATE], "slimfit"),
    "slimfit freezing only": ("slimfit", ["--compression", "off", *FULL_STATE], "slimfit"),
    "LoRA r=8 (peft)": ("lora", [], "lora"),
    "slimfit, Q/K/V int8 alone": ("slimfit", ["--compression", "only-qkv_bits", *FULL_STATE], "slimfit"),
    "slimfit, Q/K/V int8 per-row scale alone": ("slimfit", ["--compression", "only-qkv_bits-row", *FULL_STATE],
                                                "slimfit"),
    "slimfit, softmax uint8 alone": ("slimfit", ["--compression", "only-softmax_bits", *FULL_STATE], "slimfit"),
    "slimfit, attention output int8 alone": ("slimfit", ["--compression", "only-attention_out_bits", *FULL_STATE],
                                             "slimfit"),
    "slimfit, GELU input 4-bit alone": ("slimfit", ["--compression", "only-gelu_input_bits", *FULL_STATE], "slimfit"),
    "slimfit, GELU output 8-bit alone": ("slimfit", ["--compression", "only-gelu_output_bits", *FULL_STATE],
                                         "slimfit"),
    "slimfit, frozen LayerNorm top 10% alone": ("slimfit", ["--compression", "only-layernorm_keep", *FULL_STATE],
                                                "slimfit"),
    "slimfit, frozen norms float8 alone": ("slimfit", ["--compression", "only-layernorm_bits", *FULL_STATE],
                                           "slimfit"),
    "LISA (2 blocks, every 20 steps)": ("slimfit", ["--schedule", "lisa", "--compression", "off", *FULL_STATE],
                                        "slimfit"),
    "slimfit, bf16 frozen optimizer state": ("slimfit", ["--optimizer-state", "bf16"], "slimfit"),
}
REFERENCE = "eager full fine-tune"
# What users pick instead: every slimfit row is also paired with it, seed by seed.
LORA = "LoRA r=8 (peft)"
# What a compressed kind alone costs: against the same freezing with nothing compressed.
FREEZING_ONLY = "slimfit freezing only"
DEFAULT = "slimfit default"
FULL_STATE_DEFAULT = "slimfit, full optimizer state"
# Rows that change one setting of another row, and that row: packing the frozen
# layers' optimizer state (the default's int8, bf16) against the default with
# the state kept whole; the paper's norm pruning against the default's float8
# norms, with each optimizer state.
VARIES = {
    DEFAULT: FULL_STATE_DEFAULT,
    "slimfit, bf16 frozen optimizer state": FULL_STATE_DEFAULT,
    "slimfit, paper's norm pruning": DEFAULT,
    "slimfit, paper's norm pruning, full optimizer state": FULL_STATE_DEFAULT,
    # the same width with a per-row scale against the paper's fixed point (Q3.4)
    "slimfit, Q/K/V int8 per-row scale alone": "slimfit, Q/K/V int8 alone",
    # LISA's sampled blocks against ILS's choice, both with nothing compressed
    "LISA (2 blocks, every 20 steps)": FREEZING_ONLY,
}
# Each task's kinds are those "paper" compresses on its model (the report's pass
# counters): MiniLM with attention dropout saves the softmax output, the digits ViT
# (no attention dropout, fused attention) the attention output instead.
_COMMON = ["eager full fine-tune", "slimfit default", FULL_STATE_DEFAULT, "slimfit, paper's norm pruning",
           "slimfit, paper's norm pruning, full optimizer state", "slimfit freezing only",
           LORA, "slimfit, Q/K/V int8 alone", "slimfit, Q/K/V int8 per-row scale alone"]
TASKS = {
    "bbc": dict(
        title="Accuracy side by side (BBC News)", section="accuracy", epochs=3,
        args=["--task", "text", "--batch-size", "16", "--lr-schedule", "linear", "--backend", "inductor"],
        lrs={"full": 1e-4, "slimfit": 3e-4, "lora": 1e-3},
        rows=[*_COMMON, "slimfit, softmax uint8 alone", "slimfit, GELU input 4-bit alone",
              "slimfit, GELU output 8-bit alone", "slimfit, frozen LayerNorm top 10% alone",
              "slimfit, frozen norms float8 alone", "LISA (2 blocks, every 20 steps)", "slimfit, bf16 frozen optimizer state"],
        about="all-MiniLM-L6-v2 (pretrained) with a fresh 5-class head on BBC News, batch 16, seq 128, "
              "AdamW with linear decay to 0; slimfit rows compile with inductor, ILS re-ranks after every "
              "step with 90% of the layers frozen and the fresh head always training"),
    "digits": dict(
        title="Accuracy side by side (digits, ViT from random init)", section="accuracy-digits", epochs=8,
        args=["--task", "digits", "--batch-size", "64", "--lr-schedule", "linear", "--backend", "aot_eager"],
        lrs={"full": 3e-3, "slimfit": 3e-3, "lora": 3e-3},
        rows=[*_COMMON, "slimfit, attention output int8 alone", "slimfit, GELU input 4-bit alone",
              "slimfit, frozen LayerNorm top 10% alone", "LISA (2 blocks, every 20 steps)",
              "slimfit, bf16 frozen optimizer state"],
        about="scikit-learn's digits (1,438 train / 359 test 8x8 images, stratified per seed), a ViT "
              "(patch 4, hidden 64, 3 layers, 4 heads, MLP 128) trained from random init: no checkpoint "
              "exists, so every row starts from scratch; batch 64, AdamW with linear decay to 0; slimfit "
              "rows compile with aot_eager, ILS re-ranks after every step with 90% of the layers frozen "
              "and the head always training"),
}


def row_argv(task: str, row: str, seed: int, epochs: int) -> list[str]:
    """`slimfit-fx finetune`'s arguments for one (row, seed) of `task`."""
    method, extra, lr = ROWS[row]
    spec = TASKS[task]
    return ["finetune", *spec["args"], "--method", method, "--epochs", str(epochs),
            "--lr", str(spec["lrs"][lr]), *extra, "--seed", str(seed), "--no-progress"]


def is_kept(argv: list[str], out: Path) -> bool:
    kept = out / "argv.json"
    return kept.exists() and json.loads(kept.read_text()) == argv and (out / "metrics.json").exists()


def run_one(argv: list[str], out: Path) -> dict:
    """The metrics of `argv`'s run in `out`: read back if `out` holds a finished run
    of the same arguments, else run in a process of its own."""
    kept = out / "argv.json"
    if not is_kept(argv, out):
        kept.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(out / "log.txt", "w") as log:
            subprocess.run([sys.executable, "-m", "slimfit_fx", *argv, "--out", str(out)], env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
        kept.write_text(json.dumps(argv))  # written last: only a finished run is reused
    metrics = json.loads((out / "metrics.json").read_text())
    return next(v for k, v in metrics.items() if k != "files")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than 2 values)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def paired_difference(results: dict[int, float], reference: dict[int, float]) -> list[float]:
    """Per-seed differences in points for the seeds both hold, in seed order."""
    return [100 * (results[s] - reference[s]) for s in sorted(results) if s in reference]


def _pm(mean: float, se: float, sign: bool = False) -> str:
    mean = round(mean, 2) + 0.0  # a sum that cancels to -1e-17 reads +0.00, not -0.00
    value = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return value if math.isnan(se) else f"{value} ± {se:.2f}"


def _vs(diffs: list[float]) -> str:
    return _pm(*mean_se(diffs), sign=True) + f" ({len(diffs)} paired)" if diffs else "no paired seed"


def _loss_diffs(done: dict[int, dict], other: dict[int, dict]) -> list[float]:
    """Per-seed differences in test loss (x1000) over the seeds both runs recorded it for."""
    losses = {s: m["test_loss"] for s, m in other.items() if "test_loss" in m}
    return [1000 * (done[s]["test_loss"] - losses[s]) for s in sorted(done) if s in losses and "test_loss" in done[s]]


def _vs_loss(done: dict[int, dict], other: dict[int, dict]) -> str:
    """The paired difference in test loss, to put beside the accuracy's; "" where
    no seed has it on both sides (runs from before test_loss)."""
    diffs = _loss_diffs(done, other)
    return f"; loss {_pm(*mean_se(diffs), sign=True)}" if diffs else ""


def interval95(diffs: list[float]) -> tuple[float, float] | None:
    """The 95% interval of the mean of `diffs` (Student's t with len - 1 degrees of
    freedom: over few seeds far wider than 2 standard errors); None under 2 values."""
    if len(diffs) < 2:
        return None
    mean, se = mean_se(diffs)
    t = stats.t.ppf(0.975, len(diffs) - 1)
    return mean - t * se, mean + t * se


def p_value(diffs: list[float]) -> float:
    """Two-sided p of a paired mean difference from 0 (Student's t); nan under 2
    values or with the same difference on every seed (no spread to test against)."""
    if len(diffs) < 2 or mean_se(diffs)[1] < 1e-12:
        return math.nan
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of p-values tested together: calling those under
    0.05 a real difference keeps the chance of any false alarm among them at 5%.
    nan p-values are left out of the count and stay nan."""
    tested = sorted((name for name, p in pvalues.items() if not math.isnan(p)), key=pvalues.get)
    adjusted, running = {name: math.nan for name in pvalues}, 0.0
    for rank, name in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def _verdict(row: str, diffs: list[float]) -> str:
    """How `row`'s paired difference from the row it varies compares with its
    standard error."""
    mean, se = mean_se(diffs)
    if math.isnan(se):
        where = "one seed, no standard error"
    elif abs(mean) <= se:
        where = "within one standard error"
    else:
        where = f"a {'loss' if mean < 0 else 'gain'} beyond one standard error"
        if se > 1e-9:  # equal differences on every seed have none to divide by
            where += f" ({abs(mean) / se:.1f} SE)"
    return f"{row.removeprefix('slimfit, ')} {_vs(diffs)}, {where}"


def _signed(count: int) -> str:
    return f"{count:+d}" if count else "0"


def _against(title: str, pairs: list[tuple[str, dict[int, float], dict[int, float], list[float], list[float]]],
             test: int) -> list[str]:
    """Each row against the row it is compared with, seed by seed in test
    examples, with the paired mean, its 95% interval, its p and that p
    Holm-adjusted over the rows tested together here (rows leaning on the same
    runs, as every kind on freezing only's: among several, one interval that
    leaves out 0 by chance is no surprise). `pairs` holds (label, the row's
    accuracy per seed, the compared row's, the paired differences in points,
    the paired test-loss differences)."""
    adjusted = holm({label: p_value(diffs) for label, _, _, diffs, _ in pairs})
    seeds = sorted({s for _, accuracies, base, _, _ in pairs for s in accuracies if s in base})
    lines = [f"{title}, paired: per seed in test examples right (net), the mean in points, and "
             f"p Holm-adjusted over the {len(pairs)} row{'s' * (len(pairs) != 1)} compared here (test loss x1000, "
             "paired):", "",
             "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | points (mean ± SE) | 95% interval | p | "
             "p, Holm | test loss (mean ± SE) |",
             "|---|" + "---:|" * (len(seeds) + 5)]
    for label, accuracies, base, diffs, loss_diffs in pairs:
        cells = [_signed(round(test * (accuracies[s] - base[s]))) if s in accuracies and s in base else ""
                 for s in seeds]
        bounds = interval95(diffs)
        interval = "" if bounds is None or bounds[1] - bounds[0] < 1e-9 else f"{bounds[0]:+.2f} to {bounds[1]:+.2f}"
        p, held = p_value(diffs), adjusted[label]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_vs(diffs)} | "
                     f"{interval} | {'' if math.isnan(p) else f'{p:.3f}'} | "
                     f"{'' if math.isnan(held) else f'{held:.3f}'} | "
                     f"{_pm(*mean_se(loss_diffs), sign=True) if loss_diffs else ''} |")
    return lines


def _has(args: list[str], part: list[str]) -> bool:
    return any(args[i:i + len(part)] == part for i in range(len(args)))


def table(runs: dict[str, dict[int, dict]], rows: list[str], seeds: list[int], task: str, epochs: int) -> str:
    """The markdown table of `runs[row][seed]` (finetune metrics) and each row's command."""
    def accuracies_of(name: str) -> dict[int, float]:
        return {s: m["accuracy"] for s, m in runs.get(name, {}).items()}

    def pair(label: str, row: str, other: str, diffs: list[float]) -> tuple:
        """One row of an `_against` table: `row`'s runs against `other`'s, shown as `label`."""
        return label, accuracies_of(row), accuracies_of(other), diffs, _loss_diffs(runs[row], runs.get(other, {}))

    reference, freezing, lora = accuracies_of(REFERENCE), accuracies_of(FREEZING_ONLY), accuracies_of(LORA)
    lines = ["| row | seeds | accuracy % (mean ± SE) | test loss x1000 (mean ± SE) | "
             "vs full fine-tune, points (paired mean ± SE) | "
             "vs freezing only, points (paired) | vs the row it varies, points (paired) | train s (mean) | "
             "peak RSS MiB (max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts, kinds, contenders, varying = [], [], [], []
    for row in rows:
        done = runs.get(row, {})
        if not done:
            lines.append(f"| {row} | 0 of {len(seeds)} | not run | | | | | | |")
            continue
        accuracy = mean_se([100 * m["accuracy"] for m in done.values()])
        accuracies = {s: m["accuracy"] for s, m in done.items()}
        losses = [1000 * m["test_loss"] for m in done.values() if "test_loss" in m]
        loss = _pm(*mean_se(losses)) if losses else ""
        vs = ("reference" if row == REFERENCE else
              _vs(paired_difference(accuracies, reference)) + _vs_loss(done, runs.get(REFERENCE, {})))
        vs_freezing = ""  # only slimfit rows with the same ILS freezing and state compare with it
        args = ROWS[row][1]
        if row != FREEZING_ONLY and ROWS[row][0] == "slimfit" and "--schedule" not in args and _has(args, FULL_STATE):
            diffs = paired_difference(accuracies, freezing)
            vs_freezing = _vs(diffs) + _vs_loss(done, runs.get(FREEZING_ONLY, {}))
            if diffs:
                kinds.append(pair(row.removeprefix("slimfit, "), row, FREEZING_ONLY, diffs))
        if ROWS[row][0] == "slimfit" and (diffs := paired_difference(accuracies, lora)):
            contenders.append(pair(row.removeprefix("slimfit, "), row, LORA, diffs))
        vs_varied = ""  # only a row that changes one setting of another row
        if row in VARIES:
            varied = accuracies_of(VARIES[row])
            diffs = paired_difference(accuracies, varied)
            name = VARIES[row].removeprefix("slimfit, ")
            vs_varied = f"{_vs(diffs)}{_vs_loss(done, runs.get(VARIES[row], {}))} vs {name}"
            if diffs:
                verdicts.append(_verdict(row, diffs) + f" against {name}")
                varying.append(pair(f"{row.removeprefix('slimfit, ')} vs {name}", row, VARIES[row], diffs))
        seconds = statistics.fmean(m["train_seconds"] for m in done.values())
        peak = max(m["peak_rss_bytes"] for m in done.values()) / 2**20
        lines.append(f"| {row} | {len(done)} of {len(seeds)} | {_pm(*accuracy)} | {loss} | {vs} | {vs_freezing} | "
                     f"{vs_varied} | {seconds:.0f} | {peak:,.0f} |")
    any_run = next((m for done in runs.values() for m in done.values()), None)
    if any_run is not None:
        test = any_run["test_articles"]
        lines += ["", f"{epochs} epochs. One test example is {100 / test:.2f} points ({test} test examples). "
                  "Seeds: " + " ".join(map(str, seeds)) + ". Test loss: the mean cross-entropy over the test "
                  "examples, x1000 (lower is better); \"loss\" after a paired difference in points is the paired "
                  "difference in it, over the seeds whose runs recorded it."]
    if verdicts:
        lines += ["", "Against the row each varies (paired): " + "; ".join(verdicts) + "."]
    if varying:
        lines += ["", *_against("Against the row each varies", varying, any_run["test_articles"])]
    if kinds:
        lines += ["", *_against("Against freezing only", kinds, any_run["test_articles"])]
    if contenders:
        lines += ["", *_against(f"Against {LORA}", contenders, any_run["test_articles"])]
    lines += ["", "Each row's command, per seed S (`slimfit-fx finetune` is `python -m slimfit_fx finetune`):", ""]
    for row in rows:
        argv = row_argv(task, row, 0, epochs)
        argv[argv.index("--seed") + 1] = "S"
        lines.append(f"* {row}: `slimfit-fx {shlex.join(argv)}`".replace("'S'", "S"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=tuple(TASKS), default="bbc")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(7)))
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=None,
                        help="rows to run, in this order within each seed (default: the task's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's (bbc 3, digits 8)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each run directory under DIR/<task>/<row>/seed-N; a run already kept "
                             "with the same arguments is read back, not rerun")
    parser.add_argument("--section", default=None,
                        help="the docs/benchmarks.md section to write (default: the task's); a table of some "
                             "rows (--rows) in a section of its own leaves the task's full table in place")
    parser.add_argument("--kept-only", action="store_true",
                        help="run nothing: write the table from the runs --keep holds")
    args = parser.parse_args()
    spec = TASKS[args.task]
    epochs = args.epochs or spec["epochs"]
    rows = args.rows or spec["rows"]
    if args.kept_only and not args.keep:
        parser.error("--kept-only reads the runs --keep DIR holds; give --keep")
    if args.kept_only:  # the section names the command that runs the table, not the one reading it
        sys.argv.remove("--kept-only")
    runs: dict[str, dict[int, dict]] = {}
    folder = args.task + _other_epochs(spec, epochs)
    for seed in args.seeds:
        for row in rows:
            argv = row_argv(args.task, row, seed, epochs)
            slug = "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-")
            with (nullcontext(args.keep / folder / slug / f"seed-{seed}") if args.keep
                  else tempfile.TemporaryDirectory()) as out:
                if args.kept_only and not is_kept(argv, Path(out)):
                    continue
                runs.setdefault(row, {})[seed] = run_one(argv, Path(out))
            if not args.kept_only:  # written after every run: a cut-short run keeps what it measured
                report(spec, runs, rows, args, epochs)
    if args.kept_only:
        report(spec, runs, rows, args, epochs)


def report(spec: dict, runs: dict[str, dict[int, dict]], rows: list[str], args, epochs: int) -> None:
    body = spec["about"] + ".\n\n" + table(runs, rows, args.seeds, args.task, epochs)
    print(body, flush=True)
    other = _other_epochs(spec, epochs)
    section = args.section or spec["section"] + other
    title = spec["title"] + other.replace("-", " ").replace(" ", ", ", 1)
    write_section(section, title + (f" ({section})" if args.section else ""), body)


def _other_epochs(spec: dict, epochs: int) -> str:
    """"" at the task's epoch count, else "-N-epochs": another count gets a section and
    a --keep folder of its own, so it never replaces the task's runs."""
    return "" if epochs == spec["epochs"] else f"-{epochs}-epochs"


if __name__ == "__main__":
    main()
