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
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=128, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        problem_type="single_label_classification",
    )
    g = _seeded(seed)
    data = {
        "input_ids": torch.randint(0, 64, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch,), generator=g),
    }
    data["attention_mask"][0, -3:] = 0  # exercise padding
    return Case(BertForSequenceClassification(config).train(), data, hf_loss)


def vit(seed: int = 0, batch: int = 2) -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, num_labels=4,
        problem_type="single_label_classification",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    g = _seeded(seed)
    data = {
        "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 4, (batch,), generator=g),
    }
    return Case(ViTForImageClassification(config).train(), data, hf_loss)


def gpt2(seed: int = 0, batch: int = 2, seq: int = 10) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    g = _seeded(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"  # unset, HF logs a warning inside forward: a graph break
    return Case(model, {"input_ids": ids, "labels": ids}, hf_loss)


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


FACTORIES: dict[str, Callable[..., Case]] = {
    "bert": bert, "vit": vit, "gpt2": gpt2, "mlp": mlp, "convnet": convnet,
}
