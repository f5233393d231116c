"""Compression coverage across model families: saved bytes and gradient fidelity.

    python benchmarks/families.py [--backend aot_eager|inductor] [--only llama,t5] [--freeze-ratio R]

Tiny random-init configs of HF model families (decoder LMs, encoders,
encoder-decoders, vision, conv), the first half of `cm.slimfit.layers` frozen
(with --freeze-ratio R: the seeded draw of int(R * layers) layers, the head
training, that `slimfit_fx.finetune.seeded_frozen_set` makes), one step. Saved bytes are what the step holds from forward to backward
(parameters and inputs excluded); "eager" is eager PyTorch with the same frozen
set. Gradient cosine is against that eager step. The last column lists what
"paper" left uncompressed with a reason (`skipped_*`, `kept_whole_*` counters).
Prints one table and writes it to docs/families.md.
"""
from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

import slimfit_fx
from slimfit_fx import zoo
from slimfit_fx.finetune import seeded_frozen_set
from slimfit_fx.layers import find_layers
from slimfit_fx.memory import eager_frozen, eager_saved_bytes
from slimfit_fx.numerics import gradient_fidelity

DOC = Path(__file__).resolve().parent.parent / "docs" / "families.md"
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


def _ids(batch=2, seq=10, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pixels(batch=2, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def bert():
    return zoo.bert_tiny(dropout=0.0)


def distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=2, dropout=0.0,
                              attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3)
    return DistilBertForSequenceClassification(config), {"input_ids": _ids(), "labels": torch.tensor([0, 2])}


def vit():
    return zoo.vit_tiny(dropout=0.0)


def swin():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                        window_size=2, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        drop_path_rate=0.0)
    return SwinForImageClassification(config), {"pixel_values": _pixels(), "labels": torch.tensor([1, 3])}


def clip_vision():
    from transformers import CLIPConfig, CLIPForImageClassification

    config = CLIPConfig(vision_config=dict(image_size=16, patch_size=4, **SMALL),
                        text_config=dict(vocab_size=64, **SMALL), num_labels=4)
    return CLIPForImageClassification(config), {"pixel_values": _pixels(), "labels": torch.tensor([1, 3])}


def gpt2():
    return zoo.gpt2_tiny(dropout=0.0)


def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=64, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         use_cache=False, **SMALL)
    return GemmaForCausalLM(config), {"input_ids": _ids(), "labels": _ids()}


def nemotron():
    from transformers import NemotronConfig, NemotronForCausalLM

    # ReLU^2 FFN (hidden_act "relu2"), LayerNorm with 1 + w, grouped-query attention
    config = NemotronConfig(vocab_size=64, num_key_value_heads=1, max_position_embeddings=64, use_cache=False,
                            **SMALL)
    return NemotronForCausalLM(config), {"input_ids": _ids(), "labels": _ids()}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                      dropout_rate=0.0, use_cache=False, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config), {"input_ids": _ids(), "labels": _ids(seq=8, seed=1)}


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
                        max_position_embeddings=64, dropout=0.0, use_cache=False)
    return BartForConditionalGeneration(config), {"input_ids": _ids(), "labels": _ids(seq=8, seed=1)}


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_source_positions=16, max_target_positions=32,
                           use_cache=False, decoder_start_token_id=0, pad_token_id=0)
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    return WhisperForConditionalGeneration(config), {"input_features": features, "labels": _ids(seq=8, seed=1)}


def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    # disentangled attention: content-to-position and position-to-content terms;
    # problem_type set: its default loss gathers the labelled rows (nonzero, a graph break)
    config = DebertaV2Config(vocab_size=64, relative_attention=True, pos_att_type=["c2p", "p2c"],
                             max_relative_positions=16, position_buckets=8, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, num_labels=3,
                             problem_type="single_label_classification", **SMALL)
    return DebertaV2ForSequenceClassification(config), {"input_ids": _ids(), "labels": torch.tensor([0, 2])}


def llama_lora():
    import peft

    # LoRA r=8 on the attention linears; lora_B drawn at random (not zeros) so
    # lora_A's gradients are not all zero and the cosine can see them
    model, batch = zoo.llama_tiny()
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return peft.get_peft_model(model, lora), batch


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=4)
    return ResNetForImageClassification(config), {"pixel_values": _pixels(size=32), "labels": torch.tensor([1, 3])}


FAMILIES = {
    "bert": bert, "distilbert": distilbert, "vit": vit, "swin": swin, "clip-vision": clip_vision,
    "gpt2": gpt2, "opt": zoo.opt_tiny, "llama": zoo.llama_tiny, "qwen2": zoo.qwen2_tiny, "mistral": zoo.mistral_tiny,
    "gemma": gemma, "nemotron": nemotron, "t5": t5, "bart": bart, "whisper": whisper, "resnet": resnet,
    "deberta-v2": deberta_v2, "llama-lora": llama_lora,
}


# The presets measured per family; "norms-float8" is compile(model)'s default.
COMPRESSIONS = ("off", "paper", "norms-float8", "extended")


NOTES = """"freeze only" is slimfit with compression off: what a region saves and
what it stashes for the trainable layers' weight gradients, each storage counted
once, as eager counts. Below 1.00x where backward reads a tensor for its shape
only (a frozen conv's input, max pooling's input: zeros stand in, see
`drop_shape_only_saves`) or the regions save less than eager's autograd; above
where regions hand RoPE tables or masks to each other.

"default (norms-float8)": `compile(model)`'s own compression, "paper" with each
frozen norm's x_hat whole in float8 instead of its top 10%; nothing is dropped,
so it also stores the norms outside the blocks that "paper" keeps whole.

"of which trainable inputs": what the trainable half's weight gradients read,
stashed at run time. "paper" keeps them whole, as the paper does, but for the
FFN output dense's input (int8) and a gated FFN's down projection input;
"extended" packs them all (int8, per-row scale). They alone weigh 0.2-0.5x of
eager at half the layers frozen, so "paper" cannot reach 0.5x where they weigh
more than about 0.35x: everything the frozen half and the static activations
hold would have to fit in the rest.

What "paper" leaves whole, by counter: `kept_whole_*_outside_blocks`: norms
outside the repeated blocks (norm_guard); `skipped_unmatched_<op>`: activations no
pattern knows, by the op that made them: `getitem` (LayerNorm mean/rstd, fused
attention's logsumexp, BatchNorm's statistics, pooling indices: per row or per
channel), `rsqrt` (RMSNorm's per-row scale), `where` (additive attention masks),
`_log_softmax` (the loss over the vocabulary), `add` (a post-LN block's or a
residual's sum read by a whole-kept norm), `cat` (partially rotated Q/K),
`input` (activations handed between regions: RoPE tables, masks);
`skipped_*_also_returned`: tensors also handed to the next region or the user.
At these tiny sizes per-row statistics, masks and the vocabulary's log-softmax
weigh far more than at real ones.
"""


def grads_of(module, batch) -> dict[str, torch.Tensor | None]:
    module.zero_grad(set_to_none=True)
    module(**batch).loss.backward()
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}


def compare(grads, reference) -> float:
    # a parameter the loss never reads gets no gradient in eager; slimfit may hand it zeros
    grads = {n: None if reference[n] is None and (g is None or not g.any()) else g for n, g in grads.items()}
    return gradient_fidelity(grads, reference)[0]


def measure(name: str, backend: str, freeze_ratio: float | None = None) -> dict:
    torch.manual_seed(0)
    model, batch = FAMILIES[name]()
    model.train()
    if hasattr(model, "loss_type") and "labels" in batch and "input_ids" in batch and model.loss_type is None:
        model.loss_type = "ForCausalLM"
    layers = slimfit_fx.compile(copy.deepcopy(model), backend="aot_eager").slimfit.layers
    if freeze_ratio is None:
        frozen = frozenset(layers[: len(layers) // 2])
    else:
        frozen = frozenset(seeded_frozen_set(find_layers(model), freeze_ratio, seed=0))
    eager = eager_saved_bytes(model, frozen=frozen, **batch)
    with eager_frozen(model, frozen):
        reference = grads_of(model, batch)
    row = {"layers": len(layers), "eager": eager}
    for compression in COMPRESSIONS:
        cm = slimfit_fx.compile(copy.deepcopy(model), schedule="manual", backend=backend, compression=compression)
        cm.slimfit.set_frozen(frozen)
        grads = grads_of(cm, batch)
        row[compression] = (cm.slimfit.saved_bytes, compare(grads, reference))
        if compression == "paper":
            row["stash"] = cm.slimfit.last_step.stash_bytes
            counters = cm.slimfit.last_step.counters
            row["packed"] = {k.removeprefix("compressed_"): v for k, v in counters.items()
                             if k.startswith("compressed_")}
            row["left"] = {k: v for k, v in counters.items() if k.startswith(("skipped_", "kept_whole_"))}
        slimfit_fx.capture.reset_dynamo()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="aot_eager", choices=("aot_eager", "inductor"))
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--freeze-ratio", type=float, default=None,
                        help="freeze the seeded draw of this share of the layers (default: the first half)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAMILIES)
    how = ("first half of the layers frozen" if args.freeze_ratio is None
           else f"a seeded {args.freeze_ratio:.0%} of the layers frozen")
    lines = [f"Tiny random-init configs, {how}, one step, backend {args.backend}; "
             f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| family | layers | eager saved KiB | freeze only | paper | of which trainable inputs | default "
             "(norms-float8) | extended | cosine paper | cosine default | cosine extended | packed by \"paper\" "
             "| left whole by \"paper\" |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name in names:
        try:
            r = measure(name, args.backend, args.freeze_ratio)
        except Exception as err:  # one family's failure is a row, not the end of the table
            lines.append(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} |")
            print(lines[-1], flush=True)
            continue
        ratio = {c: r[c][0] / r["eager"] for c in COMPRESSIONS}
        packed = ", ".join(f"{k} {v}" for k, v in sorted(r["packed"].items())) or "-"
        left = ", ".join(f"{k} {v}" for k, v in sorted(r["left"].items())) or "-"
        lines.append(f"| {name} | {r['layers']} | {r['eager'] / 1024:.1f} | {ratio['off']:.2f}x | "
                     f"{ratio['paper']:.2f}x | {r['stash'] / r['eager']:.2f}x | {ratio['norms-float8']:.2f}x | "
                     f"{ratio['extended']:.2f}x | {r['paper'][1]:.5f} | {r['norms-float8'][1]:.5f} | "
                     f"{r['extended'][1]:.5f} | {packed} | {left} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    if not args.only and args.freeze_ratio is None:
        command = "python benchmarks/families.py" + (f" --backend {args.backend}" if args.backend != "aot_eager" else "")
        DOC.write_text("# Compression across model families\n\nCommand: `" + command + "`\n\n"
                       "Ratios are saved bytes against eager with the same frozen set.\n\n" + text + "\n\n"
                       + NOTES)


if __name__ == "__main__":
    main()
