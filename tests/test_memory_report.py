"""Memory breakdown (eager vs slimfit) and the PNGs drawn from the report's values."""
from __future__ import annotations

import json

import pytest
import torch

import slimfit_fx
from slimfit_fx.plots import group_of, saved_by_group

from .harness import step
from .models import FACTORIES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _trained(freeze_encoder=True):
    case = FACTORIES["bert"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    if freeze_encoder:
        cm.slimfit.set_frozen([n for n in cm.slimfit.layers if ".encoder." in n])
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    step(cm, case)
    opt.step()
    step(cm, case)  # grads present again, optimizer state exists
    return cm, case, opt


def test_breakdown_measures_what_it_can_and_labels_the_rest():
    cm, case, opt = _trained()
    mb = cm.slimfit.memory_breakdown(optimizer=opt, **case.batch)
    rows = {r.component: r for r in mb.rows}
    params = list(cm.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    assert rows["weights"].eager == rows["weights"].slimfit == weight_bytes
    frozen = cm.slimfit.frozen
    trainable = [p for n, p in cm.named_parameters() if n not in frozen]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    assert rows["gradients"].slimfit == trainable_bytes and rows["gradients"].slimfit_measured
    assert rows["gradients"].eager == weight_bytes and not rows["gradients"].eager_measured
    # AdamW: two moments per stepped element (+ a scalar step per tensor)
    assert 2 * trainable_bytes <= rows["optimizer state"].slimfit <= 2 * trainable_bytes + 8 * len(trainable)
    assert rows["saved activations"].slimfit == cm.slimfit.saved_bytes
    assert rows["saved activations"].eager_measured
    assert rows["saved activations"].eager > rows["saved activations"].slimfit
    assert mb.total("slimfit") < mb.total("eager")
    assert "(estimated)" in str(mb)
    assert mb.peak_allocated is None  # CPU: there is no allocator peak to read


def test_eager_measurement_leaves_buffers_alone():
    case = FACTORIES["convnet"]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    step(cm, case)
    before = {n: b.clone() for n, b in cm.named_buffers()}
    cm.slimfit.memory_breakdown(**case.batch)
    for name, b in cm.named_buffers():
        assert torch.equal(b, before[name]), name


def test_save_report_writes_pngs_drawn_from_the_report(tmp_path, monkeypatch):
    import slimfit_fx.plots as plots

    drawn = {}
    for name in ("plot_memory", "plot_saved_by_module"):
        original = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda *a, _f=original, _n=name: drawn.setdefault(_n, _f(*a)))
    cm, case, opt = _trained()
    paths = cm.slimfit.save_report(tmp_path, optimizer=opt, **case.batch)

    for name in ("memory.png", "saved_by_module.png"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        import matplotlib.image

        pixels = matplotlib.image.imread(paths[name])
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"

    saved = json.loads(paths["report.json"].read_text())
    mb = cm.slimfit.memory_breakdown(optimizer=opt, **case.batch)
    for row in mb.rows:
        assert drawn["plot_memory"]["slimfit"][row.component] == pytest.approx((row.slimfit or 0) / 2**20)
        assert drawn["plot_memory"]["eager"][row.component] == pytest.approx((row.eager or 0) / 2**20)
    after = saved_by_group(cm.slimfit.report().saved_tensors)
    for group, (_, mib_after) in drawn["plot_saved_by_module"].items():
        assert mib_after == pytest.approx(after.get(group, 0) / 2**20)
    assert "bert.encoder.layer.1" in drawn["plot_saved_by_module"]
    # a block's input (the hidden state handed to its region) counts for that block
    hidden = [t for t in cm.slimfit.report().saved_tensors if len(t.shape) == 3]
    assert hidden and all(t.module for t in hidden), [t.name for t in hidden if not t.module]
    assert saved["frozen"] == sorted(cm.slimfit.frozen)


def test_group_of_collapses_to_the_repeated_block():
    assert group_of("bert.encoder.layer.11.attention.self") == "bert.encoder.layer.11"
    assert group_of("classifier") == "classifier"
    assert group_of("") == "(other)"


def test_activation_memory_budget_never_adds_bytes_and_keeps_the_numerics():
    """SlimFitConfig.activation_memory_budget reaches the regions' partitioner: no more bytes
    saved, the same gradients (recomputation is exact)."""
    import random

    from .harness import assert_matches_eager
    from .models import bert

    saved = {}
    for budget in (None, 0.1):
        case = bert(batch=4, seq=32)
        cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off", activation_memory_budget=budget)
        frozen = random.Random(0).sample(cm.slimfit.layers, len(cm.slimfit.layers) // 2)
        assert_matches_eager(cm, case, frozen)
        saved[budget] = cm.slimfit.saved_bytes
    # Regions save only what input gradients need (weight-gradient inputs are
    # stashed outside), so a budget finds little cheap to recompute; it must
    # never add bytes or change the numerics.
    assert saved[0.1] <= saved[None]


def test_before_passes_counts_every_call_of_a_repeated_block():
    """The encoder blocks share one compiled region, but each call holds its own
    tensors: the report's before-passes figure is at least the block calls times
    one block's bytes."""
    import re

    from slimfit_fx.graphs import distinct_bytes

    cm, _, _ = _trained(freeze_encoder=False)
    report = cm.slimfit.report()
    before = [t for t in report.saved_tensors_before if not t.resident]
    block_calls = [region.block for region, _ in cm.slimfit.last_step.calls if region.block]
    assert len(block_calls) >= 2 and len(set(block_calls)) == len(block_calls)
    one_block = distinct_bytes([t for t in before if group_of(t.module) == block_calls[0]])
    assert one_block > 0
    printed = int(re.search(r"before passes \(computed\)\s+([\d,]+) B", str(report)).group(1).replace(",", ""))
    assert printed == distinct_bytes(before) >= len(block_calls) * one_block


def test_charts_keep_every_label_inside_the_picture(tmp_path, monkeypatch):
    """No title, label or tick label of the PNGs runs past the figure's edge."""
    import matplotlib.figure
    import matplotlib.text

    outside = []
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        width, height = fig.bbox.width, fig.bbox.height
        for text in fig.findobj(matplotlib.text.Text):
            if text.get_visible() and text.get_text().strip():
                box = text.get_window_extent(renderer)
                if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
                    outside.append((path.name, text.get_text()))
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    case = FACTORIES["bert"]()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", freeze_ratio=0.5)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    for _ in range(2):
        step(cm, case)
        opt.step()
    step(cm, case)
    paths = cm.slimfit.save_report(tmp_path, optimizer=opt, **case.batch)
    assert {"memory.png", "saved_by_module.png", "schedule.png"} <= set(paths)
    assert not outside, outside
