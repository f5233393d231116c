"""Total memory a fine-tuning step costs on CPU, per contender, and where slimfit's peak goes.

    python benchmarks/contenders.py [--cases NAME ...] [--contenders NAME ...]
                                    [--steps 2] [--warmup 2] [--backend inductor|aot_eager]

Cases: BERT-base at the paper's GLUE shape (bs 32, seq 128) and a larger one
(bs 32, seq 384); on request a Llama-style LM (`llama-base bs8 seq128`: RMSNorm,
SwiGLU, RoPE, 12 query heads sharing 4 kv heads, hidden 768, 12 layers,
vocabulary 32000); random init, dropout 0.1 (as users train), fp32. Every
contender runs in its own process, so no peak mixes with another's, and every
parameter has optimizer state before the first step (as after every layer has
trained once), so all sides pay the same optimizer: AdamW, or torchao's 8-bit
AdamW in the rows that say so (`pip install -e '.[bench]'`), which are compared
with eager on that optimizer too. slimfit's default packs the AdamW moments
of the layers frozen for the next step in 8 bits (`optimizer_state="int8"`)
and stores frozen norms' x_hat in float8 (`compression="norms-float8"`); the
rows that say "paper compression" prune those norms to their top 10% per row
as the paper does (`compression="paper"`, the default before "norms-float8"),
the rows that say "full optimizer state" keep the moments whole
(`optimizer_state="full"`, the default before "int8"), and so do the
fixed-set rows, which compare how activations are stored. Total peak: the process's
highest resident set size over the timed steps (the kernel's VmHWM, reset
through /proc/self/clear_refs, so nothing samples and nothing competes with
the step) minus the resident size before the model was built. The breakdown
splits it by phase: resident before a step (weights, optimizer state, the
rest: compiled code and Python objects), the forward's rise (what it keeps for
backward: saved activations, with the bytes autograd packs beside it) and its
transients, the backward's peak (gradients plus transients) and the
optimizer step's rise: the state slimfit unpacks for the layers about to
train (their moments in float32 while they step, packed again once their
layers freeze) and the other temporaries. "saved for backward" is bytes held from forward to
backward (saved-tensor hooks; slimfit's own count), not what the process pays.
Step times are medians of the timed steps. Writes one section per case to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from doc import write_section
from processes import run_child

MIB = 2**20
CASES: dict[str, tuple[str, dict]] = {
    "bert-base bs32 seq128": ("bert-base", dict(batch=32, seq=128)),
    "bert-base bs32 seq384": ("bert-base", dict(batch=32, seq=384)),
    "bert-base bs128 seq128": ("bert-base", dict(batch=128, seq=128)),  # on request: eager peaks near 16 GiB
    "llama-base bs8 seq128": ("llama-base", dict(batch=8, seq=128)),  # RMSNorm, SwiGLU, RoPE, GQA; on request
    "bert-tiny bs2 seq12": ("bert-tiny", {}),  # the tests' smoke case, not in the default list
}
DEFAULT_CASES = list(CASES)[:2]


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "eager", "torch.compile" or "slimfit"
    frozen: bool = False  # a fixed seeded 90% set (eager: requires_grad=False; slimfit: schedule="manual")
    options: dict = field(default_factory=dict)  # slimfit_fx.compile overrides
    memory_budget: float | None = None  # torch.compile's activation_memory_budget
    optimizer: str = "adamw"  # "adamw" or "adamw8bit" (torchao)
    checkpointing: bool = False  # HF gradient_checkpointing_enable() (non-reentrant) before compiling


# The frozen layers' AdamW state kept whole, as it was by default before
# optimizer_state="int8": what the fixed-set rows compare activations under.
FULL_STATE = dict(optimizer_state="full")
# The paper's pruning of frozen norms, the default before "norms-float8": every
# row but the default names the compression it runs.
PAPER = dict(compression="paper")
CONTENDERS = {c.name: c for c in (
    Contender("eager, full fine-tune", "eager"),
    Contender("eager, slimfit's frozen set", "eager", frozen=True),
    Contender("torch.compile", "torch.compile"),
    Contender("torch.compile, memory budget 0.1", "torch.compile", memory_budget=0.1),
    Contender("slimfit default (ILS every step)", "slimfit"),
    Contender("slimfit, paper compression (ILS every step)", "slimfit", options=PAPER),
    Contender("slimfit, paper compression, full optimizer state (ILS every step)", "slimfit",
              options=dict(**PAPER, **FULL_STATE)),
    Contender("slimfit, fixed set, compression off", "slimfit", frozen=True,
              options=dict(compression="off", **FULL_STATE)),
    Contender("slimfit, fixed set, paper", "slimfit", frozen=True, options=dict(**PAPER, **FULL_STATE)),
    Contender("slimfit, fixed set, extended", "slimfit", frozen=True,
              options=dict(compression="extended", **FULL_STATE)),
    Contender("slimfit, fixed set, paper + memory budget 0.1", "slimfit", frozen=True,
              options=dict(activation_memory_budget=0.1, **PAPER, **FULL_STATE)),
    Contender("eager, full fine-tune, 8-bit AdamW", "eager", optimizer="adamw8bit"),
    Contender("slimfit, paper compression, 8-bit AdamW", "slimfit", optimizer="adamw8bit", options=PAPER),
    Contender("eager, full fine-tune, gradient checkpointing", "eager", checkpointing=True),
    Contender("slimfit, paper compression, full optimizer state, gradient checkpointing", "slimfit",
              checkpointing=True, options=dict(**PAPER, **FULL_STATE)),
)}
# Rows measured on request (--contenders): checkpointing trades a forward's
# recompute for memory, a different bargain from the default rows'.
ON_REQUEST = ("eager, full fine-tune, gradient checkpointing",
              "slimfit, paper compression, full optimizer state, gradient checkpointing")
RATIO = 0.9
STATUS = Path("/proc/self/status")


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def reset_peak() -> None:
    """Set the kernel's high-water mark (VmHWM) to the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def _state_bytes(optimizer) -> int:
    """Bytes of optimizer state, counting a tensor subclass (8-bit states) by its parts
    and slimfit's packed frozen-layer state (optimizer_state="int8") at its packed size."""
    import torch

    from slimfit_fx.optimizer_state import PackedState

    def nbytes(t: torch.Tensor) -> int:
        if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter):
            return t.untyped_storage().nbytes()
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)

    return sum(v.nbytes if isinstance(v, PackedState) else nbytes(v)
               for s in optimizer.state.values() for v in s.values() if isinstance(v, (torch.Tensor, PackedState)))


def step_measuring_state(optimizer) -> tuple[int, int]:
    """optimizer.step(): the process's peak over it and the bytes of state slimfit
    unpacked for it (the moments of the layers about to train, float32 while they
    step). The state is read where the update reads it: an optimizer's own
    pre-hooks run after the global ones, in which slimfit unpacks."""
    before, in_step = _state_bytes(optimizer), []
    hook = optimizer.register_step_pre_hook(lambda *_: in_step.append(_state_bytes(optimizer)))
    try:
        reset_peak()
        optimizer.step()
        return peak(), max(in_step[0] - before, 0)
    finally:
        hook.remove()


def run_one(case: str, name: str, steps: int, warmup: int, backend: str = "inductor") -> dict:
    """One contender on one case, in this process: the numbers of its rows."""
    import torch

    import slimfit_fx
    from slimfit_fx import capture, zoo
    from slimfit_fx.finetune import seeded_frozen_set
    from slimfit_fx.layers import find_layers
    from slimfit_fx.memory import eager_frozen, run_counting_saved_bytes

    contender = CONTENDERS[name]
    if contender.optimizer == "adamw8bit":
        try:  # imported before the baseline: code, not memory a step costs
            from torchao.optim import AdamW8bit
        except ImportError as err:
            raise SystemExit(f"not run: torchao is not installed ({err}); pip install -e '.[bench]'") from err
    zoo_name, kwargs = CASES[case]
    zoo.build(zoo_name, seed=0, **kwargs)  # imports the model's code; the baseline counts no module import
    baseline = rss()
    model, batch = zoo.build(zoo_name, seed=0, **kwargs)
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    if contender.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen = seeded_frozen_set(find_layers(model), RATIO, seed=0) if contender.frozen else []
    optimizer = (AdamW8bit if contender.optimizer == "adamw8bit" else torch.optim.AdamW)(
        model.parameters(), lr=1e-5)
    for p in model.parameters():  # state for every parameter, before any schedule watches steps
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    budget = capture.memory_budget(contender.memory_budget) if contender.memory_budget else None
    if contender.kind == "eager":
        module = model
    elif contender.kind == "torch.compile":
        module = torch.compile(model, backend=backend)
    else:
        options = dict(contender.options, backend=backend)
        if contender.frozen:
            options["schedule"] = "manual"
        module = slimfit_fx.compile(model, **options)
        if contender.frozen:
            module.slimfit.set_frozen(frozen)
    is_slimfit = isinstance(module, slimfit_fx.SlimFitModule)
    resident_inputs = (*model.parameters(), *model.buffers(), *batch.values())

    rows, seconds = [], []
    with eager_frozen(model, frozen if contender.kind == "eager" else ()), budget or nullcontext():
        for i in range(warmup + steps):
            resident = rss()
            start = time.perf_counter()
            reset_peak()
            if is_slimfit:  # it counts its own saved bytes; an outer hook would see fake tensors while it compiles
                output, saved = module(**batch).loss, None
            else:
                output, saved = run_counting_saved_bytes(lambda: module(**batch).loss, resident=resident_inputs)
            forward_peak, after_forward = peak(), rss()
            reset_peak()
            output.backward()
            del output
            backward_peak, after_backward = peak(), rss()
            grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
            optimizer_peak, state_unpacked = step_measuring_state(optimizer)
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
            rows.append(dict(resident=resident, forward_peak=forward_peak, after_forward=after_forward,
                             backward_peak=backward_peak, after_backward=after_backward,
                             optimizer_peak=optimizer_peak, grads=grads,
                             state_unpacked=state_unpacked,
                             saved=module.slimfit.saved_bytes if is_slimfit else saved))
    timed = rows[warmup:]
    worst = max(timed, key=lambda r: max(r["forward_peak"], r["backward_peak"], r["optimizer_peak"]))
    median = statistics.median(seconds[warmup:])
    result = {k: v - baseline if k not in ("grads", "saved", "state_unpacked") else v for k, v in worst.items()}
    result.update(
        total_peak=max(worst["forward_peak"], worst["backward_peak"], worst["optimizer_peak"]) - baseline,
        weights=weights, optimizer_state=_state_bytes(optimizer), step_s=median,
        saved_median=statistics.median(r["saved"] for r in timed),
        compile_s=(module.slimfit.stats["compile_seconds"] if is_slimfit
                   else None if contender.kind == "eager" else seconds[0] - median),
    )
    return result


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def _ratio(base, row: dict) -> str:
    return f"{base['total_peak'] / row['total_peak']:.2f}x" if isinstance(base, dict) else "-"


def table(case: str, rows: dict[str, dict | str]) -> str:
    """Total peak per contender, against eager with AdamW and against eager with
    the contender's own optimizer (the fair ratio for the 8-bit AdamW rows)."""
    eager = {c.optimizer: rows.get(c.name) for c in CONTENDERS.values()
             if c.kind == "eager" and not c.frozen and not c.checkpointing}
    lines = [f"### {case}", "",
             "| contender | total peak MiB | vs eager (AdamW) | vs eager, same optimizer | resident before a "
             "step MiB | step above it MiB | saved for backward MiB | median step s | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} |" + " |" * 7)
            continue
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(f"| {name} | {_mib(r['total_peak'])} | {_ratio(eager['adamw'], r)} | "
                     f"{_ratio(eager[CONTENDERS[name].optimizer], r)} | {_mib(r['resident'])} | "
                     f"{_mib(r['total_peak'] - r['resident'])} | {r['saved_median'] / MIB:,.1f} | "
                     f"{r['step_s']:.2f} | {compile_s} |")
    return "\n".join(lines)


def breakdown(rows: dict[str, dict | str]) -> str:
    """Where each contender's peak goes, phase by phase (MiB above the resident size before the model).
    The optimizer step's rise splits into the trained layers' state unpacked for
    it (slimfit's packed moments, float32 while their layer steps) and the rest."""
    lines = ["| contender | weights | optimizer state | rest of resident | forward keeps | forward transients "
             "| backward peak above resident | grads | state unpacked for the step | other optimizer temporaries "
             "| total peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if isinstance(r, str):
            continue
        lines.append(" | ".join([
            f"| {name}", _mib(r["weights"]), _mib(r["optimizer_state"]),
            _mib(r["resident"] - r["weights"] - r["optimizer_state"]),
            _mib(r["after_forward"] - r["resident"]), _mib(r["forward_peak"] - r["after_forward"]),
            _mib(r["backward_peak"] - r["resident"]), _mib(r["grads"]),
            _mib(r["state_unpacked"]), _mib(r["optimizer_peak"] - r["after_backward"] - r["state_unpacked"]),
            _mib(r["total_peak"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # freed tensors leave the RSS at once
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")  # every compile time is a cold one
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS),
                        default=[c for c in CONTENDERS if c not in ON_REQUEST])
    parser.add_argument("--section", help="docs/benchmarks.md section to write (default: one per case, "
                                          "contenders-<case>); name another to keep a subset's table apart")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the worst one's peak is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (compiles happen here)")
    parser.add_argument("--no-doc", action="store_true", help="print the tables; leave docs/benchmarks.md")
    parser.add_argument("--backend", choices=("inductor", "aot_eager"), default="inductor",
                        help="the compiled contenders' backend; aot_eager skips inductor's code generation "
                             "(a quick check of the script: peaks and times are not a user's run)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend != "inductor" and not (args.no_doc or args.child):
        parser.error("--backend aot_eager is a quick check of the script, not figures for the docs: add --no-doc")
    if args.child:
        print(json.dumps(run_one(*args.child, steps=args.steps, warmup=args.warmup, backend=args.backend)))
        return
    for case in args.cases:
        rows: dict[str, dict | str] = {}
        for name in args.contenders:
            rows[name] = run_child([sys.executable, __file__, "--child", case, name, "--steps", str(args.steps),
                                    "--warmup", str(args.warmup), "--backend", args.backend])
            print(f"{case} | {name}: {rows[name]}", flush=True)
        print(table(case, rows) + "\n\nWhere the peak goes (MiB):\n\n" + breakdown(rows), flush=True)
        if not args.no_doc:  # one section per case, written as soon as it is measured
            name = args.section or f"contenders-{case.replace(' ', '-')}"
            write_section(name, f"Total memory per contender: {case}" + (f" ({args.section})" if args.section else ""),
                          section(case, rows, args.steps, args.warmup))


def section(case: str, rows: dict[str, dict | str], steps: int, warmup: int) -> str:
    """The docs section of one case: how it was measured, the table, the breakdown."""
    how = __doc__.split("\n\n", 2)[2].strip()
    return (f"{how}\n\nslimfit freezes {RATIO:.0%} of the layers; the fixed-set rows use one seeded draw (the "
            f"head trains), the ILS rows re-rank after every optimizer step. Warm-up {warmup} steps, "
            f"{steps} timed; each row is its timed step with the highest peak.\n\n{table(case, rows)}"
            f"\n\nWhere the peak goes (MiB):\n\n{breakdown(rows)}")


if __name__ == "__main__":
    main()
