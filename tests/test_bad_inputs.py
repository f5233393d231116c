"""Bad inputs a user could give, one table: each raises one error of the stated type
whose message names the problem (and, where one exists, the fix), and a refused
call changes no state."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import slimfit_fx
from slimfit_fx import AlreadyCompiledError, SlimFitConfig, cli

from .models import MLP


def _manual() -> slimfit_fx.SlimFitModule:
    return slimfit_fx.compile(MLP(), schedule="manual", backend="aot_eager")


def _ils(**kw) -> slimfit_fx.SlimFitModule:
    return slimfit_fx.compile(MLP(), backend="aot_eager", **kw)


def _snapshot(cm) -> dict:
    state = cm.slimfit.state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@dataclass
class Bad:
    name: str
    target: Callable[[], object]  # builds what the bad call acts on (None: nothing)
    call: Callable[[object], object]
    error: type[BaseException]
    match: str


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _manual()

    def forward(self, x):
        return self.inner(x)


def _ils_state(**changes) -> dict:
    state = _ils().slimfit.state_dict()
    state.update(changes)
    return state


def _on_meta() -> nn.Module:
    with torch.device("meta"):
        return MLP()


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


NOTHING = lambda: None  # noqa: E731
API = [
    Bad("compile a function", NOTHING, lambda _: slimfit_fx.compile(lambda x: x), TypeError,
        "expects a torch.nn.Module"),
    Bad("compile a class", NOTHING, lambda _: slimfit_fx.compile(nn.Linear), TypeError,
        "expects a torch.nn.Module"),
    Bad("compile a state_dict", NOTHING, lambda _: slimfit_fx.compile(MLP().state_dict()), TypeError,
        "not its class, forward method or state_dict"),
    Bad("nothing trainable", NOTHING, lambda _: slimfit_fx.compile(MLP().requires_grad_(False)),
        ValueError, "no parameter with requires_grad=True"),
    Bad("compile a compiled module", _manual, lambda cm: slimfit_fx.compile(cm), AlreadyCompiledError,
        "already a slimfit_fx module"),
    Bad("compile the same model twice", _manual, lambda cm: slimfit_fx.compile(cm.slimfit.model),
        AlreadyCompiledError, "already called"),
    Bad("compile a torch.compile'd model", NOTHING, lambda _: slimfit_fx.compile(torch.compile(MLP())),
        TypeError, "_orig_mod"),
    Bad("a model holding a compiled module", NOTHING, lambda _: slimfit_fx.compile(Outer()),
        AlreadyCompiledError, r"Outer\.inner is already a slimfit_fx module.*cm\.slimfit\.model"),
    Bad("config of the wrong type", NOTHING, lambda _: slimfit_fx.compile(MLP(), {"freeze_ratio": 0.5}),
        TypeError, "config must be a SlimFitConfig"),
    Bad("misspelled override", NOTHING, lambda _: slimfit_fx.compile(MLP(), freez_ratio=0.5), TypeError,
        "unknown SlimFitConfig field"),
    Bad("removed per-set field", NOTHING, lambda _: slimfit_fx.compile(MLP(), max_variants=4), TypeError,
        "max_variants"),
    Bad("always_train names no layer", NOTHING,
        lambda _: slimfit_fx.compile(MLP(), always_train=("net.9.weight",)), KeyError, "net.9.weight"),
    Bad("a model on the meta device", NOTHING, lambda _: slimfit_fx.compile(_on_meta()), ValueError,
        r"on the meta device \('net\.0\.weight' first\).*model\.to_empty\(device='cpu'\) then "
        r"model\.load_state_dict"),
    Bad("freeze_ratio with schedule='manual'", NOTHING,
        lambda _: slimfit_fx.compile(MLP(), schedule="manual", freeze_ratio=0.5), ValueError,
        r"freeze_ratio=0\.5 has no effect with schedule='manual'.*Fix: drop freeze_ratio"),
    Bad("assign frozen (manual)", _manual, lambda cm: setattr(cm.slimfit, "frozen", frozenset()),
        AttributeError, r"cm\.slimfit\.frozen is read-only.*call cm\.slimfit\.set_frozen\(names\)"),
    Bad("assign frozen (ils)", _ils, lambda cm: setattr(cm.slimfit, "frozen", frozenset()), AttributeError,
        r"read-only.*the 'ils' schedule picks.*compile with schedule='manual' and call cm\.slimfit\.set_frozen"),
    Bad("a removed stat", _ils, lambda cm: cm.slimfit.stats["variants_compiled"], KeyError,
        r"no 'variants_compiled': it is now 'regions_compiled'.*The stats are \[.*'graphs_captured'"),
    Bad("a per-set cache stat", _ils, lambda cm: cm.slimfit.stats["cache_hits"], KeyError,
        r"no 'cache_hits': it counted the former per-frozen-set compile cache.*'regions_compiled'"),
    Bad("an unknown stat", _ils, lambda cm: cm.slimfit.stats["saved"], KeyError,
        r"no 'saved': no such stat\. The stats are \[.*'compile_seconds'"),
]
CONFIG = [
    Bad(f"{field}={value!r}", NOTHING, lambda _, f=field, v=value: SlimFitConfig(**{f: v}), error,
        rf"SlimFitConfig\.{field}")
    for field, value, error in [
        ("freeze_ratio", 1.5, ValueError), ("freeze_ratio", -0.1, ValueError),
        ("freeze_ratio", "0.9", TypeError), ("schedule", "sometimes", ValueError),
        ("backend", "tensorrt", ValueError), ("activation_memory_budget", 0.0, ValueError),
        ("activation_memory_budget", "low", TypeError), ("memory_budget", "low", ValueError),
        ("memory_budget", 0.5, ValueError), ("memory_budget", [1], TypeError), ("reschedule_every", 0, ValueError),
        ("seed", -1, ValueError), ("compression", "zip", ValueError),
        ("always_train", "net.0.weight", TypeError),
    ]
] + [
    Bad("SlimFitConfig(max_variants=4)", NOTHING, lambda _: SlimFitConfig(max_variants=4), TypeError,
        r"no longer has \['max_variants'\].*drop the argument"),
    Bad("SlimFitConfig(freez_ratio=...)", NOTHING, lambda _: SlimFitConfig(freez_ratio=0.5), TypeError,
        r"unknown SlimFitConfig field\(s\) \['freez_ratio'\]; the fields are \[.*'freeze_ratio'"),
    Bad("manual with freeze_ratio=0.0", NOTHING,
        lambda _: SlimFitConfig(schedule="manual", freeze_ratio=0.0), ValueError,
        r"SlimFitConfig\.freeze_ratio=0\.0 has no effect with schedule='manual'.*schedule='ils'"),
    Bad("a manual config keeping an explicit ratio", NOTHING,
        lambda _: SlimFitConfig(freeze_ratio=0.5).replace(schedule="manual"), ValueError,
        r"freeze_ratio=0\.5 has no effect with schedule='manual'"),
    Bad("CompressionConfig(weight_input_bits=8.0)", NOTHING,
        lambda _: slimfit_fx.CompressionConfig(weight_input_bits=8.0), ValueError,
        r"CompressionConfig\.weight_input_bits must be 4, 8 or None \(an int\), got 8\.0 of type float"),
]
FROZEN_SETS = [
    Bad("set_frozen: unknown name", _manual, lambda cm: cm.slimfit.set_frozen(["net.9.weight"]),
        KeyError, "not a parameter"),
    Bad("set_frozen: typo", _manual, lambda cm: cm.slimfit.set_frozen(["net.0.wieght"]), KeyError,
        "Did you mean"),
    Bad("set_frozen: a bias", _manual, lambda cm: cm.slimfit.set_frozen(["net.0.bias"]), ValueError,
        "biases always train"),
    Bad("set_frozen: a string", _manual, lambda cm: cm.slimfit.set_frozen("net.0.weight"), TypeError,
        "iterable of parameter names"),
    Bad("set_frozen: not names", _manual, lambda cm: cm.slimfit.set_frozen([3]), TypeError, "must be str"),
    Bad("set_frozen under ILS", _ils, lambda cm: cm.slimfit.set_frozen([]), RuntimeError,
        "schedule='manual'"),
    Bad("slimfit.step() under manual", _manual, lambda cm: cm.slimfit.step(), RuntimeError,
        "schedule='ils'"),
]
STATES = [
    Bad("load a string", _ils, lambda cm: cm.slimfit.load_state_dict("state.pt"), TypeError,
        "expects the dict cm.slimfit.state_dict"),
    Bad("load an empty dict", _ils, lambda cm: cm.slimfit.load_state_dict({}), ValueError,
        "no 'schedule' key"),
    Bad("load model weights", _ils, lambda cm: cm.slimfit.load_state_dict(cm.state_dict()), ValueError,
        "looks like model weights, which cm.load_state_dict loads"),
    Bad("load a manual state into ILS", _ils,
        lambda cm: cm.slimfit.load_state_dict({"schedule": "manual", "frozen": []}), ValueError,
        "compiled with schedule='ils'"),
    Bad("load an ILS state into manual", _manual,
        lambda cm: cm.slimfit.load_state_dict(_ils_state()), ValueError, "compiled with schedule='manual'"),
    Bad("manual state without frozen", _manual,
        lambda cm: cm.slimfit.load_state_dict({"schedule": "manual"}), ValueError, "lacks 'frozen'"),
    Bad("ILS state missing keys", _ils,
        lambda cm: cm.slimfit.load_state_dict(_without(_ils_state(), "scores")), ValueError,
        r"lacks \['scores'\]"),
    Bad("ILS state of another freeze_ratio", _ils,
        lambda cm: cm.slimfit.load_state_dict(_ils(freeze_ratio=0.5).slimfit.state_dict()), ValueError,
        "compiled to freeze 3 \\(freeze_ratio=0.9\\)"),
    Bad("ILS state of other layers", _ils,
        lambda cm: cm.slimfit.load_state_dict(_ils_state(layers=["a", "b"])), ValueError,
        "different set of layers"),
    Bad("ILS state freezing unknown layers", _ils,
        lambda cm: cm.slimfit.load_state_dict(_ils_state(frozen=["x", "y", "z"])), ValueError,
        "not layers of this model"),
    Bad("ILS state with bad scores", _ils,
        lambda cm: cm.slimfit.load_state_dict(_ils_state(scores=torch.zeros(2))), ValueError,
        "scores are not one value per layer"),
    Bad("ILS state with a bad generator", _ils,
        lambda cm: cm.slimfit.load_state_dict(_ils_state(generator=torch.zeros(3, dtype=torch.uint8))),
        ValueError, "generator is not a torch.Generator state"),
]


def _cli(*flags):
    return lambda out: cli.main(["finetune", "--limit", "20", "--out", str(out), "--no-progress", *flags])


def _classes(root, counts):
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i}.txt").write_text(f"{label} words {i}")
    return str(root)


CLI = [
    ("--freeze-ratio 1.5", ["--freeze-ratio", "1.5"], "--freeze-ratio must be in"),
    ("--batch-size 0", ["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ("--epochs 0", ["--epochs", "0"], "--epochs must be an integer >= 1"),
    ("--eager-lr 0", ["--eager-lr", "0"], "--eager-lr must be > 0"),
    ("--lr -1", ["--lr", "-1"], "--lr must be > 0"),
    ("--limit 0", ["--limit", "0"], "--limit must be an integer >= 1"),
    ("--limit 5", ["--limit", "5"], "--limit=5 leaves fewer than 2 articles.*--limit >= 10"),
    ("--seq-len 0", ["--seq-len", "0"], "--seq-len must be an integer >= 1"),
    ("unknown model", ["--model", "bert-9000"], "unknown model 'bert-9000'"),
    ("missing data dir", ["--data-dir", "/nonexistent/news"], "data directory '/nonexistent/news' does not exist"),
    ("--seq-len past the positions", ["--seq-len", "1024"], "--seq-len 1024 is longer than .* 512 positions"),
    ("batch larger than the data", ["--batch-size", "64"], "fewer than one batch of 64; lower --batch-size"),
]
DATA = [
    ("one class", {"sport": 5}, "at least two class folders"),
    ("a class with one article", {"sport": 5, "tech": 1}, "'tech' .* holds 1 .txt file"),
    ("no class folders", {}, "at least two class folders"),
]


@pytest.mark.parametrize("bad", API + CONFIG + FROZEN_SETS + STATES, ids=lambda b: b.name)
def test_api_refuses_with_a_clear_error_and_changes_nothing(bad):
    target = bad.target()
    before = _snapshot(target) if target is not None else None
    with pytest.raises(bad.error, match=bad.match):
        bad.call(target)
    if target is not None:
        assert _same(_snapshot(target), before), "a refused call changed the slimfit state"


@pytest.mark.parametrize("name, flags, match", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_with_one_line_naming_the_flag(tmp_path, name, flags, match):
    with pytest.raises(SystemExit, match=match):
        _cli(*flags)(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("name, counts, match", DATA, ids=[d[0] for d in DATA])
def test_cli_refuses_bad_data_folders(tmp_path, name, counts, match):
    data = _classes(tmp_path / "data", counts)
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(SystemExit, match=match):
        cli.main(["finetune", "--data-dir", data, "--out", str(tmp_path / "run"), "--no-progress"])


def test_the_table_holds_forty_bad_inputs():
    assert len(API + CONFIG + FROZEN_SETS + STATES) + len(CLI) + len(DATA) >= 40
