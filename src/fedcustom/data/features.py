"""Tokenize once, then batch: each batch is padded to its own longest row, not to max_length."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of a token the loss skips (causal LM: the prompt and the padding)


def tokenize(table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Token ids and labels for every row (texts are truncated to ``max_length`` tokens)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": batch["label"]}

    return table.map(encode, batched=True, remove_columns=table.column_names, keep_in_memory=True)


def make_loader(
    table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int | None
) -> DataLoader:
    """Batches of a tokenized table; shuffled reproducibly when ``seed`` is given, in order otherwise."""
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    per_token = not isinstance(table.features["labels"], datasets.Value)  # causal LM: one label per token
    if "passage_input_ids" in table.column_names:  # retrieval pairs: 2B interleaved rows (fedcustom.rag.contrastive)
        from fedcustom.rag.contrastive import PairCollator

        collate: Any = PairCollator(tokenizer)
    elif "image" in table.column_names:  # images: ``tokenizer`` is the model's image processor
        from fedcustom.data.images import ImageCollator

        collate = ImageCollator(tokenizer)
    elif per_token:
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    else:
        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(table, batch_size=batch_size, shuffle=seed is not None, generator=generator, collate_fn=collate)
