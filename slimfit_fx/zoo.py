"""Small models for `slimfit-fx inspect` and the tests: tiny random-init configs of real
HF architectures, plus the bundled pretrained all-MiniLM-L6-v2.

Each factory returns (model in train mode, a seeded sample batch with labels).
Building a model here never downloads anything.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def bert_tiny(seed: int = 0, batch: int = 2, seq: int = 12, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=128, num_labels=3,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        problem_type="single_label_classification",
    )
    g = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(0, 64, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch,), generator=g),
    }
    data["attention_mask"][0, -3:] = 0  # some padding
    return BertForSequenceClassification(config).train(), data


def bert_base(seed: int = 0, batch: int = 8, seq: int = 128, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    """BERT-base sizes (12 layers, hidden 768), random init: the paper's GLUE setting."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(num_labels=2, problem_type="single_label_classification",
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    g = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    return BertForSequenceClassification(config).train(), data


def _tiny_vision(config_class, model_class, seed: int, batch: int, dropout: float) -> tuple[nn.Module, Batch]:
    """A 2-layer, hidden-32 ViT-family classifier on 16x16 images, and a batch."""
    torch.manual_seed(seed)
    config = config_class(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, num_labels=4,
        problem_type="single_label_classification",
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    g = torch.Generator().manual_seed(seed)
    data = {
        "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 4, (batch,), generator=g),
    }
    return model_class(config).train(), data


def vit_tiny(seed: int = 0, batch: int = 2, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    from transformers import ViTConfig, ViTForImageClassification

    return _tiny_vision(ViTConfig, ViTForImageClassification, seed, batch, dropout)


def deit_tiny(seed: int = 0, batch: int = 2, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    """DeiT: ViT with a second learned token (distillation) concatenated next to
    the class token, and two heads averaged."""
    from transformers import DeiTConfig, DeiTForImageClassification

    return _tiny_vision(DeiTConfig, DeiTForImageClassification, seed, batch, dropout)


def gpt2_tiny(seed: int = 0, batch: int = 2, seq: int = 10, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
    )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"  # unset, HF logs a warning inside forward: a graph break
    return model, {"input_ids": ids, "labels": ids}


def _decoder_lm(config_class, model_class, seed: int, batch: int, seq: int, dropout: float,
                **sizes) -> tuple[nn.Module, Batch]:
    """A tiny decoder LM of the Llama lineage (RMSNorm, SwiGLU, RoPE, grouped-query
    attention: 4 query heads share 2 kv heads), causal LM loss. use_cache=False
    as when fine-tuning: the KV cache would return K and V to the caller, so
    they would stay resident in full precision."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=dropout, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        **sizes)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    model = model_class(config).train()
    model.loss_type = "ForCausalLM"
    return model, {"input_ids": ids, "labels": ids}


def llama_tiny(seed: int = 0, batch: int = 2, seq: int = 10, dropout: float = 0.0,
               attention: str = "sdpa") -> tuple[nn.Module, Batch]:
    """attention="eager": HF's matmul-softmax-matmul attention instead of the fused one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _decoder_lm(LlamaConfig, LlamaForCausalLM, seed, batch, seq, dropout, attn_implementation=attention)


def qwen2_tiny(seed: int = 0, batch: int = 2, seq: int = 10, dropout: float = 0.0) -> tuple[nn.Module, Batch]:
    """Qwen2: Llama's block with biases on the Q/K/V projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _decoder_lm(Qwen2Config, Qwen2ForCausalLM, seed, batch, seq, dropout)


def mistral_tiny(seed: int = 0, batch: int = 2, seq: int = 10, dropout: float = 0.0) -> tuple[nn.Module, Batch]:
    from transformers import MistralConfig, MistralForCausalLM

    return _decoder_lm(MistralConfig, MistralForCausalLM, seed, batch, seq, dropout, head_dim=8)


def opt_tiny(seed: int = 0, batch: int = 2, seq: int = 10, dropout: float = 0.0) -> tuple[nn.Module, Batch]:
    """OPT: a pre-LN decoder with a ReLU FFN."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=64, dropout=dropout,
                       attention_dropout=dropout, use_cache=False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    return OPTForCausalLM(config).train(), {"input_ids": ids, "labels": ids}


def llama_base(seed: int = 0, batch: int = 8, seq: int = 128, dropout: float = 0.0) -> tuple[nn.Module, Batch]:
    """A Llama-style LM at BERT-base sizes: hidden 768, 12 layers, 12 query heads
    sharing 4 kv heads, SwiGLU 2048, vocabulary 32000, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                         attention_dropout=dropout, use_cache=False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    model = LlamaForCausalLM(config).train()
    model.loss_type = "ForCausalLM"
    return model, {"input_ids": ids, "labels": ids}


def vit_base(seed: int = 0, batch: int = 8, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    """ViT-B/16 at 224x224 (12 layers, hidden 768, 197 tokens), random init."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(num_labels=10, problem_type="single_label_classification",
                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    g = torch.Generator().manual_seed(seed)
    data = {
        "pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=g),
        "labels": torch.randint(0, 10, (batch,), generator=g),
    }
    return ViTForImageClassification(config).train(), data


def gpt2_small(seed: int = 0, batch: int = 8, seq: int = 128, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    """GPT-2 small (12 layers, hidden 768, 50257-token vocabulary), random init, LM loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"  # unset, HF logs a warning inside forward: a graph break
    return model, {"input_ids": ids, "labels": ids}


def minilm(seed: int = 0, batch: int = 8, seq: int = 128, dropout: float = 0.1) -> tuple[nn.Module, Batch]:
    """The bundled pretrained all-MiniLM-L6-v2 with a fresh 5-class head, on BBC News text."""
    from .data import load_bbc_news, load_default_model

    torch.manual_seed(seed)
    model, tokenizer = load_default_model(num_labels=5)
    data = load_bbc_news(tokenizer, max_length=seq, seed=seed, limit=max(batch * 2, 10))
    return model.train(), {k: v[:batch] for k, v in data.train.items()}


MODELS: dict[str, Callable[..., tuple[nn.Module, Batch]]] = {
    "bert-tiny": bert_tiny, "bert-base": bert_base, "vit-tiny": vit_tiny, "vit-base": vit_base,
    "deit-tiny": deit_tiny,
    "gpt2-tiny": gpt2_tiny, "gpt2-small": gpt2_small, "minilm": minilm,
    "opt-tiny": opt_tiny, "llama-tiny": llama_tiny, "qwen2-tiny": qwen2_tiny, "mistral-tiny": mistral_tiny, "llama-base": llama_base,
}


def build(name: str, **kwargs) -> tuple[nn.Module, Batch]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
