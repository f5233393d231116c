"""The main job runs end to end on the bundled model and data (a small slice of it)."""
from __future__ import annotations

import json

from slimfit_fx import cli


def test_finetune_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    cli.main(["finetune", "--backend", "aot_eager", "--limit", "40", "--batch-size", "8",
              "--max-length", "32", "--freeze-ratio", "0.5", "--new-set-every", "1",
              "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["steps"] == 3  # 5 classes x 6 training articles = 30, three full batches of 8
    assert results["layers"] == 54 and results["frozen_layers"] == 27
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["saved_bytes"] > 0 and results["compile_seconds"] > 0
    assert results["schedule"] == "ils" and results["distinct_frozen_sets"] == 3  # per-step ILS
    assert results["dynamo_graphs"] == 2  # one training graph, one for evaluation
    assert "slimfit_fx report" in capsys.readouterr().out


def test_inspect_prints_the_report_and_writes_the_files(tmp_path, capsys):
    cm = cli.main(["inspect", "--model", "gpt2-tiny", "--freeze-ratio", "0.5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "slimfit_fx report" in out and "saved activations" in out
    for name in ("report.json", "report.md", "memory.png", "saved_by_module.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["frozen"]) == int(0.5 * len(report["layers"]))
    assert cm is None  # main() returns nothing; the command's output is the interface


def test_inspect_rejects_unknown_models():
    import pytest

    with pytest.raises(SystemExit, match="unknown model 'resnet-9000'"):
        cli.main(["inspect", "--model", "resnet-9000"])


def test_finetune_rejects_a_bad_ratio_before_loading_anything():
    import pytest

    with pytest.raises(SystemExit, match="freeze_ratio must be in"):
        cli.main(["finetune", "--freeze-ratio", "1.5", "--limit", "10"])
