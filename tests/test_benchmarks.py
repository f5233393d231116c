"""benchmarks/gpu.py runs before a GPU ever does: its --smoke mode is the same code
(one process per contender, the table) on CPU at tiny sizes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _smoke(tmp_path, *extra):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(GPU), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def _rows(text):
    return [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| contender")]


def test_gpu_benchmark_smoke(tmp_path):
    contenders = ["eager", "slimfit", "torch.compile, memory budget 0.1"]
    text = _smoke(tmp_path, "--cases", "bert-tiny bs2 seq12", "--contenders", *contenders)
    rows = _rows(text)
    assert [r[0].strip() for r in rows] == contenders, text
    for name, rss, step, compile_s in rows:
        assert float(rss.replace(",", "")) > 100, text  # MiB: torch alone takes more
        assert float(step) > 0, text
        assert (compile_s.strip() == "-") == (name.strip() == "eager"), text


@pytest.mark.slow
def test_gpu_benchmark_smoke_every_case_and_contender(tmp_path):
    rows = _rows(_smoke(tmp_path))
    assert len(rows) == 8 and all(not r[1].strip().startswith(("failed", "not run")) for r in rows), rows
