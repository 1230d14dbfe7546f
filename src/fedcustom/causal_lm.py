"""Evaluation of a causal LM after instruction tuning: token-level loss and perplexity on the
held-out responses, and exact match and ROUGE-L of batched greedy generations against them.

Perplexity is exp of the mean loss over response tokens only (the prompt is masked, as in
training). Generation is the expensive part, so only the first ``eval_generations`` held-out
prompts are generated each round; a few of them go to the round log as samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.data import EvalRows, make_loader
from fedcustom.data.features import IGNORE_INDEX
from fedcustom.device import model_device, to_device
from fedcustom.generation import generate
from fedcustom.text_metrics import exact_match, rouge_l


@dataclass(frozen=True)
class GenerationSettings:
    """How much of the held-out set is generated each evaluation, and how long each answer may be."""

    max_new_tokens: int = 48
    eval_generations: int = 32
    samples: int = 3


@torch.no_grad()
def response_loss(model: nn.Module, table: Any, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> float:
    """Mean cross-entropy per response token (each batch's mean loss weighted by its token count)."""
    model.eval()
    total, tokens, device = 0.0, 0, model_device(model)
    for batch in make_loader(table, tokenizer, batch_size, seed=None):
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
        total += model(**to_device(batch, device)).loss.item() * count
        tokens += count
    return total / max(tokens, 1)


def evaluate_causal(model: nn.Module, rows: EvalRows, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                    settings: GenerationSettings) -> dict[str, Any]:
    """loss, perplexity, exact_match and rouge_l on the held-out set, plus a few sample generations."""
    loss = response_loss(model, rows.table, tokenizer, batch_size)
    count = min(settings.eval_generations, len(rows.prompts or []))
    prompts, references = (rows.prompts or [])[:count], (rows.references or [])[:count]
    predictions = generate(model, tokenizer, prompts, settings.max_new_tokens, batch_size) if count else []
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),  # capped: exp(50) already means "untrained"
        "exact_match": exact_match(predictions, references) if count else math.nan,
        "rouge_l": rouge_l(predictions, references) if count else math.nan,
        "samples": [{"prompt": p, "reference": r, "generation": g}
                    for p, r, g in list(zip(prompts, references, predictions))[:settings.samples]],
    }
