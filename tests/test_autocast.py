"""Training under torch.autocast("cpu", bfloat16): compiled runs match eager under
autocast, and compress_saved packs the bf16 tensors autocast saves (Q/K/V, GELU
input and output, softmax probabilities, also when a cast stands between them and
the op that identifies them) and unpacks them as bf16."""
from __future__ import annotations

import pytest
import torch

import slimfit_fx
from slimfit_fx.numerics import gradient_fidelity

from . import models
from .harness import TOLERANCE, eager_step, packed_count, step
from .models import FACTORIES

# Compression off: aot_eager runs the same aten kernels on the same bf16 values as
# eager autocast (AOTAutograd traces autocast's casts into the graph), so the
# harness's TOLERANCE holds; measured, every loss, output and gradient was equal.
#
# Compression on vs off: the fp32 floors of tests/test_compress_pass.py. Both runs
# round to bf16 (8 significant bits, relative step 2^-8) in the same places, so
# what differs is only the packed codes: Q/K/V on a 1/16 step and GELU inputs on a
# 1/2 step, far coarser than bf16, and bf16 values pack without rounding first
# (every code is exact in bf16). Measured: cosine >= 0.998, SQNR >= 24 dB.
COSINE_FLOOR = 0.99
SQNR_FLOOR_DB = 20.0

TRANSFORMERS = ["bert", "vit", "gpt2"]


def autocast_step(module: torch.nn.Module, case: models.Case):
    return step(module, case, autocast=torch.bfloat16)


def eager_autocast_step(case: models.Case, frozen):
    return eager_step(case.model, case, frozen, autocast=torch.bfloat16)


def first_half(cm) -> list[str]:
    layers = cm.slimfit.layers
    return list(layers[: len(layers) // 2])


def first_half_matrices(cm) -> list[str]:
    # No frozen normalization weight: a frozen LayerNorm's input is pruned, not
    # quantized, and these tests are about the quantized kinds.
    params = dict(cm.named_parameters())
    return [n for n in first_half(cm) if params[n].dim() >= 2]


def compile_case(name: str, compression, backend: str = "aot_eager", case=None, frozen=first_half):
    case = case or FACTORIES[name]()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend=backend, compression=compression)
    cm.slimfit.set_frozen(frozen(cm))
    return case, cm


def assert_gradients_close(grads, ref_grads) -> None:
    """Same set of gradients, and the cosine/SQNR floors over all of them."""
    cosine, sqnr = gradient_fidelity(grads, ref_grads)
    assert cosine >= COSINE_FLOOR and sqnr >= SQNR_FLOOR_DB, (cosine, sqnr)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_matches_eager_autocast_without_compression(name):
    case, cm = compile_case(name, "off")
    loss, output, grads = autocast_step(cm, case)
    ref_loss, ref_output, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    assert output.dtype == ref_output.dtype == torch.bfloat16  # autocast took effect
    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(output, ref_output, rtol=TOLERANCE, atol=TOLERANCE)
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values() if g is not None))
    for param, ref in ref_grads.items():
        if ref is None:
            assert grads[param] is None, f"{param} is frozen but got a gradient"
            continue
        assert grads[param].dtype == torch.float32  # parameters stay fp32 under autocast
        err = (grads[param].double() - ref.double()).norm() / ref_norm
        assert err <= TOLERANCE, f"{param}: gradient error {err:.2e} of the model's grad norm"


@pytest.mark.parametrize("compression", ["paper", "row"])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_compression_packs_bf16_saves_and_unpacks_bf16(name, compression):
    case, cm = compile_case(name, compression, frozen=first_half_matrices)
    loss, _, grads = autocast_step(cm, case)
    ref_loss, _, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    last = cm.slimfit.last_step
    counters = last.counters
    # Same counts as fp32 (tests/test_compress_pass.py): nothing is skipped for
    # being bf16. GPT-2 returns k and v to the user, so only q is packed there.
    assert counters.get("compressed_qkv") == (2 if name == "gpt2" else 6), counters
    assert counters.get("compressed_gelu_input") == 2, counters
    # skipped_unmatched_<op> counts activations no pattern knows, whatever their dtype
    assert not [k for k in counters if k.startswith("skipped_") and k != "skipped_qkv_also_returned"
                and not k.startswith("skipped_unmatched_")], counters

    packed = [n for n in last.saved_nodes("forward") if "compress_saved" in n.meta.get("slimfit", {})]
    assert len(packed) >= counters["tensors_compressed"]
    for node in packed:
        tag = node.meta["slimfit"]["compress_saved"]
        source = next(n for n in node.graph.nodes if n.name == tag["from"]).meta["val"]
        # autocast runs LayerNorm in fp32, so a norm's input (the residual stream a
        # block receives) may be fp32; every other packed activation is bf16
        expected = (torch.bfloat16, torch.float32) if tag["kind"].startswith("layernorm") else (torch.bfloat16,)
        assert source.dtype in expected, tag
        assert tag["bytes_before"] == source.numel() * source.element_size()
        assert tag["bytes_after"] < tag["bytes_before"]
    unpacked = [n for n in last.graph_nodes("backward")
                if n.target in (torch.ops.slimfit.dequantize_fixed.default,
                                torch.ops.slimfit.dequantize_rowwise.default,
                                torch.ops.slimfit.dequantize_binned.default)]
    # GPT-2's tanh GELU output is rebuilt from its input: one more unpack each
    # (pruned LayerNorms are restored by unprune_topk, not a dequantize)
    pruned = packed_count(counters, "layernorm", "layernorm_input")
    assert len(unpacked) == counters["tensors_compressed"] - pruned + counters.get("recomputed_gelu_tanh", 0)
    assert counters.get("recomputed_gelu_tanh", 0) == (2 if name == "gpt2" else 0), counters
    assert {n.meta["val"].dtype for n in unpacked} == {torch.bfloat16}
    assert {n.args[-1] for n in unpacked} == {torch.bfloat16}  # the dtype the kernel returns

    report = cm.slimfit.report()
    assert report.pass_counters["compressed_qkv"] == counters["compressed_qkv"]
    before = [t for t in report.saved_tensors_before if t.changed_by.startswith("compress_saved")]
    assert before and {t.dtype for t in before if "layernorm" not in t.changed_by} == {"bfloat16"}

    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)  # forward is exact
    assert_gradients_close(grads, ref_grads)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_extended_compression_packs_trainable_inputs_under_autocast(name):
    """"extended" adds the trainable layers' inputs: bf16 copies a Linear reads,
    fp32 x_hat or input of a LayerNorm (autocast keeps LayerNorm fp32). Each
    unpacks to its own dtype; nothing is skipped."""
    case, cm = compile_case(name, "extended", frozen=first_half_matrices)
    loss, _, grads = autocast_step(cm, case)
    ref_loss, _, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    last = cm.slimfit.last_step
    counters = last.counters
    assert packed_count(counters, "weight_input", "weight_input_layernorm_input") >= 3, counters
    # skipped_unmatched_<op> counts activations no pattern knows, whatever their dtype
    assert not [k for k in counters if k.startswith("skipped_") and k != "skipped_qkv_also_returned"
                and not k.startswith("skipped_unmatched_")], counters
    for node in last.graph_nodes("backward"):
        if node.target == torch.ops.slimfit.dequantize_rowwise.default:
            assert node.meta["val"].dtype == node.args[-1] in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)  # forward is exact
    assert_gradients_close(grads, ref_grads)


def test_compression_lowers_measured_saved_bytes_under_autocast():
    measured = {}
    for compression in ("off", "paper"):
        case, cm = compile_case("bert", compression, frozen=first_half_matrices)
        autocast_step(cm, case)
        measured[compression] = cm.slimfit.saved_bytes
    assert measured["paper"] < measured["off"], measured


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16_autocast", "fp32"])
def test_every_saved_copy_of_softmax_probabilities_is_packed(autocast):
    # Eager attention saves the probabilities twice: the softmax output for the
    # softmax backward, and the copy the P @ V matmul read for V's gradient. That
    # copy is a clone (dropout with p=0), cast to bf16 under autocast.
    case = models.bert(batch=2, seq=12)
    case.model.set_attn_implementation("eager")
    case, cm = compile_case("bert", "paper", case=case, frozen=first_half_matrices)
    if autocast:
        loss, _, grads = autocast_step(cm, case)
        ref_loss, _, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    else:
        loss, _, grads = step(cm, case)
        ref_loss, _, ref_grads = eager_step(case.model, case, cm.slimfit.frozen)
    last = cm.slimfit.last_step
    assert last.counters.get("compressed_softmax") == 4, last.counters  # 2 layers x 2 copies
    probabilities = 2 * 2 * 12 * 12  # batch x heads x seq x seq; no other saved tensor has this size
    unpacked = [n for n in last.saved_nodes("forward")
                if n.meta["val"].is_floating_point() and n.meta["val"].numel() == probabilities]
    assert not unpacked, [(n.name, n.meta["val"].dtype) for n in unpacked]
    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
    assert_gradients_close(grads, ref_grads)


def test_inductor_packs_bf16_gelu_inputs_and_nothing_else():
    # Inductor decomposes GELU and upcasts its bf16 input to fp32 before the erf;
    # BERT's pooler LayerNorm output reaches a tanh too, but through a Linear.
    case, cm = compile_case("bert", "paper", backend="inductor", frozen=first_half_matrices)
    loss, _, grads = autocast_step(cm, case)
    ref_loss, _, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    counters = cm.slimfit.last_step.counters
    assert counters.get("compressed_qkv") == 6 and counters.get("compressed_gelu_input") == 2, counters
    assert not [k for k in counters if k.startswith("skipped_") and not k.startswith("skipped_unmatched_")], counters
    # inductor computes bf16 elementwise math in fp32 and rounds once per kernel,
    # so even the forward differs from eager by bf16 rounding (2^-8 relative)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    assert_gradients_close(grads, ref_grads)


def test_ils_trains_under_autocast_with_compression():
    case = models.bert()
    cm = slimfit_fx.compile(case.model, backend="aot_eager", compression="paper", schedule="ils",
                            freeze_ratio=0.5)
    params = dict(cm.named_parameters())
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    losses, sets = [], []
    for _ in range(4):
        frozen = cm.slimfit.frozen
        before = {n: params[n].detach().clone() for n in frozen}
        loss, _, _ = autocast_step(cm, case)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        sets.append(frozen)
        assert all(torch.equal(params[n], before[n]) for n in frozen)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert len(set(sets)) > 1
    assert cm.slimfit.stats["graphs_captured"] == 1
    assert cm.slimfit.report().pass_counters["compressed_qkv"] == 6
