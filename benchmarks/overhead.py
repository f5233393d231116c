"""Host overhead: a slimfit step against eager's on a tiny BERT, and where a
BERT-base step's time goes.

    python benchmarks/overhead.py [--steps 60] [--threads 1] [--no-doc] [--skip-base]

Tiny BERT (hidden 64, 4 layers, 4 heads, FFN 256, dropout 0.1) at batch 8,
seq 32: eager full fine-tune, plain `torch.compile`, `slimfit_fx.compile(model)`
(its defaults: ILS after every optimizer step, 90% frozen, the paper's
compression with frozen norms in float8, frozen layers' AdamW state in int8),
slimfit with the paper's norm pruning (`compression="paper"`: a per-row top-k
of every frozen norm's x_hat), with compression off, and with that state kept
whole (`optimizer_state="full"`), each with its own AdamW. After
30 warm-up steps the contenders' steps alternate (one step each, in turn), so
a load on the machine falls on all of them alike; a row's ratio is the median
over the rounds of its step time divided by eager's in the same round. At
this size a step is tens of kernels on a few KB each, so the time is host
work: Python, dispatch, kernel launches.

BERT-base (random init, bs 8, seq 128), slimfit's defaults: a step run under
cProfile after the warm-up, split into the time inside C functions (torch
kernels and autograd's engine: cProfile's built-ins) and the time in Python
frames (slimfit_fx's own, and every other: torch's wrappers, inductor's
generated callers, transformers). cProfile slows Python frames down, so the
Python share is an upper bound.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import torch

import slimfit_fx
from slimfit_fx import zoo

PACKAGE = str(Path(slimfit_fx.__file__).resolve().parent)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, num_labels=3,
                        problem_type="single_label_classification")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).train()
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, 1000, (8, 32), generator=g),
             "attention_mask": torch.ones(8, 32, dtype=torch.long),
             "labels": torch.randint(0, 3, (8,), generator=g)}
    return model, batch


CONTENDERS = {
    "eager": lambda m: m,
    "torch.compile": torch.compile,
    "slimfit default": slimfit_fx.compile,
    "slimfit, paper compression": lambda m: slimfit_fx.compile(m, compression="paper"),
    "slimfit, compression off": lambda m: slimfit_fx.compile(m, compression="off"),
    "slimfit, full optimizer state": lambda m: slimfit_fx.compile(m, optimizer_state="full"),
}


def _step(module, optimizer, batch) -> float:
    start = time.perf_counter()
    module(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def tiny_ratios(steps: int, warmup: int = 30) -> dict[str, dict]:
    runs = {}
    for name, wrap in CONTENDERS.items():
        model, batch = tiny_bert()
        runs[name] = (wrap(model), torch.optim.AdamW(model.parameters(), lr=1e-4), batch)
    for _ in range(warmup):
        for module, optimizer, batch in runs.values():
            _step(module, optimizer, batch)
    seconds = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            seconds[name].append(_step(*run))
    return {name: {"median_ms": 1e3 * statistics.median(s),
                   "ratio": statistics.median(a / b for a, b in zip(s, seconds["eager"]))}
            for name, s in seconds.items()}


def base_profile(steps: int = 3, warmup: int = 3) -> dict:
    model, batch = zoo.bert_base(batch=8, seq=128)
    cm = slimfit_fx.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(warmup):
        _step(cm, optimizer, batch)
    plain = statistics.median(_step(cm, optimizer, batch) for _ in range(steps))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        _step(cm, optimizer, batch)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(tottime for _, _, tottime, _, _ in stats.values())
    python = sum(tottime for (file, _, _), (_, _, tottime, _, _) in stats.items() if file != "~")
    own = sum(tottime for (file, _, _), (_, _, tottime, _, _) in stats.items() if file.startswith(PACKAGE))
    return {"step_s": plain, "profiled_step_s": total / steps, "python": python / total, "slimfit": own / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed rounds on the tiny BERT")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread pool noise)")
    parser.add_argument("--skip-base", action="store_true", help="leave out the BERT-base profile")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = tiny_ratios(args.steps)
    lines = ["Tiny BERT (hidden 64, 4 layers), batch 8, seq 32, AdamW; "
             f"{args.steps} rounds of alternating steps after 30 warm-up steps each.", "",
             "| contender | median step ms | step vs eager (median of rounds) |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['median_ms']:.1f} | {r['ratio']:.2f}x |" for name, r in rows.items()]
    if not args.skip_base:
        base = base_profile()
        lines += ["", "BERT-base (bs 8, seq 128), slimfit's defaults, one step under cProfile: "
                  f"step {base['step_s']:.2f} s unprofiled, {base['profiled_step_s']:.2f} s profiled; "
                  f"Python frames {100 * base['python']:.1f}% of the profiled time "
                  f"(slimfit_fx's own {100 * base['slimfit']:.1f}%), the rest in C (kernels, autograd)."]
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        from doc import write_section

        write_section("overhead", "Host overhead per step", body)


if __name__ == "__main__":
    main()
