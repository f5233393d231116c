"""Tiny random-init models for the tests: real HF architectures and plain torch nets.

Each factory returns a Case: the model (train mode, dropout off so eager and
compiled runs see the same function) and a seeded batch with its loss.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimfit_fx import zoo


@dataclass
class Case:
    model: nn.Module
    batch: dict[str, torch.Tensor]
    loss: Callable[[Any], torch.Tensor]  # model output -> scalar loss


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hf_loss(output: Any) -> torch.Tensor:
    return output.loss


def bert(seed: int = 0, batch: int = 2, seq: int = 12) -> Case:
    return Case(*zoo.bert_tiny(seed=seed, batch=batch, seq=seq, dropout=0.0), hf_loss)


def vit(seed: int = 0, batch: int = 2) -> Case:
    return Case(*zoo.vit_tiny(seed=seed, batch=batch, dropout=0.0), hf_loss)


def deit(seed: int = 0, batch: int = 2) -> Case:
    return Case(*zoo.deit_tiny(seed=seed, batch=batch, dropout=0.0), hf_loss)


def gpt2(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.gpt2_tiny(seed=seed, batch=batch, seq=seq, dropout=0.0), hf_loss)


def llama(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.llama_tiny(seed=seed, batch=batch, seq=seq), hf_loss)


def llama_eager_attention(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.llama_tiny(seed=seed, batch=batch, seq=seq, attention="eager"), hf_loss)


def opt(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.opt_tiny(seed=seed, batch=batch, seq=seq), hf_loss)


def qwen2(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.qwen2_tiny(seed=seed, batch=batch, seq=seq), hf_loss)


def mistral(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    return Case(*zoo.mistral_tiny(seed=seed, batch=batch, seq=seq), hf_loss)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
            nn.Linear(32, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ConvPoolNet(nn.Module):
    """A ResNet stem and block in miniature: conv, BatchNorm, ReLU, max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class RunningStatsNet(nn.Module):
    """Norms that update running statistics in a training forward: BatchNorm, and
    InstanceNorm with track_running_stats (which averages them over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)  # CLIP's activation


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's LayerNorm: scales by 1 + weight (weight initialised at zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(nn.functional.relu(x))  # transformers' "relu2"


class ActivationMLP(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LearnedTokens(nn.Module):
    """A ViT stem in miniature with DeiT's two learned tokens: each is expanded over
    the batch and concatenated with the patch activations, and a learned position
    embedding is added. Both tokens meet in one cat, as do the activations."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.dist_token = nn.Parameter(torch.randn(1, 1, 16))
        self.position = nn.Parameter(torch.randn(1, 8, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x)
        batch = tokens.shape[0]
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1),
                            torch.relu(tokens)), dim=1) + self.position
        return self.head(tokens[:, 0] + tokens[:, 1] + tokens[:, 2:].mean(dim=1))


def _classifier_case(model: nn.Module, seed: int, shape: tuple[int, ...]) -> Case:
    g = _seeded(seed)
    data = {"x": torch.randn(*shape, generator=g), "target": torch.randint(0, 5, (shape[0],), generator=g)}
    target = data.pop("target")
    return Case(model.train(), data, lambda out: nn.functional.cross_entropy(out, target))


def mlp(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(MLP(), seed, (batch, 16))


def convnet(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(ConvNet(), seed, (batch, 3, 8, 8))


def convpool(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(ConvPoolNet(), seed, (batch, 3, 16, 16))


def running_stats(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(RunningStatsNet(), seed, (batch, 3, 8, 8))


def learned_tokens(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(LearnedTokens(), seed, (batch, 6, 12))


class PreNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc(self.norm(h))


class FinalNormRegression(nn.Module):
    """Pre-LN residual blocks, then a final LayerNorm whose output is regressed on
    a target: the loss gradient lands on that norm and every earlier gradient
    passes through it, the position where pruning it hurts most."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock() for _ in range(2))
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return ((self.norm(x) - target) ** 2).mean()


def final_norm_regression(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    g = _seeded(seed)
    data = {"x": torch.randn(batch, 6, 32, generator=g), "target": 0.1 * torch.randn(batch, 6, 32, generator=g)}
    return Case(FinalNormRegression().train(), data, lambda loss: loss)


def swiglu(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(GatedMLP(nn.SiLU()), seed, (batch, 16))


def geglu(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(GatedMLP(nn.GELU(approximate="tanh")), seed, (batch, 16))


def silu_mlp(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(ActivationMLP(nn.SiLU()), seed, (batch, 16))


def quick_gelu_mlp(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(ActivationMLP(QuickGELU()), seed, (batch, 16))


def relu2_mlp(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    return _classifier_case(ActivationMLP(ReLUSquared()), seed, (batch, 16))


def layernorm1p_mlp(seed: int = 0, batch: int = 4) -> Case:
    torch.manual_seed(seed)
    model = ActivationMLP(nn.Sequential(LayerNorm1P(32), nn.GELU()))
    return _classifier_case(model, seed, (batch, 16))


def llama_lora(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    """A tiny Llama wrapped by peft (LoRA r=8 on q/k/v/o): the adapters are the
    layers, the base weights (its RMSNorms' among them) never train. lora_B is
    drawn at random, not zeros, so lora_A's gradients are not all zero."""
    import peft

    case = llama(seed, batch, seq)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    case.model = peft.get_peft_model(case.model, lora)
    return case


def t5(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    """T5: attention scores reach the softmax unscaled (1/sqrt(d) is folded into
    W_q's initialisation) with a relative position bias; ReLU FFN, RMSNorm."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                      dropout_rate=0.0, use_cache=False, decoder_start_token_id=0)
    ids = torch.randint(0, 64, (batch, seq), generator=_seeded(seed))
    labels = torch.randint(0, 64, (batch, 8), generator=_seeded(seed + 1))
    return Case(T5ForConditionalGeneration(config).train(), {"input_ids": ids, "labels": labels}, hf_loss)


def deberta_v2(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    """DeBERTa-v2's disentangled attention: besides Q @ K^T, content-to-position
    (Q times the projected relative positions) and position-to-content terms,
    each gathered per query and added to the scores; a boolean mask (masked_fill)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, relative_attention=True, pos_att_type=["c2p", "p2c"],
                             max_relative_positions=16, position_buckets=8, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, num_labels=3,
                             problem_type="single_label_classification")  # no nonzero in the loss
    ids = torch.randint(0, 64, (batch, seq), generator=_seeded(seed))
    labels = torch.randint(0, 3, (batch,), generator=_seeded(seed + 1))
    return Case(DebertaV2ForSequenceClassification(config).train(), {"input_ids": ids, "labels": labels}, hf_loss)


FACTORIES: dict[str, Callable[..., Case]] = {
    "bert": bert, "vit": vit, "gpt2": gpt2, "mlp": mlp, "convnet": convnet,
}
# Models for the compression patterns of decoder LLMs and gated FFNs (test_compress_pass),
# apart from FACTORIES, which the equivalence and autocast tables run whole.
PATTERN_FACTORIES: dict[str, Callable[..., Case]] = {
    "llama": llama, "llama_eager_attention": llama_eager_attention, "qwen2": qwen2, "mistral": mistral,
    "swiglu": swiglu, "geglu": geglu, "silu_mlp": silu_mlp, "opt": opt, "quick_gelu_mlp": quick_gelu_mlp,
    "final_norm_regression": final_norm_regression, "convpool": convpool,
    "relu2_mlp": relu2_mlp, "layernorm1p_mlp": layernorm1p_mlp, "deberta_v2": deberta_v2,
    "llama_lora": llama_lora, "t5": t5,
}
