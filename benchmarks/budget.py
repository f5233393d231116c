"""A byte budget kept: measured total peak against `memory_budget` and the predicted peak.

    python benchmarks/budget.py [--cases NAME ...] [--steps 6] [--warmup 2]

Each case first runs a probe (its own process, a budget nothing exceeds) that
reads the prediction's terms, then picks two budgets between the floor (95%
frozen, int8 optimizer state) and the peak of training every layer: 35% and
80% of the way up. Each budget runs in a process of its own:
`slimfit_fx.compile(model, memory_budget=B, compression=C)` (`--compression`:
"paper", the paper's norm pruning, by default, as the tables below it in the
docs ran; the prediction reads the compiled regions' own saved bytes, whatever
the compression), then AdamW on it, warm-up steps
(the first compiles; by their end every layer has trained and holds optimizer
state), then timed steps. Measured peak: the process's highest resident set
size over the timed steps (the kernel's VmHWM, reset through
/proc/self/clear_refs before each forward and each optimizer step) minus its
resident size before the model was built, with MALLOC_MMAP_THRESHOLD_=65536 so
freed tensors leave the resident set at once. "warm-up peak" is the peak up to
the end of the warm-up (compiling included). "predicted for the sets trained"
is the largest prediction for a set the schedule trained after the choice
(`cm.slimfit.fit.sets_peak`): where each step's set is capped at the budget,
"predicted" is the cap, which bounds any set, and this is what the sets that ran
were predicted to need.
Writes the table to docs/benchmarks.md (section budget).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from doc import write_section
from processes import run_child

MIB = 2**20
CASES: dict[str, tuple[str, dict]] = {
    "minilm bs8 seq128": ("minilm", dict(batch=8, seq=128)),
    "llama-small bs8 seq128": ("llama-small", dict(batch=8, seq=128)),
    "bert-base bs32 seq128": ("bert-base", dict(batch=32, seq=128)),
}
DEFAULT_CASES = list(CASES)[:2]
SHARES = (0.35, 0.8)  # where each budget sits between the floor and training every layer
STATUS = Path("/proc/self/status")


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def llama_small(seed: int = 0, batch: int = 8, seq: int = 128):
    """A small Llama (RMSNorm, SwiGLU, RoPE, 4 query heads sharing 2 kv heads):
    hidden 256, 4 layers, SwiGLU 688, vocabulary 8000 (6.9M parameters), random init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         use_cache=False)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    model = LlamaForCausalLM(config).train()
    model.loss_type = "ForCausalLM"
    return model, {"input_ids": ids, "labels": ids}


def build(name: str, **kwargs):
    from slimfit_fx import zoo

    return llama_small(**kwargs) if name == "llama-small" else zoo.build(name, **kwargs)


def run_one(case: str, memory_budget: int, steps: int, warmup: int, backend: str, compression: str) -> dict:
    """One budget on one case, in this process."""
    import dataclasses

    import torch

    import slimfit_fx
    from slimfit_fx import budget, fitting

    zoo_name, kwargs = CASES[case]
    build(zoo_name, seed=0, **kwargs)  # imports the model's code; the baseline counts no module import
    baseline = rss()
    model, batch = build(zoo_name, seed=0, **kwargs)
    cm = slimfit_fx.compile(model, memory_budget=memory_budget, backend=backend, compression=compression)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-5)
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    phases = []
    for i in range(warmup + steps):
        resident = rss()
        Path("/proc/self/clear_refs").write_text("5")
        loss = cm(**batch).loss
        forward = peak()
        loss.backward()
        del loss
        backward = peak()
        Path("/proc/self/clear_refs").write_text("5")
        optimizer.step()
        step = peak()
        optimizer.zero_grad(set_to_none=True)
        held = cm.slimfit.optimizer_state_bytes(optimizer).held
        phases.append(dict(resident=resident - baseline, forward=forward - baseline,
                               backward=backward - baseline, step=step - baseline,
                               unexplained=resident - baseline - weights - held))
    fit = cm.slimfit.fit
    terms = fit.terms_used
    count = len(terms.layers)
    least = count - int(budget.MAX_FREEZE_RATIO * count)
    top = [max(r["forward"], r["backward"], r["step"]) for r in phases]
    worst = phases[warmup + top[warmup:].index(max(top[warmup:]))]
    masks = cm.slimfit.schedule.history[-steps:]
    return dict(
        measured=max(top[warmup:]), whole_run=max(top[:warmup]),
        # the budget is in force from the step after its final choice (the third forward's)
        after_choice=max(top[fitting.CHOOSE_AT:] or top[-1:]),
        trained_per_step=sum(len(cm.slimfit.layers) - bin(m).count("1") for m in masks) / len(masks),
        phases=worst, residue=fit.residue, prediction=dataclasses.asdict(fit.prediction), sets_peak=fit.sets_peak,
        floor=budget.predict(terms, least, "int8").peak, top=budget.predict(terms, count, "full").peak,
        optimizer_state=cm.slimfit.optimizer_state_bytes(optimizer).held,
        compile_s=cm.slimfit.stats["compile_seconds"])


def table(rows: dict[tuple[str, int], dict | str]) -> str:
    lines = ["| case | budget MiB | freeze ratio | optimizer state | layers trained per timed step | predicted MiB | "
             "measured MiB | measured / predicted | predicted for the sets trained MiB (measured / it) | "
             "within budget | from the choice on MiB (/ predicted) | "
             "warm-up peak (compiling) MiB | residue predicted / measured MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for (case, b), r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {case} | {b / MIB:,.0f} | {r} |" + " |" * 10)
            continue
        p = r["prediction"]
        sets = r.get("sets_peak")
        sets = f"{sets / MIB:,.0f} ({r['measured'] / sets:.2f})" if sets else "-"
        lines.append(f"| {case} | {b / MIB:,.0f} | {p['freeze_ratio']:.3f} ({_trained(p)}/{p['layers']} train) | "
                     f"{p['optimizer_state_packing']} | {r['trained_per_step']:.1f} | {p['peak'] / MIB:,.0f} | "
                     f"{r['measured'] / MIB:,.0f} | {r['measured'] / p['peak']:.2f} | {sets} | "
                     f"{'yes' if max(r['measured'], r['after_choice']) <= b else 'NO'} | "
                     f"{r['after_choice'] / MIB:,.0f} ({r['after_choice'] / p['peak']:.2f}) | "
                     f"{r['whole_run'] / MIB:,.0f} | {r['residue'] / MIB:,.0f} / "
                     f"{r['phases']['unexplained'] / MIB:,.0f} |")
    return "\n".join(lines)


def _trained(p: dict) -> str:
    """How many layers train per step: `trained` to `most_trained` where each
    step's set is capped at the budget."""
    return f"{p['trained']}" if p.get("limit") is None else f"{p['trained']}-{p['most_trained']}"


def parts(rows: dict[tuple[str, int], dict | str]) -> str:
    lines = ["| case | budget MiB | weights | gradients | optimizer state (predicted / held) | saved | overhead |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (case, b), r in rows.items():
        if isinstance(r, str):
            continue
        p = r["prediction"]
        lines.append(f"| {case} | {b / MIB:,.0f} | {p['weights'] / MIB:,.1f} | {p['gradients'] / MIB:,.1f} | "
                     f"{p['optimizer_state'] / MIB:,.1f} / {r['optimizer_state'] / MIB:,.1f} | "
                     f"{p['saved'] / MIB:,.1f} | {p['overhead'] / MIB:,.1f} |")
    return "\n".join(lines)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # freed tensors leave the RSS at once
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=8,
                        help="steps before timing (compiles happen here; every layer trains once)")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--compression", default="paper",
                        help="compile's compression (the budget sections ran \"paper\"; the default is norms-float8)")
    parser.add_argument("--section", default="budget", help="docs/benchmarks.md section to write")
    parser.add_argument("--no-doc", action="store_true", help="print the table; leave docs/benchmarks.md")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend,
              "--compression", args.compression]
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.steps, args.warmup, args.backend,
                                 args.compression)))
        return
    rows: dict[tuple[str, int], dict | str] = {}
    for case in args.cases:
        probe = run_child([sys.executable, __file__, "--child", case, str(2**40), "--steps", "1", "--warmup", "2",
                           "--backend", args.backend, "--compression", args.compression])
        print(f"{case} | probe: {probe}", flush=True)
        if isinstance(probe, str):
            rows[(case, 0)] = probe
            continue
        for share in SHARES:
            b = int(probe["floor"] + share * (probe["top"] - probe["floor"]))
            rows[(case, b)] = run_child([sys.executable, __file__, "--child", case, str(b), *common])
            print(f"{case} | {b / MIB:,.0f} MiB: {rows[(case, b)]}", flush=True)
    text = (f"{__doc__.split(chr(10) * 2, 2)[2].strip()}\n\nBackend {args.backend}, compression "
            f"{args.compression!r}; warm-up {args.warmup} "
            f"steps, {args.steps} timed.\n\n{table(rows)}\n\nThe prediction's parts (MiB):\n\n{parts(rows)}")
    print(text, flush=True)
    if not args.no_doc:
        title = "A byte budget: predicted and measured peak"
        write_section(args.section, title + ("" if args.section == "budget" else f" ({args.section})"), text)


if __name__ == "__main__":
    main()
