"""What the parties of KD-FedLLM label and distil on: the public set, as rows of knowledge.

For classification a knowledge row is a public text and its classes are the labels
(:class:`TextPublicSet`). For a causal LM a knowledge row is one response token of a public
[prompt, response] pair and its classes are the vocabulary (:class:`TokenPublicSet`): each party's
next-token distribution at that position, as the model computes it with teacher forcing, so
token-level distillation pulls a model toward the others' answers. Both give the same two
operations, so the protocol does not care which task it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.data.causal import InstructionRows, tokenize_rows
from fedcustom.data.features import IGNORE_INDEX, make_loader
from fedcustom.protocols.distill.knowledge import counted_public_logits, distill_batches, distill_into, logits_over


class PublicSet(Protocol):
    rows: int  # knowledge rows: public texts, or response tokens

    def logits(self, model: nn.Module, batch_size: int, count_flops: bool) -> tuple[torch.Tensor, int]:
        """The model's logits on every knowledge row, in order, (rows, classes) fp32; and the FLOPs counted."""
        ...

    def distill(self, model: nn.Module, targets: torch.Tensor, lr: float, batch_size: int, epochs: int,
                temperature: float, seed: int, count_flops: bool) -> tuple[float, int]:
        """Train the model's trainable tensors toward ``targets`` (rows, classes); mean loss and FLOPs."""
        ...


class TextPublicSet:
    """Classification: one knowledge row per public text."""

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.rows = len(texts)

    def logits(self, model: nn.Module, batch_size: int, count_flops: bool) -> tuple[torch.Tensor, int]:
        return counted_public_logits(model, self.texts, self.tokenizer, self.max_length, batch_size, count_flops)

    def distill(self, model: nn.Module, targets: torch.Tensor, lr: float, batch_size: int, epochs: int,
                temperature: float, seed: int, count_flops: bool) -> tuple[float, int]:
        return distill_into(model, self.texts, targets, self.tokenizer, self.max_length, lr, batch_size, epochs,
                            temperature, seed, count_flops)


def response_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict a response token: (positions, vocab), row by row in order (position t predicts
    token t + 1, as in the next-token loss). Prompt tuning's virtual tokens come first in ``logits``: skipped."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


class TokenPublicSet:
    """Causal LM: one knowledge row per response token of each public [prompt, response] pair."""

    def __init__(self, pairs: list[list[str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        self.table = tokenize_rows(InstructionRows(prompts, responses, [0] * len(pairs)), tokenizer, max_length,
                                   "the public set")
        self.tokenizer = tokenizer
        counts = [sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in self.table["labels"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)  # row i: knowledge rows offsets[i:i+1]
        self.rows = int(self.offsets[-1])

    def _batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Public rows ``rows`` in that order, padded (right) into one batch."""
        return next(iter(make_loader(self.table.select(rows), self.tokenizer, len(rows), seed=None)))

    def logits(self, model: nn.Module, batch_size: int, count_flops: bool) -> tuple[torch.Tensor, int]:
        batches = (self._batch(list(range(start, min(start + batch_size, len(self.table)))))
                   for start in range(0, len(self.table), batch_size))
        return logits_over(model, batches, lambda batch: response_positions(_logits(model, batch).float(),
                                                                           batch["labels"]),
                           count_flops, "infer-lm")

    def distill(self, model: nn.Module, targets: torch.Tensor, lr: float, batch_size: int, epochs: int,
                temperature: float, seed: int, count_flops: bool) -> tuple[float, int]:
        def batches() -> Iterator[tuple[dict, torch.Tensor]]:
            for epoch in range(epochs):
                order = torch.randperm(len(self.table), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    yield self._batch(rows), torch.cat([targets[self.offsets[r]:self.offsets[r + 1]] for r in rows])

        return distill_batches(model, batches(), lambda batch: response_positions(_logits(model, batch),
                                                                                  batch["labels"]),
                               lr, temperature, seed, count_flops, "distill-lm")


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a batch whose labels mark the response tokens (the model is not given them)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def public_set(public: list, task: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PublicSet:
    """The public set of a task: texts (classification) or [prompt, response] pairs (causal LM)."""
    from fedcustom.tasks import get_task

    return get_task(task).public_set(public, tokenizer, max_length)


def knowledge_classes(model: nn.Module, settings) -> int:  # noqa: ANN001 - KDSettings (protocol imports this module)
    """Classes per knowledge row: the labels (classification) or the model's vocabulary (causal LM)."""
    if settings.over_vocabulary:
        return int(model.config.vocab_size)
    return len(settings.label_names)
