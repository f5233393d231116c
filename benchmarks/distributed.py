"""Per-rank memory under FSDP2: per-block sharding vs root-only vs eager, BERT-base.

    python benchmarks/distributed.py [--ranks 2 4] [--steps 3] [--batch 8] [--seq 128] [--no-doc]

Each layout runs in a process of its own that spawns `--ranks` CPU ranks
(gloo); every rank trains BERT-base (random init, dropout on) on its own batch
of `--batch` x `--seq` with AdamW:

* eager per-block: `fully_shard` on each encoder layer and the root, no
  compile, every layer trains (FSDP2's full fine-tune);
* slimfit root-only: `fully_shard(model)`, then `slimfit_fx.compile(model)`
  with its defaults but aot_eager (ILS, freeze_ratio 0.9, the paper's
  compression);
* slimfit per-block: `fully_shard` each layer and the root, then the same compile.

One warm-up step (the compile) comes first; then a thread samples the rank's
resident set size (/proc/self/statm) every 2 ms over `--steps` steps. Per
rank: RSS before the timed steps, peak RSS during them, their difference, and
the median step time. The table shows the rank with the highest peak (the
ranks differ by a few MiB). On a CPU, RSS is the closest thing to the
allocator's peak: gathered parameters, gradients, optimizer state and saved
activations all live in it, next to ~0.5 GiB of libraries. The allocator
keeps much of what the warm-up step freed, so "before" is not a floor to
subtract: the peak is the figure. Writes its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimfit_fx  # noqa: E402
from slimfit_fx import zoo  # noqa: E402
from doc import write_section  # noqa: E402
from processes import run_child  # noqa: E402

LAYOUTS = {
    "eager-blocks": "eager FSDP2, per-block (full fine-tune)",
    "slimfit-root": "slimfit, root-only fully_shard",
    "slimfit-blocks": "slimfit, per-block fully_shard",
}
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """The highest RSS seen by a thread sampling every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def _rank(rank: int, world: int, port: int, layout: str, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    torch.set_num_threads(1)
    model, batch = zoo.bert_base(seed=0, batch=args.batch, seq=args.seq)
    _, batch = zoo.bert_base(seed=100 + rank, batch=args.batch, seq=args.seq)  # each rank its own rows
    if layout.endswith("blocks"):
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
    fully_shard(model)
    train = slimfit_fx.compile(model, backend="aot_eager") if layout.startswith("slimfit") else model
    optimizer = torch.optim.AdamW(train.parameters(), lr=5e-5)

    def step() -> None:
        train(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: the compile, optimizer state allocated
    before = rss()
    times = []
    with PeakSampler() as sampler:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    row = {"rank": rank, "before": before, "peak": sampler.peak, "step_seconds": statistics.median(times)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def child(layout: str, world: int, args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, port, layout, args, out), nprocs=world, join=True)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    print(json.dumps(max(rows, key=lambda r: r["peak"])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.world, args)
        return
    lines = [f"BERT-base (random init, dropout on), each rank its own batch of {args.batch} x {args.seq}, "
             f"AdamW, gloo on CPU, one thread per rank; slimfit with its defaults but aot_eager. "
             f"Peak: the highest resident set size over {args.steps} steps after a warm-up step, "
             "for the rank with the highest peak.", "",
             "The allocator keeps much of what the warm-up step freed, so RSS before the steps "
             "is not a floor to subtract; the peak is the figure. Step times are on a shared "
             "2-core machine, ranks included.", "",
             "| ranks | layout | RSS before steps (MiB) | peak RSS (MiB) | step (s) |",
             "|---:|---|---:|---:|---:|"]
    for world in args.ranks:
        for layout in args.layouts:
            command = [sys.executable, __file__, "--child", layout, "--world", str(world),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            row = run_child(command)
            if isinstance(row, str):
                lines.append(f"| {world} | {LAYOUTS[layout]} | {row} | | |")
            else:
                lines.append(f"| {world} | {LAYOUTS[layout]} | {row['before'] / MIB:,.0f} | "
                             f"{row['peak'] / MIB:,.0f} | {row['step_seconds']:.2f} |")
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        write_section("distributed", "FSDP2: per-rank memory, per-block vs root-only vs eager", body)


if __name__ == "__main__":
    main()
