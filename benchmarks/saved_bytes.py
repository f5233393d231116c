"""Bytes held from forward to backward, and variant build/switch cost, for a BERT-base config.

    python benchmarks/saved_bytes.py [--backends aot_eager inductor] [--batch 8 --seq 128]

Random-init BERT-base (12 layers, hidden 768), frozen sets: none, 90% of the
layers drawn with seed 0, every encoder layer. Eager is measured the same way
(saved-tensor hooks, parameters and inputs not counted) with the frozen
parameters set to requires_grad=False. Prints one table.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import slimfit_fx
from slimfit_fx import zoo
from slimfit_fx.memory import eager_saved_bytes


def make_model(batch: int, seq: int):
    return zoo.bert_base(seed=0, batch=batch, seq=seq)  # (model, batch), dropout 0.1


def frozen_sets(layers: tuple[str, ...]) -> dict[str, frozenset[str]]:
    return {
        "none": frozenset(),
        "90% random": frozenset(random.Random(0).sample(layers, int(0.9 * len(layers)))),
        "all encoder": frozenset(n for n in layers if ".encoder." in n),
    }


def train_step(cm, batch) -> float:
    start = time.perf_counter()
    cm(**batch).loss.backward()
    cm.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, batch = make_model(args.batch, args.seq)
    layers = slimfit_fx.compile(make_model(args.batch, args.seq)[0], backend="aot_eager").slimfit.layers
    sets = frozen_sets(layers)
    rows = {name: {"frozen layers": f"{len(s)}/{len(layers)}",
                   "eager MiB": eager_saved_bytes(model, frozen=s, **batch) / 2**20}
            for name, s in sets.items()}
    timings = []
    for backend in args.backends:
        cm = slimfit_fx.compile(make_model(args.batch, args.seq)[0], backend=backend)
        builds = []
        for name, frozen in sets.items():
            cm.slimfit.set_frozen(frozen)
            before = cm.slimfit.stats["compile_seconds"]
            train_step(cm, batch)
            builds.append(cm.slimfit.stats["compile_seconds"] - before)
            rows[name][f"{backend} MiB"] = cm.slimfit.saved_bytes / 2**20
        a, b = sets["none"], sets["all encoder"]
        same, switched = [], []
        for _ in range(args.repeats):
            cm.slimfit.set_frozen(a)
            same.append(train_step(cm, batch))
            cm.slimfit.set_frozen(b)
            switched.append(train_step(cm, batch))
            cm.slimfit.set_frozen(a)
            switched.append(train_step(cm, batch))
        start = time.perf_counter()
        for _ in range(100):  # the switch itself: validate names, then the guard's lookup
            cm.slimfit.set_frozen(b)
            cm.slimfit._variant_for_current_set()
            cm.slimfit.set_frozen(a)
            cm.slimfit._variant_for_current_set()
        switch_us = (time.perf_counter() - start) / 200 * 1e6
        stats = cm.slimfit.stats
        timings.append((backend, builds, statistics.median(same), statistics.median(switched),
                        switch_us, stats))

    print(f"\nBERT-base config, random init, batch {args.batch}, seq {args.seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    columns = ["frozen layers", "eager MiB", *[f"{b} MiB" for b in args.backends]]
    print("| frozen set | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.1f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    none = rows["none"]
    for backend in ["eager", *args.backends]:
        key = f"{backend} MiB"
        print(f"{backend}: none / 90% random = {none[key] / rows['90% random'][key]:.2f}x, "
              f"none / all encoder = {none[key] / rows['all encoder'][key]:.2f}x")
    print("\n| backend | variant build s (none, 90%, encoder) | step s, same set | step s, after a switch "
          "(cached) | switch + lookup us | dynamo graphs | variants compiled | cache hits |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, builds, same, switched, switch_us, stats in timings:
        print(f"| {backend} | {', '.join(f'{s:.1f}' for s in builds)} | {same:.3f} | {switched:.3f} "
              f"| {switch_us:.0f} | {stats['graphs_captured']} | {stats['variants_compiled']} "
              f"| {stats['cache_hits']} |")


if __name__ == "__main__":
    main()
