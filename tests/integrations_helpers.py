"""Tiny offline models, tokenizer and datasets for the integration tests (no downloads)."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

CHARS = "abcdefghijklmnopqrstuvwxyz "


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: [PAD]=0, [UNK]=1, [MASK]=2, [CLS]=3, then the letters."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "[CLS]": 3,
             **{c: i + 4 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", mask_token="[MASK]",
                                   cls_token="[CLS]", eos_token="[CLS]", **kwargs)


VOCAB = 4 + len(CHARS)


def tiny_gpt2(seed: int = 0, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=3, eos_token_id=3, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_config(**kwargs) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    base.update(kwargs)
    return BertConfig(**base)


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels)).eval()


def random_texts(n: int, seed: int, low: int = 6, high: int = 14) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=g))
        out.append("".join(CHARS[int(i)] for i in torch.randint(0, 26, (length,), generator=g)))
    return out


def text_datasets(n_train: int = 12, duplicates=(2, 5, 9), seed: int = 0,
                  labels: bool = False) -> tuple[Dataset, Dataset]:
    """Distinct random strings; test example k duplicates train example ``duplicates[k]``."""
    texts = random_texts(n_train, seed)
    train = {"text": texts}
    test = {"text": [texts[i] for i in duplicates]}
    if labels:
        train["label"] = [i % 3 for i in range(n_train)]
        test["label"] = [i % 3 for i in duplicates]
    return Dataset.from_dict(train), Dataset.from_dict(test)
