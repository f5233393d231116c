"""Frozen layers' optimizer state held small (SlimFitConfig.optimizer_state)."""
from __future__ import annotations

import io
import math

import pytest
import torch

import slimfit_fx
from slimfit_fx import optimizer_state
from slimfit_fx.optimizer_state import LEVELS, SIGNED_LEVELS, PackedState, pack

from . import models

# int8 momentum (linear): round to nearest on a step of absmax / 127, the step
# rounded up by at most 2**-16 (17-bit scale) -> half a step.
SIGNED_BOUND = (1 + 2**-16) / (2 * 127)
# int8 exp_avg (signed log): |m| rounded to the nearest of SIGNED_LEVELS codes per
# octave -> half a code, plus a few float32 ulps.
LOG_BOUND = 2 ** (1 / (2 * SIGNED_LEVELS)) - 1 + 1e-5
# int8 exp_avg_sq: sqrt(v) rounded to the nearest of LEVELS codes per octave ->
# half a code, plus a few float32 ulps of the log/exp2/sqrt arithmetic.
ROOT_BOUND = 2 ** (1 / (2 * LEVELS)) - 1 + 1e-5
# bf16: round to nearest with 8 significant bits.
BF16_BOUND = 2**-8


@pytest.fixture
def pack_every_size(monkeypatch):
    """The tiny models' tensors are under MIN_PACKED_NUMEL: pack them all, so every
    layer's state (and blocks padded to 256) goes through the packed path."""
    monkeypatch.setattr(optimizer_state, "MIN_PACKED_NUMEL", 0)


def _moments(seed: int = 0, numel: int = 256 * 9 + 77) -> torch.Tensor:
    """Values whose magnitude spans 12 decades across blocks and 4 within one, with
    exact zeros: Adam moments look like this (unseen embedding rows are 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 10 ** (4 * torch.rand(numel, generator=g) - 12)
    x[::256] *= 10 ** torch.linspace(0, 8, len(x[::256]))  # one large entry per block
    x[5:300] = 0.0
    return x.reshape(-1, 7) if numel % 7 == 0 else x


def _blockwise_absmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 256)).view(-1, 256)
    return padded.abs().amax(dim=1).repeat_interleave(256)[: flat.numel()].view_as(x)


def test_int8_linear_error_is_half_a_step_of_its_block():
    x = _moments()
    packed = pack(x, "int8", "signed_linear")
    y = packed.unpack()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.all((y - x).abs() <= _blockwise_absmax(x) * SIGNED_BOUND)
    assert torch.equal(y[5:300], x[5:300])  # zeros stay zeros
    assert packed.nbytes == math.ceil(x.numel() / 256) * (256 + 4)


def test_int8_first_moment_is_relatively_accurate_and_never_grows():
    x = _moments(seed=4)
    y = pack(x, "int8", "signed_log").unpack()
    in_range = x.abs() >= _blockwise_absmax(x) * 2 ** (-126 / SIGNED_LEVELS)
    assert torch.all(((y - x).abs() / x.abs())[in_range] <= LOG_BOUND)
    assert torch.all((y == 0) | (y.sign() == x.sign()))
    assert torch.all(y.abs() <= x.abs() * (1 + LOG_BOUND))  # below the range: 0, so an update only shrinks
    assert (~in_range & (x != 0) & (y == 0)).any()  # the data reach below the range


def test_int8_second_moment_stays_non_negative_and_relatively_accurate():
    v = _moments(seed=1).square()
    v[-3] = v[256 * 9:].max() * 1e-20  # far below its block's largest: only over-estimated
    packed = pack(v, "int8", "sqrt_log")
    w = packed.unpack()
    assert torch.all(w >= 0)
    assert torch.equal(w == 0, v == 0)
    in_range = v.sqrt() >= _blockwise_absmax(v.sqrt()) * 2 ** (-254 / LEVELS)
    ratio = (w.sqrt() / v.sqrt())[in_range & (v > 0)]
    assert ratio.max() <= 1 + ROOT_BOUND and ratio.min() >= 1 / (1 + ROOT_BOUND)
    below = ~in_range & (v > 0)
    assert below.any() and torch.all(w[below] >= v[below])  # the denominator never shrinks


def test_bf16_keeps_eight_significant_bits():
    x = _moments(seed=2)
    y = pack(x, "bf16").unpack()
    nonzero = x != 0
    assert torch.all(((y - x).abs() / x.abs())[nonzero] <= BF16_BOUND)


@pytest.mark.parametrize("format, code", [("int8", "signed_linear"), ("int8", "signed_log"),
                                          ("int8", "sqrt_log"), ("bf16", "")])
def test_packing_what_unpacking_returned_changes_nothing(format, code):
    # What makes a state_dict round trip exact: a loaded state is re-packed to the
    # same codes, so it unpacks to the same values.
    x = _moments(seed=3)
    x = x.square() if code == "sqrt_log" else x
    once = pack(x, format, code).unpack()
    twice = pack(once, format, code).unpack()
    assert torch.equal(once, twice)


# -- in training -----------------------------------------------------------------


def _rotating_sets(layers: tuple[str, ...], steps: int) -> list[frozenset[str]]:
    """Each layer frozen for three steps in four, at staggered phases: every layer
    stays frozen across several steps and comes back."""
    return [frozenset(n for i, n in enumerate(layers) if (i + s) % 4 != 0) for s in range(steps)]


def _train_manual(state: str, steps: int = 10, optimizer_class=torch.optim.AdamW, **optimizer_kwargs):
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="manual", optimizer_state=state)
    optimizer = optimizer_class(cm.parameters(), **(optimizer_kwargs or dict(lr=1e-3)))
    initial = {n: p.detach().clone() for n, p in cm.named_parameters()}
    sets = _rotating_sets(cm.slimfit.layers, steps + 1)
    losses, packed_seen = [], 0
    for step in range(steps):
        loss = case.loss(cm(**case.batch))
        loss.backward()
        cm.slimfit.set_frozen(sets[step + 1])  # the next step's set, known before the step, as under ILS
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        packed_seen = max(packed_seen, sum(isinstance(v, PackedState) for s in optimizer.state.values()
                                           for v in s.values()))
    weights = {n: p.detach().clone() for n, p in cm.named_parameters()}
    return losses, initial, weights, packed_seen


def _deviation(weights, reference, initial) -> float:
    """How far the weights are from the reference run's, relative to how far that run moved."""
    diff = sum((weights[n] - reference[n]).square().sum() for n in reference)
    moved = sum((reference[n] - initial[n]).square().sum() for n in reference)
    return (diff / moved).sqrt().item()


# Errors compound: this tiny BERT amplifies small changes (a full run with lr
# 2**-8 higher ends 2% of the movement away), so the bounds are on the end
# weights' distance from the full run, relative to how far it moved.
# int8: every m within 4.4% and sqrt(v) within 3.5% of its own value, errors of
# either sign across elements -> 3%. bf16: each moment within 2**-8 -> 1%.
TOLERANCE = {"full": 0.0, "bf16": 0.01, "int8": 0.03}


@pytest.mark.usefixtures("pack_every_size")
@pytest.mark.parametrize("state", ["full", "bf16", "int8"])
def test_training_matches_full_state_within_tolerance(state):
    _, initial, reference, none_packed = _train_manual("full")
    assert none_packed == 0
    _, _, weights, packed = _train_manual(state)
    deviation = _deviation(weights, reference, initial)
    assert deviation <= TOLERANCE[state], deviation
    if state != "full":
        assert packed > 0 and deviation > 0  # the packed path ran and changed something


@pytest.mark.usefixtures("pack_every_size")
def test_sgd_momentum_buffer_is_packed_and_training_stays_close():
    kwargs = dict(lr=0.05, momentum=0.9)
    _, initial, reference, _ = _train_manual("full", optimizer_class=torch.optim.SGD, **kwargs)
    _, _, weights, packed = _train_manual("int8", optimizer_class=torch.optim.SGD, **kwargs)
    assert packed > 0
    # momentum within 0.4% of its block's largest entry; no second moment to divide by
    assert 0 < _deviation(weights, reference, initial) <= 0.01


@pytest.mark.usefixtures("pack_every_size")
def test_frozen_layers_state_is_untouched_until_they_train_again():
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="manual", optimizer_state="int8")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    params = dict(cm.named_parameters())
    layer = "bert.encoder.layer.0.intermediate.dense.weight"

    def step() -> bool:
        case.loss(cm(**case.batch)).backward()
        had_grad = params[layer].grad is not None
        optimizer.step()
        optimizer.zero_grad()
        return had_grad

    step()  # every layer trains once, so every layer has state
    cm.slimfit.set_frozen([layer])
    step()  # no gradient for the layer; its state is packed after this step
    entry = optimizer.state[params[layer]]
    packed = {k: v for k, v in entry.items() if isinstance(v, PackedState)}
    assert set(packed) == {"exp_avg", "exp_avg_sq"}
    step_count, weight = entry["step"].clone(), params[layer].detach().clone()
    for _ in range(3):  # no gradient: AdamW skips the parameter (no decay either)
        assert not step()
    assert all(entry[k] is v for k, v in packed.items())
    assert torch.equal(entry["step"], step_count) and torch.equal(params[layer], weight)
    cm.slimfit.set_frozen([])
    case.loss(cm(**case.batch)).backward()
    optimizer.step()
    assert not any(isinstance(v, PackedState) for v in entry.values())
    assert entry["step"].item() == step_count.item() + 1


def _ils_run(state: str):
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", freeze_ratio=0.8, optimizer_state=state)
    return case, cm, torch.optim.AdamW(cm.parameters(), lr=1e-2)


def _train(cm, case, optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = case.loss(cm(**case.batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.usefixtures("pack_every_size")
@pytest.mark.parametrize("state", ["bf16", "int8"])
def test_state_dict_is_plain_and_a_resumed_run_repeats_the_losses(state):
    steps, cut = 9, 4
    case, cm, optimizer = _ils_run(state)
    first = _train(cm, case, optimizer, cut)
    saved = optimizer.state_dict()
    assert all(type(v) is torch.Tensor for s in saved["state"].values() for v in s.values())
    assert any(isinstance(v, PackedState) for s in optimizer.state.values() for v in s.values()), \
        "state_dict() unpacked the live state"
    buffer = io.BytesIO()
    torch.save([cm.state_dict(), saved, cm.slimfit.state_dict()], buffer)
    rest = _train(cm, case, optimizer, steps - cut)
    del case, cm, optimizer
    slimfit_fx.capture.reset_dynamo()

    buffer.seek(0)
    model_state, optimizer_sd, slimfit_sd = torch.load(buffer, weights_only=True)
    case, cm, optimizer = _ils_run(state)
    cm.load_state_dict(model_state)
    cm.slimfit.load_state_dict(slimfit_sd)
    optimizer.load_state_dict(optimizer_sd)
    again = optimizer.state_dict()
    assert all(torch.equal(again["state"][i][k], v) for i, s in optimizer_sd["state"].items() for k, v in s.items())
    assert _train(cm, case, optimizer, steps - cut) == rest
    assert first  # the first part ran with packing too


@pytest.mark.usefixtures("pack_every_size")
def test_loading_into_a_watched_optimizer_repacks_the_frozen_layers():
    case, cm, optimizer = _ils_run("int8")
    _train(cm, case, optimizer, 3)
    saved = optimizer.state_dict()
    def packed() -> set[int]:
        return {id(p) for p, s in optimizer.state.items() if any(isinstance(v, PackedState) for v in s.values())}

    before = packed()
    optimizer.load_state_dict(saved)  # this optimizer has stepped: its hooks are attached
    params = dict(cm.named_parameters())
    # Loading re-packs the layers frozen for the next step; a layer packed earlier
    # that trains next would only be unpacked before that step anyway.
    frozen = {id(params[n]) for n in cm.slimfit.frozen if params[n] in optimizer.state}
    assert packed() == frozen and frozen <= before and frozen


def test_int8_holds_about_a_quarter_of_the_frozen_layers_state():
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="manual", optimizer_state="int8")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 1)  # state for every parameter
    full = cm.slimfit.optimizer_state_bytes(optimizer)
    assert full.packed == 0 and full.held == full.plain
    head = "classifier.weight"
    cm.slimfit.set_frozen(set(cm.slimfit.layers) - {head})
    _train(cm, case, optimizer, 1)
    held = cm.slimfit.optimizer_state_bytes(optimizer)
    params = dict(cm.named_parameters())
    # Only tensors of MIN_PACKED_NUMEL elements or more pack; in this tiny BERT
    # that is the 128 x 32 position embedding (16 blocks of 256).
    large = [n for n in cm.slimfit.layers if n != head and params[n].numel() >= optimizer_state.MIN_PACKED_NUMEL]
    assert large == ["bert.embeddings.position_embeddings.weight"]
    numel = params[large[0]].numel()
    assert held.packed_plain == 2 * 4 * numel  # exp_avg and exp_avg_sq, float32
    assert held.packed == 2 * (numel + 4 * numel // 256)  # one byte each, a float32 scale per block
    assert held.packed / held.packed_plain == pytest.approx((1 + 1 / 64) / 4)
    assert held.plain == full.plain and held.held == full.held - held.packed_plain + held.packed
    breakdown = cm.slimfit.memory_breakdown(optimizer=optimizer)
    row = next(r for r in breakdown.rows if r.component == "optimizer state")
    assert row.slimfit == held.held
    assert abs(row.eager - full.plain) <= 1  # eager's estimate: bytes per weight byte times the weights


@pytest.mark.usefixtures("pack_every_size")
def test_bf16_holds_half():
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", schedule="manual", optimizer_state="bf16")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    _train(cm, case, optimizer, 1)
    cm.slimfit.set_frozen(cm.slimfit.layers)
    _train(cm, case, optimizer, 1)
    held = cm.slimfit.optimizer_state_bytes(optimizer)
    assert held.packed_plain > 0 and held.packed * 2 == held.packed_plain


def test_no_momentum_means_nothing_to_pack():
    case = models.bert(seed=0)
    cm = slimfit_fx.compile(case.model, backend="aot_eager", freeze_ratio=0.8, optimizer_state="int8")
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-2)
    _train(cm, case, optimizer, 3)
    assert cm.slimfit.optimizer_state_bytes(optimizer).packed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves CUDA state to pinned host memory")
@pytest.mark.usefixtures("pack_every_size")
def test_offload_on_cuda_is_exact_and_holds_frozen_state_on_the_host():
    def run(state: str):
        case = models.bert(seed=0)
        model = case.model.cuda()
        case.batch = {k: v.cuda() for k, v in case.batch.items()}
        cm = slimfit_fx.compile(model, backend="aot_eager", freeze_ratio=0.8, optimizer_state=state)
        optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
        losses = _train(cm, case, optimizer, 6)
        return losses, cm.slimfit.optimizer_state_bytes(optimizer), dict(cm.named_parameters())

    losses, _, reference = run("full")
    offload_losses, held, weights = run("offload")
    assert offload_losses == losses
    assert all(torch.equal(weights[n], reference[n]) for n in reference)
    assert held.offloaded == held.packed > 0 and held.held == held.plain - held.packed_plain


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["8bit", "INT8", torch.bfloat16, None, 8])
def test_bad_optimizer_state_is_refused(value):
    with pytest.raises(ValueError, match=r"SlimFitConfig.optimizer_state must be one of \('full', 'bf16', "
                                         r"'int8', 'offload'\), got"):
        slimfit_fx.SlimFitConfig(optimizer_state=value)
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        slimfit_fx.compile(models.mlp().model, optimizer_state=value)


def test_offload_on_a_cpu_model_names_the_problem_and_the_fix():
    with pytest.raises(slimfit_fx.SlimFitError, match=r"pinned host memory.*parameters are on cpu.*"
                                                      r"model.cuda\(\).*optimizer_state='int8'"):
        slimfit_fx.compile(models.mlp().model, backend="aot_eager", optimizer_state="offload")


def test_optimizer_state_bytes_wants_an_optimizer():
    cm = slimfit_fx.compile(models.mlp().model, backend="aot_eager")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        cm.slimfit.optimizer_state_bytes(object())


@pytest.mark.usefixtures("pack_every_size")
def test_packing_on_the_host_hands_the_freed_pages_back(monkeypatch):
    """Packed moments free their float tensors; once TRIM_AFTER_BYTES were freed
    the heap is trimmed (here after every step that packed, at a 1-byte
    threshold), never with nothing packed or below the threshold."""
    trims: list[int] = []
    monkeypatch.setattr(optimizer_state.host, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(optimizer_state, "TRIM_AFTER_BYTES", 1)
    _train_manual("int8", steps=4)
    assert len(trims) == 4  # every step froze layers that trained in it
    trims.clear()
    _train_manual("full", steps=4)
    assert trims == []
    monkeypatch.setattr(optimizer_state, "TRIM_AFTER_BYTES", 2**40)
    _train_manual("int8", steps=4)
    assert trims == []
