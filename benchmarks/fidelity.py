"""Gradient fidelity of each compressed kind alone, on the main job's model and data.

    python benchmarks/fidelity.py [--seed 0] [--batch 16] [--seq 128] [--freeze-ratio 0.9]

all-MiniLM-L6-v2 (pretrained) with a fresh 5-class head, one BBC News training
batch, dropout on as in training, one seeded frozen draw (the head trains),
backend aot_eager. Every case is one forward/backward under the same seed (same
dropout masks); its gradients are compared with compression "off" (freeze
only, the exact gradients of that frozen set) by cosine and SQNR. Cases: the
presets, then each kind of the "paper" preset alone, then "paper" with one kind
changed. Writes its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from doc import write_section

import slimfit_fx
from slimfit_fx import capture
from slimfit_fx.config import COMPRESSION_PRESETS
from slimfit_fx.data import load_bbc_news, load_classifier, load_tokenizer, resolve_model_dir
from slimfit_fx.finetune import COMPRESSIONS, seeded_frozen_set
from slimfit_fx.numerics import gradient_fidelity

PAPER = COMPRESSION_PRESETS["paper"]
CASES = {
    "off (reference)": "off",
    "paper": "paper",
    "paper-exact (the paper's GELU formats)": "paper-exact",
    "row": "row",
    "extended": "extended",
    # each kind alone at the paper's format: the configs `finetune --compression only-<field>` runs
    "Q/K/V int8 Q3.4 alone": COMPRESSIONS["only-qkv_bits"],
    "Q/K/V int8 per-row scale alone": COMPRESSIONS["only-qkv_bits-row"],
    "softmax uint8 alone": COMPRESSIONS["only-softmax_bits"],
    "GELU input 4-bit alone": COMPRESSIONS["only-gelu_input_bits"],
    "GELU output float8 alone": COMPRESSIONS["only-gelu_output_bits"],
    "frozen LayerNorm top 10% alone": COMPRESSIONS["only-layernorm_keep"],
    "frozen LayerNorm float8 alone": dataclasses.replace(COMPRESSIONS["only-layernorm_keep"], layernorm_keep=None,
                                                         layernorm_bits=8),
    "paper, GELU input 8-bit": dataclasses.replace(PAPER, gelu_input_bits=8),
    "paper, GELU input whole": dataclasses.replace(PAPER, gelu_input_bits=None),
    "paper, frozen LayerNorm whole": dataclasses.replace(PAPER, layernorm_keep=None),
    "norms-float8 (paper, frozen LayerNorm float8)": "norms-float8",
}


def stored_tensors(model_dir, batch) -> str:
    """SQNR of the tensors three kinds store, packed and unpacked by each candidate
    format, from one eval forward of the pretrained model (no training, no head
    effect): the GELU outputs (the FFN output dense's input) and the encoder
    LayerNorms' x_hat (a frozen norm's input gradient reads it), and the
    attention's Q, K and V (the projections' outputs, before the heads split)."""
    from slimfit_fx import ops

    model = load_classifier(model_dir, 5).eval()
    gelu, x_hat, qkv = [], [], []
    for name, module in model.named_modules():
        if name.endswith(("attention.self.query", "attention.self.key", "attention.self.value")):
            label, layer = name.rsplit(".", 1)[1][0].upper(), int(name.split("layer.")[1].split(".")[0])
            module.register_forward_hook(lambda m, i, o, key=(label, layer): qkv.append((*key, o.detach())))
        if type(module).__name__ == "BertIntermediate":
            module.register_forward_hook(lambda m, i, o: gelu.append(o.detach()))
        if isinstance(module, torch.nn.LayerNorm) and ".encoder." in f".{name}":
            module.register_forward_hook(lambda m, i, o: x_hat.append(torch.nn.functional.layer_norm(
                i[0].detach(), i[0].shape[-1:])))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})

    def sqnr(x, x_back):
        return 10 * torch.log10(x.double().pow(2).mean() / (x.double() - x_back.double()).pow(2).mean()).item()

    shape = lambda x: list(x.shape)  # noqa: E731
    formats = {
        "int8 Q3.4 (paper)": lambda x: ops.dequantize_fixed(ops.quantize_fixed(x, 8, 4, True), 8, 4, True, shape(x),
                                                            x.dtype),
        "float8 e4m3": lambda x: ops.dequantize_float8(ops.quantize_float8(x), shape(x), x.dtype),
        "int8, per-row scale": lambda x: ops.dequantize_rowwise(*ops.quantize_rowwise(x, 8), 8, shape(x), x.dtype),
        "top 10% of each row (paper, norms)": lambda x: ops.unprune_topk(*ops.prune_topk(x, 0.1), shape(x), x.dtype),
    }
    lines = ["| tensor | layer | largest value | " + " | ".join(f"{f} dB" for f in formats) + " |",
             "|---|---:|---:|" + "---:|" * len(formats)]
    named = [*(("GELU output", i, x) for i, x in enumerate(gelu)),
             *(("LayerNorm x_hat", i, x) for i, x in enumerate(x_hat)),
             *qkv]
    for label, layer, x in named:
        cells = " | ".join(f"{sqnr(x, back(x)):.1f}" for back in formats.values())
        lines.append(f"| {label} | {layer} | {x.abs().max().item():.1f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--freeze-ratio", type=float, default=0.9)
    args = parser.parse_args()
    model_dir = resolve_model_dir("all-minilm-l6-v2")
    data = load_bbc_news(load_tokenizer(model_dir), args.seq, seed=args.seed)
    batch = {k: v[: args.batch] for k, v in data.train.items()}
    rows, reference = [], None
    for name, compression in CASES.items():
        torch.manual_seed(args.seed)  # the same head init in every case
        model = load_classifier(model_dir, len(data.classes))
        cm = slimfit_fx.compile(model, schedule="manual", backend="aot_eager", compression=compression)
        cm.slimfit.set_frozen(seeded_frozen_set(cm.slimfit.layers, args.freeze_ratio, args.seed))
        cm.train()
        torch.manual_seed(args.seed)  # the same dropout masks in every case
        cm(**batch).loss.backward()
        grads = {n: p.grad for n, p in cm.named_parameters() if p.grad is not None}
        reference = grads if reference is None else reference
        rows.append((name, cm.slimfit.saved_bytes, *gradient_fidelity(grads, reference)))
        capture.reset_dynamo()
    lines = [f"all-MiniLM-L6-v2 + fresh head, BBC News batch {args.batch} x {args.seq}, dropout on, "
             f"{args.freeze_ratio:.0%} of the layers frozen (seed {args.seed} draw, the head trains), "
             "aot_eager. Gradients of one step against compression \"off\" under the same seed.", "",
             "| case | saved MiB | grad cosine | grad SQNR dB |", "|---|---:|---:|---:|"]
    for i, (name, saved, cosine, sqnr) in enumerate(rows):
        fidelity = "reference | reference" if i == 0 else f"{cosine:.5f} | {sqnr:.1f}"
        lines.append(f"| {name} | {saved / 2**20:.1f} | {fidelity} |")
    lines += ["", "The stored tensors themselves, packed and unpacked by each format (same batch, "
              "pretrained weights, one eval forward): signal to error in dB.", "",
              stored_tensors(model_dir, batch)]
    body = "\n".join(lines)
    print(body)
    write_section("fidelity", "Gradient fidelity per compressed kind (main job's model)", body)


if __name__ == "__main__":
    main()
