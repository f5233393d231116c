"""The benchmark scripts run before anyone relies on their tables: benchmarks/gpu.py
in its --smoke mode (the same code on CPU at tiny sizes, before a GPU ever runs it)
and benchmarks/contenders.py on a tiny BERT (one process per contender, total
peak and its breakdown)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
CONTENDERS = GPU.with_name("contenders.py")


def _smoke(tmp_path, *extra):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(GPU), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def _rows(text):
    return [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| contender")]


# Each contender runs in its own process (an import of torch and a compile): the
# default run smokes eager (the script's table, rows file and child process;
# test_contenders_total_peak_and_breakdown_on_a_tiny_bert runs a slimfit child),
# `pytest -m slow` slimfit and torch.compile too.
@pytest.mark.parametrize("contenders", [
    ["eager"],
    pytest.param(["eager", "slimfit"], marks=pytest.mark.slow),
    pytest.param(["torch.compile, memory budget 0.1"], marks=pytest.mark.slow),
], ids=["eager", "eager-slimfit", "torch.compile"])
def test_gpu_benchmark_smoke(tmp_path, contenders):
    kept = tmp_path / "rows.json"
    case = ["--cases", "bert-tiny bs2 seq12"]
    text = _smoke(tmp_path, *case, "--contenders", *contenders, "--rows", str(kept))
    rows = _rows(text)
    assert [r[0].strip() for r in rows] == contenders, text
    for name, rss, step, compile_s in rows:
        assert float(rss.replace(",", "")) > 100, text  # MiB: torch alone takes more
        assert float(step) > 0, text
        assert (compile_s.strip() == "-") == (name.strip() == "eager"), text
    # a kept row is read back, not rerun (a run cut short finishes in the next)
    rows_kept = json.loads(kept.read_text())
    assert len(rows_kept) == len(contenders), rows_kept
    for row in rows_kept.values():
        row["step_s"] = 123.0
    kept.write_text(json.dumps(rows_kept))
    again = _rows(_smoke(tmp_path, *case, "--contenders", *contenders, "--rows", str(kept)))
    assert [float(r[2]) for r in again] == [123.0] * len(contenders), again


@pytest.mark.slow
def test_gpu_benchmark_smoke_every_case_and_contender(tmp_path):
    rows = _rows(_smoke(tmp_path))
    assert len(rows) == 10 and all(not r[1].strip().startswith(("failed", "not run")) for r in rows), rows


def test_contenders_total_peak_and_breakdown_on_a_tiny_bert():
    names = ["eager, full fine-tune", "slimfit default (ILS every step)"]
    done = subprocess.run([sys.executable, str(CONTENDERS), "--cases", "bert-tiny bs2 seq12", "--no-doc",
                           "--contenders", *names, "--steps", "1", "--warmup", "1", "--backend", "aot_eager"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    tables = done.stdout.split("Where the peak goes")
    totals, parts = _rows(tables[0]), _rows(tables[1])
    assert [r[0].strip() for r in totals] == names == [r[0].strip() for r in parts], done.stdout
    for total, part in zip(totals, parts):
        numbers = [float(x.replace(",", "")) for x in part[1:]]
        weights, state, rest, keeps, transients, backward, grads, unpacked, temporaries, peak = numbers
        assert peak == float(total[1].replace(",", "")) > 0, done.stdout
        assert weights + state + rest <= peak + 1, done.stdout  # MiB cells round
    assert totals[1][-1].strip() != "-" and totals[0][-1].strip() == "-", done.stdout  # compile s
    # eager's state is whole all along (bytes from the printed rows: the table rounds to MiB)
    rows = [ast.literal_eval(line.split(": ", 1)[1])
            for line in done.stdout.splitlines() if line.startswith("bert-tiny bs2 seq12 | ")]
    assert rows[0]["state_unpacked"] == 0, done.stdout


def test_contenders_counts_the_state_unpacked_for_a_step():
    """The breakdown's "state unpacked for the step": exactly the float32 moments of
    a layer that was frozen (its state packed) and trains again, less their packed form."""
    import torch

    import slimfit_fx
    from slimfit_fx import zoo
    from slimfit_fx.optimizer_state import PackedState

    sys.path.insert(0, str(CONTENDERS.parent))
    try:
        import contenders
    finally:
        sys.path.remove(str(CONTENDERS.parent))
    model, batch = zoo.build("bert-tiny", seed=0)
    cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager")
    layer = max(cm.slimfit.layers, key=lambda n: model.get_parameter(n).numel())  # named by its weight
    weight = model.get_parameter(layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> int:
        cm(**batch).loss.backward()
        _, unpacked = contenders.step_measuring_state(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return unpacked

    assert step() == 0  # first step: the state is made whole
    cm.slimfit.set_frozen([layer])
    assert step() == 0  # the layer is frozen: its moments are packed after this step
    packed = sum(v.nbytes for v in optimizer.state[weight].values() if isinstance(v, PackedState))
    assert packed > 0
    cm.slimfit.set_frozen([])
    assert step() == 2 * weight.numel() * 4 - packed  # trains again: both moments unpacked
    assert step() == 0  # still training: nothing packed to unpack
