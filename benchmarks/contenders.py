"""Every contender on the same model in the same run: bytes held for backward, RSS, step time.

    python benchmarks/contenders.py [--models bert-base-128 bert-base-384 vit-b16 gpt2-small llama-base-128]
                                    [--steps 10] [--warmup 2] [--ratio 0.9]

Contenders: eager full fine-tune; eager with the encoder (every transformer
block) frozen; eager with slimfit's frozen set; torch.compile default; torch.compile
with activation_memory_budget 0.5 and 0.1; slimfit freeze-only; slimfit freeze +
"paper" compression; slimfit freeze + "extended" compression ("paper" plus the
trainable layers' inputs 8-bit); slimfit freeze + "paper" compression + memory
budget 0.1. Random-init models of real shapes, AdamW, dropout 0 (so compiled and
eager compute the same function). Per contender: bytes autograd saves for backward (saved-tensor hooks,
parameters and inputs excluded), RSS rise from before forward to before backward
(needs MALLOC_MMAP_THRESHOLD_=65536, set by re-running itself), median step time
of `--steps` after `--warmup`, and compile seconds (first step minus the median).
A contender that fails is listed with its error. Writes its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from doc import write_section

import slimfit_fx
from slimfit_fx import capture, zoo
from slimfit_fx.finetune import seeded_frozen_set
from slimfit_fx.layers import find_layers
from slimfit_fx.memory import eager_frozen, run_counting_saved_bytes

MODELS: dict[str, tuple[str, dict]] = {
    "bert-base-128": ("bert-base", dict(batch=8, seq=128)),
    "bert-base-384": ("bert-base", dict(batch=4, seq=384)),
    "vit-b16": ("vit-base", dict(batch=8)),
    "gpt2-small": ("gpt2-small", dict(batch=4, seq=128)),
    "llama-base-128": ("llama-base", dict(batch=8, seq=128)),  # RMSNorm, SwiGLU, RoPE, grouped-query K/V
    "bert-tiny": ("bert-tiny", dict(batch=2, seq=12)),  # a smoke run, not in the default list
}
# The encoder: every numbered transformer block (bert.encoder.layer.3.,
# vit.layers.3., transformer.h.3.), whatever a model's version calls the list.
ENCODER_BLOCK = re.compile(r"\.\d+\.")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@dataclass
class Contender:
    name: str
    module: Callable  # (model, slimfit's frozen set) -> the module to call
    eager_frozen: Callable = lambda model, frozen: ()  # names at requires_grad=False
    memory_budget: float | None = None  # torch.compile's activation_memory_budget
    compiled: bool = True


def _slimfit(compression, budget=None):
    def build(model, frozen):
        cm = slimfit_fx.compile(model, schedule="manual", backend="inductor", compression=compression,
                                memory_budget=budget)
        cm.slimfit.set_frozen(frozen)
        return cm
    return build


def _encoder(model, frozen):
    names = [n for n, _ in model.named_parameters() if ENCODER_BLOCK.search(n)]
    if not names:
        raise ValueError(f"no numbered transformer block in {type(model).__name__}'s parameter names")
    return names


def _plain(model, frozen):
    return model


CONTENDERS = [
    Contender("eager, full fine-tune", _plain, compiled=False),
    Contender("eager, encoder frozen", _plain, eager_frozen=_encoder, compiled=False),
    Contender("eager, slimfit's frozen set", _plain, eager_frozen=lambda m, f: f, compiled=False),
    Contender("torch.compile", lambda model, frozen: torch.compile(model)),
    Contender("torch.compile, memory budget 0.5", lambda model, frozen: torch.compile(model), memory_budget=0.5),
    Contender("torch.compile, memory budget 0.1", lambda model, frozen: torch.compile(model), memory_budget=0.1),
    Contender("slimfit, freeze only", _slimfit("off")),
    Contender("slimfit, freeze + paper compression", _slimfit("paper")),
    Contender("slimfit, freeze + extended compression", _slimfit("extended")),
    Contender("slimfit, freeze + compression + budget 0.1", _slimfit("paper", 0.1)),
]


def measure(contender: Contender, factory: Callable, ratio: float, steps: int, warmup: int) -> dict:
    capture.reset_dynamo()
    model, batch = factory()
    frozen = seeded_frozen_set(find_layers(model), ratio, seed=0)
    module = contender.module(model, frozen)
    resident = (*model.parameters(), *model.buffers(), *batch.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    budget = capture.memory_budget(contender.memory_budget) if contender.memory_budget else nullcontext()
    times, saved, rises = [], [], []
    with eager_frozen(model, contender.eager_frozen(model, frozen)), budget:
        for _ in range(warmup + steps):
            start = time.perf_counter()
            before = rss()
            if isinstance(module, slimfit_fx.SlimFitModule):
                # slimfit counts its own variant with the same hook; an outer hook sees
                # nothing, and would see the fake tensors of a graph traced on first use
                output = module(**batch).loss
                rise = rss() - before
                held = module.slimfit.saved_bytes
            else:
                output, held = run_counting_saved_bytes(lambda: module(**batch).loss, resident=resident)
                rise = rss() - before
            output.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            saved.append(held)
            rises.append(rise)
    median = statistics.median(times[warmup:])
    return {
        "saved": statistics.median(saved[warmup:]),
        "rss": statistics.median(rises[warmup:]),
        "step": median,
        "compile": times[0] - median if contender.compiled else None,
    }


def table(model_name: str, rows: dict[str, dict | str]) -> str:
    base = rows.get("eager, full fine-tune")
    lines = [f"### {model_name}", "",
             "| contender | saved MiB | vs eager | RSS rise MiB | median step s | compile s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {name} | failed: {r} | | | | |")
            continue
        ratio = f"{base['saved'] / r['saved']:.2f}x" if isinstance(base, dict) and r["saved"] else "-"
        comp = "-" if r["compile"] is None else f"{r['compile']:.1f}"
        lines.append(f"| {name} | {r['saved'] / 2**20:.1f} | {ratio} | {r['rss'] / 2**20:.1f} | "
                     f"{r['step']:.3f} | {comp} |")
    return "\n".join(lines)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # RSS then follows live tensors
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:4], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--only", nargs="*", default=None, help="contender names to run (default all)")
    args = parser.parse_args()
    for key in args.models:
        zoo_name, kwargs = MODELS[key]
        factory = lambda: zoo.build(zoo_name, seed=0, dropout=0.0, **kwargs)
        rows: dict[str, dict | str] = {}
        for contender in CONTENDERS:
            if args.only and contender.name not in args.only:
                continue
            try:
                rows[contender.name] = measure(contender, factory, args.ratio, args.steps, args.warmup)
            except Exception as err:  # the table says which contender failed and why
                traceback.print_exc()
                rows[contender.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            print(contender.name, rows[contender.name], flush=True)
        shape = ", ".join(f"{k} {v}" for k, v in kwargs.items())
        section = table(f"{key} ({shape})", rows)
        print(section, flush=True)
        body = (f"Random init, dropout 0, AdamW; slimfit freezes {args.ratio:.0%} of the layers (one seeded "
                "draw, the head trains) with the inductor backend; \"eager, slimfit's frozen set\" is eager "
                "with those same layers at requires_grad=False. Saved MiB: bytes autograd holds from "
                "forward to backward (saved-tensor hooks; parameters and inputs excluded). RSS rise: "
                "resident memory after the forward minus before it (MALLOC_MMAP_THRESHOLD_=65536). "
                f"Step: median of {args.steps} after {args.warmup} warm-up steps (forward, backward, AdamW). "
                "Compile: first step minus the median (caches off).\n\n" + section)
        # One section per model, written as soon as it is measured: a run cut short
        # keeps what it finished, and running one model leaves the others' tables.
        write_section(f"contenders-{key}", f"Every contender: {key}", body)


if __name__ == "__main__":
    main()
