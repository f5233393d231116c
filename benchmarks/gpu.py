"""Total GPU memory a fine-tuning step costs, per contender, at the paper's shapes.

    python benchmarks/gpu.py [--out gpu.md] [--budget-s 540] [--cases NAME ...] [--rows gpu.json]
    python benchmarks/gpu.py --smoke        # the same code on CPU at tiny sizes

Cases: BERT-base bs 32 seq 128 (the paper's GLUE shape), ViT-B/16 bs 128 at
224 px, BERT-base bs 128 seq 384 (the paper's SQuAD shape); random init,
dropout 0.1, fp32, AdamW over every parameter. Contenders: eager PyTorch,
torch.compile, torch.compile with activation_memory_budget 0.1, and slimfit's
default `slimfit_fx.compile(model)` (ILS after every optimizer step, 90% of the
layers frozen, the paper's compression with frozen norms in float8, frozen
layers' AdamW state held in 8 bits), and the same with that state kept whole
(`optimizer_state="full"`). Each contender runs in
its own process, so no peak mixes with another's. After `--warmup` steps
(enough for ILS to have trained every layer once, so AdamW holds state for
every parameter, as eager's does) the allocator's cache is emptied, the peak
statistics are reset (so neither the warm-up's nor the compile's blocks count)
and `--steps` steps are timed; the row reports `torch.cuda.max_memory_allocated` and
`max_memory_reserved` over those steps, the memory allocated before them
(weights, optimizer state, anything compiled code keeps), the median step and
the compile time (first step minus the median; slimfit: its own count).
`--smoke` runs tiny models on CPU (peak = the process's max RSS) so this
script is tested before a GPU runs it. The run stops starting contenders when
`--budget-s` is spent and says which it skipped. With `--rows FILE` every
finished row is kept in FILE (JSON) and read back by the next run with the same
file, which runs only what is missing: cold compiles that do not fit one run
(a machine lent 10 minutes a command) finish over two or three.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from processes import run_child

CASES: dict[str, tuple[str, dict]] = {
    "bert-base bs32 seq128": ("bert-base", dict(batch=32, seq=128)),
    "vit-b16 bs128 224px": ("vit-base", dict(batch=128)),
    "bert-base bs128 seq384": ("bert-base", dict(batch=128, seq=384)),
}
SMOKE_CASES: dict[str, tuple[str, dict]] = {
    "bert-tiny bs2 seq12": ("bert-tiny", {}),
    "vit-tiny bs2": ("vit-tiny", {}),
}
CONTENDERS = ("eager", "slimfit", "slimfit, full optimizer state", "torch.compile",
              "torch.compile, memory budget 0.1")
GIB = 2**30
MIB = 2**20
FITS_GIB = 32  # the paper's "fits one 32 GB GPU"


def run_one(case: str, contender: str, steps: int, warmup: int, smoke: bool) -> dict:
    """One contender on one case, in this process: what the table's row says."""
    import torch

    import slimfit_fx
    from slimfit_fx import capture, zoo

    device = torch.device("cpu" if smoke else "cuda")
    name, kwargs = (SMOKE_CASES if smoke else CASES)[case]
    model, batch = zoo.build(name, seed=0, **kwargs)
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    budget = nullcontext()
    if contender == "eager":
        module = model
    elif contender == "slimfit":
        module = slimfit_fx.compile(model)
    elif contender == "slimfit, full optimizer state":
        module = slimfit_fx.compile(model, optimizer_state="full")
    elif contender == "torch.compile":
        module = torch.compile(model)
    elif contender == "torch.compile, memory budget 0.1":
        module, budget = torch.compile(model), capture.memory_budget(0.1)
    else:
        raise ValueError(f"unknown contender {contender!r}; choose one of {CONTENDERS}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = []
    with budget:
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                resident = torch.cuda.memory_allocated() if device.type == "cuda" else None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            module(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[warmup:])
    row = {"step_s": median, "resident": resident}
    if device.type == "cuda":
        row.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
    else:
        row.update(allocated=None, reserved=None,
                   max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if contender == "eager":
        row["compile_s"] = None
    elif contender.startswith("slimfit"):
        row["compile_s"] = module.slimfit.stats["compile_seconds"]
        row["distinct_frozen_sets"] = module.slimfit.schedule.distinct_sets()
    else:
        row["compile_s"] = seconds[0] - median
    return row


def _machine(smoke: bool) -> str:
    import torch
    import transformers

    where = ("CPU smoke run, " + platform.machine()) if smoke else torch.cuda.get_device_name()
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"


def _cell(value, scale: float, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def table(case: str, rows: dict[str, dict | str], smoke: bool) -> str:
    if smoke:
        head = "| contender | max RSS MiB | median step s | compile s |\n|---|---:|---:|---:|"
    else:
        head = ("| contender | max allocated MiB | vs eager | max reserved MiB | "
                f"fits {FITS_GIB} GB | resident MiB | median step s | compile s |\n"
                "|---|---:|---:|---:|:-:|---:|---:|---:|")
    lines = [f"### {case}", "", head]
    eager = rows.get("eager")
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} |" + " |" * (3 if smoke else 7))
            continue
        compile_s = _cell(r["compile_s"], 1, 1)
        if smoke:
            lines.append(f"| {name} | {_cell(r['max_rss'], MIB)} | {r['step_s']:.3f} | {compile_s} |")
            continue
        ratio = (f"{eager['allocated'] / r['allocated']:.2f}x" if isinstance(eager, dict) else "-")
        fits = "yes" if r["reserved"] <= FITS_GIB * GIB else "no"
        lines.append(f"| {name} | {_cell(r['allocated'], MIB)} | {ratio} | {_cell(r['reserved'], MIB)} | "
                     f"{fits} | {_cell(r['resident'], MIB)} | {r['step_s']:.3f} | {compile_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU (what the tests run)")
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before the peak is reset (default 12, so ILS at ratio 0.9 has "
                             "trained every layer; smoke 2)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no contender after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    parser.add_argument("--rows", type=Path, default=None,
                        help="keep finished rows in this JSON file; a row already in it is not rerun")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (1 if args.smoke else 5)
    warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 12)
    if args.child:
        print(json.dumps(run_one(*args.child, steps=steps, warmup=warmup, smoke=args.smoke)))
        return
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on CPU")
    cases = SMOKE_CASES if args.smoke else CASES
    unknown = set(args.cases or ()) - set(cases)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {sorted(cases)}")
    start = time.monotonic()
    kept = json.loads(args.rows.read_text()) if args.rows and args.rows.exists() else {}
    sections = [f"Machine: {_machine(args.smoke)}. Warm-up {warmup} steps, {steps} timed. "
                "`python benchmarks/gpu.py" + (" --smoke" if args.smoke else "") + "`"]
    for case in args.cases or cases:
        rows: dict[str, dict | str] = {}
        for contender in args.contenders:
            key = f"{case} | {contender} | warmup {warmup} steps {steps}"
            if isinstance(kept.get(key), dict):
                rows[contender] = kept[key]
                continue
            left = args.budget_s - (time.monotonic() - start)
            if left <= 0:
                rows[contender] = "not run: time budget spent"
                continue
            command = [sys.executable, __file__, "--child", case, contender,
                       "--steps", str(steps), "--warmup", str(warmup), *(["--smoke"] if args.smoke else [])]
            rows[contender] = run_child(command, timeout=left)
            print(f"{case} | {contender}: {rows[contender]}", flush=True)
            if args.rows and isinstance(rows[contender], dict):
                kept[key] = rows[contender]
                args.rows.write_text(json.dumps(kept, indent=1))
        sections.append(table(case, rows, args.smoke))
        print(sections[-1], flush=True)
        if args.out:  # rewritten after every case: a run cut short keeps what it finished
            args.out.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
