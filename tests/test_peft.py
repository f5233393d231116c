"""PEFT LoRA models: only the adapters are layers, any frozen set of them matches
eager, the ILS schedule trains adapters and never the base weights, the peft
wrapper's own API (reports, save_pretrained) still works through the compiled
module, and LoRA trains under bf16 autocast with compression."""
from __future__ import annotations

import pytest
import torch

import slimfit_fx
from slimfit_fx import capture
from slimfit_fx.numerics import gradient_fidelity

from . import models
from .harness import assert_matches_eager, eager_step, step

peft = pytest.importorskip("peft")

# Attention query/value only, and every dense layer plus a fully trained head.
LORA_CONFIGS = {
    "qv": dict(target_modules=["query", "value"]),
    "qv_dense_head": dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
}

FROZEN_SETS = {
    "none": lambda layers: [],
    "lora_A": lambda layers: [n for n in layers if ".lora_A." in n],
    "lora_B": lambda layers: [n for n in layers if ".lora_B." in n],
    "all_but_last": lambda layers: layers[:-1],
}


def lora_case(config: str, seed: int = 0) -> models.Case:
    """Tiny BERT with LoRA adapters; dropout off so eager and compiled runs agree."""
    case = models.bert(seed)
    # init_lora_weights=False draws lora_B at random instead of zeros: with B = 0
    # every lora_A gradient is zero and a wrong one could not show.
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           **LORA_CONFIGS[config])
    case.model = peft.get_peft_model(case.model, lora)
    return case


def is_adapter(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


@pytest.mark.parametrize("config", LORA_CONFIGS)
def test_only_trainable_adapter_weights_are_layers(config):
    case = lora_case(config)
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad and p.dim() >= 2]
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off")
    layers = cm.slimfit.layers
    assert list(layers) == trainable
    assert layers and all(is_adapter(n) for n in layers), layers
    base = [n for n, p in cm.named_parameters() if not p.requires_grad]
    assert any(n.endswith("query.base_layer.weight") for n in base)
    assert not set(base) & set(layers)
    with pytest.raises(ValueError, match="requires_grad=False are already frozen"):
        cm.slimfit.set_frozen([next(n for n in base if n.endswith("query.base_layer.weight"))])


@pytest.mark.parametrize("config", LORA_CONFIGS)
def test_frozen_adapters_match_eager(config):
    case = lora_case(config)
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="off")
    # One capture, one compile for every frozen set. Base weights (requires_grad=False)
    # get no gradient in either run; the harness checks that with the adapters' gradients.
    for frozen, choose in FROZEN_SETS.items():
        chosen = choose(cm.slimfit.layers)
        assert_matches_eager(cm, case, chosen)
        counters = cm.slimfit.last_step.counters
        assert counters["weight_uses_tapped"] > 0, (frozen, counters)
    assert cm.slimfit.stats["graphs_captured"] == 1


def test_ils_trains_adapters_and_never_moves_base_weights():
    case = lora_case("qv_dense_head")
    cm = slimfit_fx.compile(case.model, backend="aot_eager", compression="off", schedule="ils",
                            freeze_ratio=0.5)
    params = dict(cm.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    # weight_decay would move any parameter the optimizer stepped, base weights included
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    frames = capture.dynamo_compiled_frames()
    sets = []
    for _ in range(3):
        frozen = cm.slimfit.frozen
        before = {n: params[n].detach().clone() for n in cm.slimfit.layers}
        loss = case.loss(cm(**case.batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
        sets.append(frozen)
        for name in frozen:
            assert torch.equal(params[name], before[name]), f"frozen {name} moved"
        assert all(not torch.equal(params[n], before[n]) for n in cm.slimfit.layers if n not in frozen)
    for name, value in base.items():
        assert torch.equal(params[name], value), f"base weight {name} moved"
    assert len(set(sets)) > 1, "the schedule never changed the frozen set"
    assert len(cm.slimfit.frozen) == int(0.5 * len(cm.slimfit.layers))
    assert cm.slimfit.stats["graphs_captured"] == 1
    assert capture.dynamo_compiled_frames() - frames == 1  # frozen-set changes never recompile


def test_peft_api_reaches_through_the_compiled_module(tmp_path, capsys):
    case = lora_case("qv")
    peft_model = case.model
    cm = slimfit_fx.compile(peft_model, schedule="manual", backend="aot_eager", compression="off")
    assert cm.peft_config is peft_model.peft_config
    assert cm.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    cm.print_trainable_parameters()
    assert capsys.readouterr().out == expected and "trainable params" in expected
    assert cm.state_dict().keys() == peft_model.state_dict().keys()

    # Train one step through the compiled module, then save the adapter the peft way.
    cm.slimfit.set_frozen([n for n in cm.slimfit.layers if ".lora_A." in n])
    optimizer = torch.optim.SGD(cm.parameters(), lr=0.1)
    step(cm, case)
    optimizer.step()
    cm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_" in key for key in saved), sorted(saved)  # adapters only

    reloaded = peft.PeftModel.from_pretrained(models.bert().model, tmp_path).train()
    trained = dict(peft_model.named_parameters())
    for name, p in reloaded.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, trained[name]), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**case.batch).logits, peft_model(**case.batch).logits)


def test_lora_under_bf16_autocast_with_paper_compression():
    from .test_autocast import assert_gradients_close, autocast_step, eager_autocast_step

    case = lora_case("qv_dense_head")
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="paper")
    cm.slimfit.set_frozen([n for n in cm.slimfit.layers if ".lora_A." in n])
    loss, _, grads = autocast_step(cm, case)
    ref_loss, _, ref_grads = eager_autocast_step(case, cm.slimfit.frozen)
    counters = cm.slimfit.last_step.counters
    # q and v are base + LoRA sums, still read by the fused attention backward
    assert counters.get("compressed_qkv") == 6 and counters.get("compressed_gelu_input") == 2, counters
    torch.testing.assert_close(loss, ref_loss)
    assert_gradients_close(grads, ref_grads)


def test_base_norms_that_never_train_are_pruned_as_frozen_norms():
    """A peft Llama under "paper", every adapter training: the base RMSNorms'
    weights have requires_grad=False, so no step forms their gradients and their
    inputs in the blocks are stored pruned, as a frozen norm's are (they were
    taken for trainable norms and kept whole). Block 0's first norm saves no
    input: nothing before it needs a gradient. Lossy like any pruned norm:
    measured cosine 0.988 against eager here, where every adapter's gradient
    passes through pruned norms; the floor is the suite's for pruned norms."""
    from .test_compress_pass import LAYERNORM_COSINE_FLOOR

    case = models.llama_lora()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="paper")
    _, _, grads = step(cm, case)
    counters = cm.slimfit.last_step.counters
    assert counters["compressed_rmsnorm_input"] == 3, counters
    assert counters["kept_whole_rmsnorm_input_outside_blocks"] == 1, counters  # the final norm
    assert not any(k.startswith("skipped_unmatched_add") for k in counters), counters
    _, _, ref_grads = eager_step(case.model, case, frozenset())
    assert gradient_fidelity(grads, ref_grads)[0] >= LAYERNORM_COSINE_FLOOR
