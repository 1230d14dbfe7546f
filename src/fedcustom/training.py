"""Local optimisation and evaluation, shared by federated clients and the centralized baseline."""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import datasets
import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedTokenizerBase

from fedcustom.data import make_loader
from fedcustom.privacy.dp_sgd import DPSGDSettings, private_training

T = TypeVar("T")


@dataclass(frozen=True)
class LocalSchedule:
    """How long and how fast one training session runs."""

    lr: float
    batch_size: int
    epochs: int = 1
    steps: int | None = None  # when set, overrides epochs (cycling through the data)
    examples: int | None = None  # when set, overrides both: exactly this many example passes
    weight_decay: float = 0.0
    count_flops: bool = True


@dataclass(frozen=True)
class TrainResult:
    """What one training session did: examples processed, mean loss, counted FLOPs."""

    examples_seen: int
    steps: int
    mean_loss: float
    flops: int


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (base seed, round, client), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def local_batches(table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, schedule: LocalSchedule, seed: int) -> Iterator[dict]:
    """Shuffled batches, reshuffled every epoch, for ``epochs``, ``steps`` or ``examples`` in total."""
    epochs = range(schedule.epochs) if schedule.steps is None and schedule.examples is None else itertools.count()
    batches = itertools.chain.from_iterable(
        make_loader(table, tokenizer, schedule.batch_size, derive_seed(seed, epoch)) for epoch in epochs
    )
    if schedule.examples is None:
        yield from itertools.islice(batches, schedule.steps)  # islice(.., None) takes all
        return
    remaining = schedule.examples
    for batch in batches:
        if remaining <= 0:
            return
        yield {k: v[:remaining] for k, v in batch.items()}  # the last batch is cut to hit the count exactly
        remaining -= len(batch["labels"])


# FLOPs of one optimisation step, per model and batch shape. FlopCounterMode intercepts every
# aten op and roughly halves CPU throughput on a MiniLM-sized model, so each distinct (batch, seq)
# shape is counted once with it and reused: the same model on the same shapes runs the same ops,
# so the count is still measured, not estimated.
_STEP_FLOPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def _train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def counted(model: nn.Module, key: tuple, step: Callable[[], T]) -> tuple[T, int]:
    """Run ``step`` and return its result with its FLOPs, counted with FlopCounterMode the first time
    ``key`` (the kind of step and the batch shape) is seen on ``model``."""
    shapes = _STEP_FLOPS.setdefault(model, {})
    if key in shapes:
        return step(), shapes[key]
    with FlopCounterMode(display=False) as counter:
        value = step()
    shapes[key] = int(counter.get_total_flops())
    return value, shapes[key]


def _counted_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """One training step and its FLOPs (counted once per batch shape)."""
    return counted(model, ("train", *batch["input_ids"].shape), lambda: _train_step(model, batch, optimizer))


def train_local(
    model: nn.Module, table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, schedule: LocalSchedule, seed: int,
    dp_sgd: DPSGDSettings | None = None,
) -> TrainResult:
    """AdamW on the model's trainable parameters over ``table``; dropout and shuffling seeded by ``seed``;
    with ``dp_sgd``, per-example clipping and noise (Opacus)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    torch.manual_seed(seed)
    model.train()
    losses, seen, steps, flops = [], 0, 0, 0
    private = private_training(model, optimizer, dp_sgd, schedule.batch_size) if dp_sgd else None
    with private or contextlib.nullcontext((model, optimizer)) as (module, step_optimizer):
        for batch in local_batches(table, tokenizer, schedule, seed):
            if schedule.count_flops:
                loss, step_flops = _counted_step(module, batch, step_optimizer)
                flops += step_flops
            else:
                loss = _train_step(module, batch, step_optimizer)
            losses.append(loss)
            seen += len(batch["labels"])
            steps += 1
    return TrainResult(seen, steps, float(np.mean(losses)) if losses else math.nan, int(flops))


@torch.no_grad()
def evaluate(
    model: nn.Module, table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``model`` on a tokenized labelled table."""
    model.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for batch in make_loader(table, tokenizer, batch_size, seed=None):
        out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        predictions.append(out.logits.argmax(dim=-1))
        labels.append(batch["labels"])
    y_pred, y_true = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "loss": loss_sum / len(y_true),
    }

