"""The main job runs end to end on the bundled model and data (a small slice of it)."""
from __future__ import annotations

import json

import pytest

from slimfit_fx import cli
from slimfit_fx.finetune import FinetuneSettings

SMALL = ["--backend", "aot_eager", "--limit", "40", "--batch-size", "8", "--max-length", "32"]


def test_finetune_runs_and_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["finetune", *SMALL, "--freeze-ratio", "0.5", "--out", str(out),
              "--compare-eager", "--eager-lr", "2e-4", "--progress"])
    results = json.loads((out / "metrics.json").read_text())
    slim, eager = results["slimfit"], results["eager"]
    assert slim["steps"] == eager["steps"] == 3  # 5 classes x 6 training articles = 30: three batches of 8
    assert slim["layers"] == 54 and slim["frozen_layers"] == 27
    assert 0.0 <= slim["accuracy"] <= 1.0 and 0.0 <= eager["accuracy"] <= 1.0
    assert slim["saved_bytes"] > 0 and slim["compile_seconds"] > 0
    assert 0 < slim["saved_bytes"] < eager["saved_bytes"]  # half the layers frozen, Q/K/V and GELU packed
    assert slim["distinct_frozen_sets"] == 3  # per-step ILS
    # the head is the one layer the checkpoint lacks: it trains every step
    assert slim["always_train"] == ["classifier.weight"]
    assert slim["trained_steps"]["classifier.weight"] == 3
    assert slim["lr"] == slim["last_step_lr"] == 1e-4 and eager["lr"] == eager["last_step_lr"] == 2e-4
    assert slim["dynamo_graphs"] == 2  # one training graph, one for evaluation
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["freeze_ratio"] == 0.5 and config["settings"]["compare_eager"]
    for name in ("report.json", "report.md", "memory.png", "saved_by_module.png", "schedule.png"):
        assert (out / name).stat().st_size > 0, name
    captured = capsys.readouterr()
    assert "slimfit_fx report" in captured.out
    assert "test accuracy" in captured.out and "eager" in captured.out  # the side-by-side table
    plain = [line for line in captured.out.splitlines() if line.startswith("test accuracy: ")]
    assert plain == [f"test accuracy: {slim['accuracy']:.2%} (slimfit), {eager['accuracy']:.2%} (eager), "
                     f"{slim['test_articles']} test articles"], plain
    assert "compiling with aot_eager during the first step" in captured.out
    assert "loss=" in captured.err and "frozen=" in captured.err  # the progress bar's postfix


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
    with pytest.raises(SystemExit, match="unknown model 'resnet-9000'"):
        cli.main(["inspect", "--model", "resnet-9000"])


@pytest.mark.parametrize("flags, message", [
    (["--freeze-ratio", "1.5"], "--freeze-ratio must be in"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--eager-lr", "0"], "--eager-lr must be > 0, got 0.0"),
    (["--model", "bert-9000"], "unknown model 'bert-9000'"),
    (["--data-dir", "/nonexistent/news"], "data directory '/nonexistent/news' does not exist"),
])
def test_finetune_rejects_bad_input_before_training(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["finetune", "--limit", "10", "--out", str(tmp_path), *flags])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_unknown_lr_schedule_is_refused():
    with pytest.raises(ValueError, match="--lr-schedule must be one of .*got 'cosine'"):
        FinetuneSettings(lr_schedule="cosine").check()


def test_finetune_reads_a_folder_per_class(tmp_path):
    data = tmp_path / "data"
    for label, word in (("sport", "match goal team"), ("tech", "chip software device")):
        (data / label).mkdir(parents=True)
        for i in range(10):
            (data / label / f"{i}.txt").write_text(f"{word} {i} " * 5)
    (data / "empty").mkdir()  # no .txt files: not a class
    cli.main(["finetune", *SMALL, "--data-dir", str(data), "--out", str(tmp_path / "run"),
              "--schedule", "fixed", "--lr-schedule", "linear"])
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())["slimfit"]
    assert results["steps"] == 2 and results["test_articles"] == 4  # 16 train (2 batches), 4 test
    assert results["last_step_lr"] == pytest.approx(0.5e-4)  # linear decay from 1e-4 to 0 over 2 steps


def test_constant_lr_schedule_by_default_keeps_the_rate(tmp_path):
    cli.main(["finetune", *SMALL, "--limit", "20", "--out", str(tmp_path / "run"), "--schedule", "fixed",
              "--lr", "3e-4"])
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())["slimfit"]
    assert results["steps"] == 1 and results["last_step_lr"] == pytest.approx(3e-4)


def test_new_layers_always_train_unless_told_otherwise():
    new = ("classifier.weight",)
    assert FinetuneSettings().slimfit_config(new).always_train == new
    assert FinetuneSettings(train_new_layers=False).slimfit_config(new).always_train == ()
    assert FinetuneSettings(schedule="fixed").slimfit_config(new).always_train == ()  # the draw keeps the head


def test_help_gives_every_flag_a_text_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert "(default: 16)" in capsys.readouterr().out
    parser = cli._parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    helps = {a.option_strings[0]: finetune.formatter_class("slimfit-fx")._get_help_string(a) % vars(a)
             for a in finetune._actions}
    assert all(helps.values()), [flag for flag, text in helps.items() if not text]
    for flag, default in (("--batch-size", "16"), ("--seq-len", "128"), ("--freeze-ratio", "0.9"),
                          ("--epochs", "1"), ("--lr", "0.0001"), ("--seed", "0")):
        assert helps[flag].endswith(f"(default: {default})"), (flag, helps[flag])


def test_finetune_fits_a_memory_budget(tmp_path):
    out = tmp_path / "run"
    cli.main(["finetune", *SMALL, "--memory-budget", "8GiB", "--out", str(out)])
    results = json.loads((out / "metrics.json").read_text())["slimfit"]
    fit = results["memory_budget"]
    assert fit["budget"] == 8 * 2**30
    assert fit["predicted"]["freeze_ratio"] == 0.0  # 8 GiB holds every layer training at once
    assert 0 < fit["predicted"]["peak"] <= fit["budget"] and fit["measured_peak"] > 0
    assert "predicted peak" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--memory-budget", "2GiB", "--freeze-ratio", "0.5"], "drop --freeze-ratio"),
    (["--memory-budget", "2 parsecs"], "--memory-budget='2 parsecs' is not a size"),
    (["--memory-budget", "2GiB", "--schedule", "lisa"], "only schedule 'ils' takes"),
])
def test_finetune_refuses_a_budget_it_cannot_use(flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["finetune", *SMALL, *flags])
