"""Saved bytes, step time and gradient fidelity of compressed static activations.

    python benchmarks/compression.py [--backend aot_eager|inductor] [--batch 8 --seq 128]

BERT-base config (random init, dropout 0 so gradients compare one to one), 90% of
the layers frozen (seed 0 draw). Cases: eager full fine-tune; eager with the set
frozen; slimfit freeze only (compression "off"); slimfit + "paper" compression;
slimfit + "row" (per-row scales); slimfit + "extended" ("paper" plus the
trainable layers' inputs 8-bit per-row); slimfit + "paper" + activation_memory_budget 0.1
(the partitioner recomputes what it can instead of saving it). Saved bytes are
counted with saved-tensor hooks on what autograd packs (parameters and inputs
excluded); gradient cosine and SQNR are against eager with the same frozen set. Prints one table and writes it to
docs/compression.md.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import slimfit_fx
from slimfit_fx import zoo
from slimfit_fx.memory import eager_frozen, eager_saved_bytes
from slimfit_fx.numerics import gradient_fidelity

DOC = Path(__file__).resolve().parent.parent / "docs" / "compression.md"


def grads_of(module, batch) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module(**batch).loss.backward()
    return {n: p.grad.detach().double().reshape(-1).clone()
            for n, p in module.named_parameters() if p.grad is not None}


def eager_grads(model, batch, frozen) -> dict[str, torch.Tensor]:
    with eager_frozen(model, frozen):
        return grads_of(model, batch)


def timed_steps(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="aot_eager", choices=("aot_eager", "inductor"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, batch = zoo.bert_base(seed=0, batch=args.batch, seq=args.seq, dropout=0.0)
    layers = slimfit_fx.compile(zoo.bert_base(seed=0, batch=2, seq=8)[0], backend="aot_eager").slimfit.layers
    frozen = frozenset(random.Random(0).sample(layers, int(0.9 * len(layers))))
    reference = eager_grads(model, batch, frozen)
    rows = {}
    for name, frozen_set in (("eager, full fine-tune", frozenset()), ("eager, 90% frozen", frozen)):
        saved = eager_saved_bytes(model, frozen=frozen_set, **batch)
        step = timed_steps(lambda: eager_grads(model, batch, frozen_set), args.repeats)
        fid = (1.0, float("inf")) if frozen_set else (float("nan"), float("nan"))
        rows[name] = (saved, step, *fid, 0.0)
    for compression, budget in (("off", None), ("paper", None), ("row", None), ("extended", None),
                                 ("paper", 0.1)):
        cm = slimfit_fx.compile(zoo.bert_base(seed=0, batch=args.batch, seq=args.seq, dropout=0.0)[0],
                                schedule="manual", backend=args.backend, compression=compression,
                                activation_memory_budget=budget)
        cm.slimfit.set_frozen(frozen)
        got = grads_of(cm, batch)  # the first step compiles the regions
        step = timed_steps(lambda: grads_of(cm, batch), args.repeats)
        counters = cm.slimfit.last_step.counters
        label = "slimfit, freeze only" if compression == "off" else f"slimfit + {compression!r} compression"
        label += f" + memory_budget {budget}" if budget else ""
        rows[label] = (cm.slimfit.saved_bytes, step, *gradient_fidelity(got, reference),
                       cm.slimfit.stats["compile_seconds"])
        rows[label] += (counters.get("tensors_compressed", 0),)
        slimfit_fx.capture.reset_dynamo()

    eager_full = rows["eager, full fine-tune"][0]
    lines = [f"BERT-base config, random init, batch {args.batch}, seq {args.seq}, 90% of {len(layers)} "
             f"layers frozen (seed 0), backend {args.backend}; {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| case | saved MiB | vs eager full | median step s | grad cosine vs eager (same frozen set) "
             "| grad SQNR dB | compile s | tensors compressed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (saved, step, cosine, sqnr, compile_s, *rest) in rows.items():
        lines.append(f"| {name} | {saved / 2**20:.1f} | {eager_full / saved:.2f}x | {step:.3f} | "
                     f"{cosine:.5f} | {sqnr:.1f} | {compile_s:.1f} | {rest[0] if rest else '-'} |")
    text = "\n".join(lines)
    print(text)
    DOC.write_text("# Compressed static activations\n\nCommand: `python benchmarks/compression.py"
                   + (f" --backend {args.backend}" if args.backend != "aot_eager" else "")
                   + "`\n\nBytes saved from forward to backward, not the memory a step costs: "
                   "`docs/benchmarks.md` (`benchmarks/contenders.py`) has total peak per contender.\n\n"
                   + text + "\n")


if __name__ == "__main__":
    main()
