"""The main job runs end to end on the bundled model and data (a small slice of it)."""
from __future__ import annotations

import json

from slimfit_fx import cli


def test_finetune_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    cli.main(["finetune", "--backend", "aot_eager", "--limit", "40", "--batch-size", "8",
              "--max-length", "32", "--freeze-ratio", "0.5", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["steps"] == 3  # 5 classes x 6 training articles = 30, three full batches of 8
    assert results["layers"] == 54 and results["frozen_layers"] == 27
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["saved_bytes"] > 0 and results["compile_seconds"] > 0
    assert "slimfit_fx report" in capsys.readouterr().out
