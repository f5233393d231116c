"""benchmarks/accuracy.py's statistics and table (fast, on made-up metrics), the
finetune methods and per-kind compression it asks for, and one tiny run of the
digits task through the CLI."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from slimfit_fx import cli
from slimfit_fx.config import COMPRESSION_PRESETS
from slimfit_fx.finetune import COMPRESSIONS, FinetuneSettings, SettingsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402


def test_mean_se_is_the_standard_error_of_the_mean():
    mean, se = accuracy.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))  # sample stdev / sqrt(n)
    mean, se = accuracy.mean_se([0.5])
    assert mean == 0.5 and math.isnan(se)


def test_a_mean_that_cancels_reads_plus_zero():
    diffs = accuracy.paired_difference({0: 0.1, 1: 0.7, 2: 0.2}, {0: 0.3, 1: 0.6, 2: 0.1})  # -20, +10, +10
    assert abs(accuracy.mean_se(diffs)[0]) < 1e-12
    assert accuracy._pm(accuracy.mean_se(diffs)[0], 1.0, sign=True) == "+0.00 ± 1.00"
    assert accuracy._pm(-0.004, math.nan, sign=True) == "+0.00" and accuracy._pm(-0.006, math.nan) == "-0.01"


def test_paired_difference_uses_only_seeds_both_hold_in_points():
    diffs = accuracy.paired_difference({0: 0.90, 1: 0.95, 3: 0.80}, {0: 0.91, 1: 0.95, 2: 0.99})
    assert diffs == pytest.approx([-1.0, 0.0])  # seed 3 has no reference, seed 2 no row


def _metrics(acc, seconds=10.0, peak=2**30, loss=None):
    metrics = {"accuracy": acc, "train_seconds": seconds, "peak_rss_bytes": peak, "test_articles": 400}
    return metrics if loss is None else {**metrics, "test_loss": loss}


def _lines(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| row")}


def test_table_reports_mean_se_paired_difference_time_peak_and_commands():
    reference, full_state = accuracy.REFERENCE, accuracy.FULL_STATE_DEFAULT
    runs = {reference: {0: _metrics(0.90, 20.0), 1: _metrics(0.92, 40.0)},
            full_state: {0: _metrics(0.89, 10.0, 2**29), 1: _metrics(0.92, 30.0, 2**30)},
            accuracy.FREEZING_ONLY: {1: _metrics(0.93)}}
    rows = [reference, full_state, "LoRA r=8 (peft)", accuracy.DEFAULT]
    text = accuracy.table(runs, rows, [0, 1, 2], "digits", 8)
    lines = _lines(text)
    # 91.0 ± 1.0: stdev of (90, 92) is sqrt(2), over sqrt(2) seeds
    assert lines[reference] == ["2 of 3", "91.00 ± 1.00", "", "reference", "", "", "30", "1,024"]
    # per-seed differences -1.0 and 0.0: mean -0.5, SE 0.5; against freezing only seed 1
    # alone (-1.0, no SE); peak is the largest run's
    assert lines[full_state] == ["2 of 3", "90.50 ± 1.50", "", "-0.50 ± 0.50 (2 paired)", "-1.00 (1 paired)", "",
                                 "20", "1,024"]
    assert lines["LoRA r=8 (peft)"][:2] == ["0 of 3", "not run"]
    assert "One test example is 0.25 points (400 test examples)" in text
    command = next(line for line in text.splitlines() if line.startswith(f"* {full_state}:"))
    assert "--task digits" in command and "--method slimfit" in command and "--seed S " in command
    assert "--epochs 8" in command and "--optimizer-state full" in command
    default = next(line for line in text.splitlines() if line.startswith(f"* {accuracy.DEFAULT}:"))
    assert "--optimizer-state" not in default  # the default is whatever compile(model) does


def test_test_loss_is_paired_beside_accuracy_over_the_seeds_that_recorded_it():
    reference, full_state = accuracy.REFERENCE, accuracy.FULL_STATE_DEFAULT
    runs = {reference: {0: _metrics(0.90, loss=0.30), 1: _metrics(0.92, loss=0.20), 2: _metrics(0.91)},
            full_state: {0: _metrics(0.89, loss=0.33), 1: _metrics(0.92, loss=0.24), 2: _metrics(0.90, loss=0.1)},
            accuracy.FREEZING_ONLY: {0: _metrics(0.90)}}
    lines = _lines(accuracy.table(runs, [reference, full_state], [0, 1, 2], "digits", 8))
    assert lines[reference][2] == "250.00 ± 50.00"  # x1000, over the two runs that have it
    # loss differences +30, +40 (x1000) on seeds 0 and 1; seed 2's reference has none
    assert lines[full_state][3] == "-0.67 ± 0.33 (3 paired); loss +35.00 ± 5.00"
    assert lines[full_state][4] == "-1.00 (1 paired)"  # freezing only recorded no loss
    runs[accuracy.FREEZING_ONLY] = {0: _metrics(0.90, loss=0.30), 1: _metrics(0.93, loss=0.22)}
    text = accuracy.table(runs, [reference, full_state], [0, 1, 2], "digits", 8)
    # against freezing only: -1, -1 points (-4 examples of 400 on each seed); loss +30, +20:
    # mean +25, SE 5; the same difference on every seed leaves no interval and no p
    assert "| full optimizer state | -4 | -4 | -1.00 ± 0.00 (2 paired) |  |  |  | +25.00 ± 5.00 |" in text


def test_the_95_percent_interval_uses_student_t_for_the_seeds_it_has():
    # the t quantiles below are written to 3 decimals, so scipy's exact ones differ by
    # under 5e-4; every SE here is at most 1, hence the absolute tolerance of 5e-4
    assert accuracy.interval95([1.0]) is None
    low, high = accuracy.interval95([0.0, 2.0])  # mean 1, SE 1, t(1) 12.706
    assert (low, high) == pytest.approx((1 - 12.706, 1 + 12.706), abs=5e-4)
    diffs = [0.0, -3.0, -2.0, -3.0, -1.0, -3.0, 4.0]  # 7 seeds: t(6) 2.447
    mean, se = accuracy.mean_se(diffs)
    assert accuracy.interval95(diffs) == pytest.approx((mean - 2.447 * se, mean + 2.447 * se), abs=5e-4)
    # 12 seeds, 11 degrees of freedom: t(11) 2.201
    assert accuracy.interval95([0.0, 1.0] * 6)[1] - 0.5 == pytest.approx(2.201 * accuracy.mean_se([0.0, 1.0] * 6)[1],
                                                                          abs=5e-4)


def test_p_values_are_paired_t_tests_and_holm_adjusts_them_step_down():
    # mean -2, SE 1/sqrt(3) over 3 seeds: t = -3.46 at 2 degrees of freedom, p 0.0742
    assert accuracy.p_value([-1.0, -2.0, -3.0]) == pytest.approx(0.0742, abs=1e-4)
    assert math.isnan(accuracy.p_value([-1.0]))
    assert math.isnan(accuracy.p_value([-1.0, -1.0]))  # no spread: nothing to test against
    # sorted 0.01, 0.02, 0.04: times 3, 2, 1, each at least the one before it
    adjusted = accuracy.holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": math.nan})
    assert adjusted["b"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.04)
    assert adjusted["a"] == pytest.approx(0.04) and math.isnan(adjusted["d"])
    assert accuracy.holm({"a": 0.5, "b": 0.4})["a"] == 0.8  # 2 x 0.4 carried up, not 1 x 0.5
    assert accuracy.holm({"a": 0.9, "b": 0.6}) == {"a": 1.0, "b": 1.0}  # capped at 1


def test_rows_against_freezing_only_are_tabled_per_seed_in_test_examples():
    freezing, qkv, norms = accuracy.FREEZING_ONLY, "slimfit, Q/K/V int8 alone", "slimfit, frozen norms float8 alone"
    runs = {freezing: {s: _metrics(a) for s, a in enumerate([0.90, 0.95, 0.85])},
            qkv: {s: _metrics(a) for s, a in enumerate([0.8975, 0.9425, 0.8450])},
            norms: {0: _metrics(0.9050), 2: _metrics(0.8450)}}
    text = accuracy.table(runs, [freezing, qkv, norms], [0, 1, 2], "digits", 8)
    # Q/K/V: -1, -3, -2 examples of 400 (-0.25, -0.75, -0.5 points): mean -0.5, SE 0.144,
    # p 0.0742 alone; the norms +2, -2: p 1.0. Holm over the 2: 2 x 0.0742, then 1.0
    row = next(line for line in text.splitlines() if line.startswith("| Q/K/V int8 alone |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:5] == ["-1", "-3", "-2", "-0.50 ± 0.14 (3 paired)"]
    low, high = accuracy.interval95([-0.25, -0.75, -0.5])
    assert cells[5] == f"{low:+.2f} to {high:+.2f}" and cells[6:8] == ["0.074", "0.148"]
    row = next(line for line in text.splitlines() if line.startswith("| frozen norms float8 alone |"))
    assert [c.strip() for c in row.split("|")[1:-1]][1:4] == ["+2", "", "-2"]  # seed 1 not run
    assert "Holm-adjusted over the 2 rows compared here" in text


def test_slimfit_rows_are_tabled_per_seed_against_lora_and_lisa_against_the_row_it_varies():
    freezing, lisa, lora = accuracy.FREEZING_ONLY, "LISA (2 blocks, every 20 steps)", accuracy.LORA
    runs = {accuracy.REFERENCE: {s: _metrics(a) for s, a in enumerate([0.91, 0.96, 0.86])},
            freezing: {s: _metrics(a) for s, a in enumerate([0.90, 0.95, 0.85])},
            lora: {s: _metrics(a) for s, a in enumerate([0.8950, 0.9550, 0.8450])},
            lisa: {s: _metrics(a) for s, a in enumerate([0.9050, 0.9450, 0.8450])}}
    text = accuracy.table(runs, [accuracy.REFERENCE, freezing, lora, lisa], [0, 1, 2], "digits", 8)
    below = text.split("Against LoRA r=8 (peft), paired:")
    assert len(below) == 2 and "Holm-adjusted over the 2 rows compared here" in below[1]
    cells = {c[0]: c[1:5] for line in below[1].splitlines() if line.startswith("| ")
             for c in [[x.strip() for x in line.split("|")[1:-1]]]}
    # per seed of 400 examples against LoRA: freezing only +2, -2, +2; LISA +4, -4, 0
    assert cells["slimfit freezing only"] == ["+2", "-2", "+2", "+0.17 ± 0.33 (3 paired)"]
    assert cells["LISA (2 blocks, every 20 steps)"][:3] == ["+4", "-4", "0"]
    assert "eager full fine-tune" not in cells and "LoRA r=8 (peft)" not in cells  # slimfit rows only
    # LISA varies freezing only, so it is tabled against it seed by seed too: +2, -2, -2
    varies = below[0].split("Against the row each varies, paired:")[1]
    row = next(line for line in varies.splitlines() if line.startswith("| LISA"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "LISA (2 blocks, every 20 steps) vs slimfit freezing only"
    assert cells[1:5] == ["+2", "-2", "-2", "-0.17 ± 0.33 (3 paired)"]


def test_a_row_that_varies_another_compares_with_it_against_its_standard_error():
    full, default, bf16 = accuracy.FULL_STATE_DEFAULT, accuracy.DEFAULT, "slimfit, bf16 frozen optimizer state"
    pruning = "slimfit, paper's norm pruning"
    runs = {full: {0: _metrics(0.80), 1: _metrics(0.84), 2: _metrics(0.82)},
            default: {0: _metrics(0.79), 1: _metrics(0.83), 2: _metrics(0.81)},
            bf16: {0: _metrics(0.82), 1: _metrics(0.83), 2: _metrics(0.82)},
            pruning: {0: _metrics(0.78), 1: _metrics(0.83)},
            accuracy.FREEZING_ONLY: {0: _metrics(0.78), 1: _metrics(0.85), 2: _metrics(0.81)}}
    lines = _lines(text := accuracy.table(runs, [full, default, bf16, pruning], [0, 1, 2], "digits", 8))
    assert lines[full][5] == ""  # it varies no row here
    assert lines[full][4] == "+0.67 ± 0.88 (3 paired)"  # vs freezing only, the same state: +2, -1, +1
    assert lines[default][4] == ""  # packed state and compression both differ from freezing only
    # the default (int8 state): -1 point on every seed, SE 0: a loss beyond it
    assert lines[default][5] == "-1.00 ± 0.00 (3 paired) vs full optimizer state"
    # bf16: +2, -1, 0: mean +0.33, SE sqrt(7/3) / sqrt(3) = 0.88
    assert lines[bf16][5] == "+0.33 ± 0.88 (3 paired) vs full optimizer state"
    # the paper's pruning against the default it varies: -1, 0 on the seeds both hold
    assert lines[pruning][5] == "-0.50 ± 0.50 (2 paired) vs slimfit default"
    verdict = next(line for line in text.splitlines() if line.startswith("Against the row each varies"))
    assert ("slimfit default -1.00 ± 0.00 (3 paired), a loss beyond one standard error "
            "against full optimizer state;") in verdict
    assert "bf16 frozen optimizer state +0.33 ± 0.88 (3 paired), within one standard error" in verdict
    assert "paper's norm pruning -0.50 ± 0.50 (2 paired), within one standard error against slimfit default" in verdict


def test_rows_differ_from_the_row_they_are_compared_with_in_one_setting():
    """The default runs compile(model)'s own optimizer state and compression; the
    full-state, bf16 and paper-pruning rows add one flag to it (the paper's
    pruning with the state whole two: it varies the full-state row); every other
    slimfit row keeps the state whole, as the full-state row and freezing only do."""
    full = accuracy.FULL_STATE
    for task, spec in accuracy.TASKS.items():
        default = accuracy.row_argv(task, accuracy.DEFAULT, 0, 8)
        assert "--optimizer-state" not in default and "--compression" not in default
        for row, flag, value in ((accuracy.FULL_STATE_DEFAULT, "--optimizer-state", "full"),
                                 ("slimfit, bf16 frozen optimizer state", "--optimizer-state", "bf16"),
                                 ("slimfit, paper's norm pruning", "--compression", "paper")):
            assert row in spec["rows"]
            argv = accuracy.row_argv(task, row, 0, 8)
            at = argv.index(flag)
            assert argv[at + 1] == value and argv[:at] + argv[at + 2:] == default
        for row, varied in accuracy.VARIES.items():
            assert row in spec["rows"] and varied in spec["rows"]
            one, other = accuracy.row_argv(task, row, 0, 8), accuracy.row_argv(task, varied, 0, 8)
            extra = [a for a in one if a not in other] + [a for a in other if a not in one]
            assert len(extra) in (1, 2), (row, extra)  # one flag's value, or one flag and its value
        for row in spec["rows"]:
            method, args, _ = accuracy.ROWS[row]
            if method == "slimfit" and row not in (accuracy.DEFAULT, "slimfit, bf16 frozen optimizer state",
                                                   "slimfit, paper's norm pruning"):
                assert accuracy._has(args, full), row


def test_every_row_is_a_finetune_command_the_cli_accepts():
    parser = cli._parser()
    for task in accuracy.TASKS:
        for row in accuracy.ROWS:
            args = parser.parse_args(accuracy.row_argv(task, row, 3, 1))
            settings = FinetuneSettings(**{k: v for k, v in vars(args).items()
                                           if k in FinetuneSettings.__dataclass_fields__})
            settings.check()
            assert settings.seed == 3


def test_single_kind_compressions_hold_one_kind_at_the_paper_format():
    paper, off = COMPRESSION_PRESETS["paper"], COMPRESSION_PRESETS["off"]
    only = COMPRESSIONS["only-qkv_bits"]
    assert only.qkv_bits == paper.qkv_bits == 8 and only.enabled
    assert [f for f in type(off).__dataclass_fields__ if getattr(only, f) != getattr(off, f)] == ["qkv_bits"]
    config = FinetuneSettings(compression="only-layernorm_keep").slimfit_config()
    assert config.compression_config.layernorm_keep == 0.1 and config.compression_config.qkv_bits is None
    # the default's float8 norms, which the paper has no value for, alone
    only = COMPRESSIONS["only-layernorm_bits"]
    assert [f for f in type(off).__dataclass_fields__ if getattr(only, f) != getattr(off, f)] == ["layernorm_bits"]
    assert only.layernorm_bits == COMPRESSION_PRESETS["norms-float8"].layernorm_bits == 8
    # the same kind with a per-row scale: only for the fields stored in the paper's fixed point
    row = COMPRESSIONS["only-qkv_bits-row"]
    assert [f for f in type(off).__dataclass_fields__ if getattr(row, f) != getattr(off, f)] == ["qkv_bits", "scale"]
    assert row.qkv_bits == 8 and row.scale == "row" and off.scale == "fixed"
    assert "only-gelu_output_bits-row" not in COMPRESSIONS and "only-layernorm_bits-row" not in COMPRESSIONS


def test_compare_eager_needs_the_slimfit_method():
    with pytest.raises(SettingsError, match="--compare-eager"):
        FinetuneSettings(method="lora", compare_eager=True).check()
    with pytest.raises(SettingsError, match="--method must be one of"):
        FinetuneSettings(method="adapter").check()


@pytest.mark.parametrize("method", ["slimfit", "eager", "lora"])
def test_digits_task_runs_each_method(tmp_path, method):
    out = tmp_path / method
    cli.main(["finetune", "--task", "digits", "--method", method, "--limit", "40", "--batch-size", "8",
              "--backend", "aot_eager", "--lr", "2e-3", "--no-progress", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())[method]
    assert metrics["steps"] == 3 and metrics["test_articles"] == 10  # 10 digits x (3 train, 1 test); 30 // 8
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # mean cross-entropy over 10 classes after 3 steps from random init: near ln(10)
    assert 0.5 < metrics["test_loss"] < 5.0
    assert metrics["peak_rss_bytes"] > 2**20 * 100  # the process, torch included
    if method == "lora":  # adapters on the 3 layers' q/k/v/o (rank 8, hidden 64) and the head
        assert metrics["trainable_parameters"] == 3 * 4 * 8 * (64 + 64) + 64 * 10 + 10
    if method == "slimfit":
        assert metrics["always_train"] == ["classifier.weight"]
        assert metrics["frozen_layers"] > 0
