"""The two centralized baselines a federated run is compared with, both on the union of the clients' rows:

- same passes: the same model, method and optimizer from the same start, for exactly the federated run's
  number of example passes (one optimizer over all steps, the run's rate schedule over those steps) — what
  federation costs at equal work;
- converged: epochs until the score on a validation slice held out of the union stops improving
  (``centralized_patience`` epochs), the best epoch's model scored on the eval set — the upper bound the
  paper's gaps are measured against.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from fedcustom.config import RunConfig
from fedcustom.data import FederatedData, stratified_split
from fedcustom.methods import load_trainable_state, trainable_state
from fedcustom.tasks import get_task
from fedcustom.training import LocalSchedule, derive_seed, make_optimizer, train_local

CENTRALIZED_STREAM = 2  # seed stream of the centralized baselines
Metrics = dict[str, Any]


def union_of_clients(data: FederatedData) -> datasets.Dataset:
    """Every client's rows in one table."""
    return data.train.select(sorted(itertools.chain.from_iterable(data.client_indices)))


def run_same_passes(model: nn.Module, initial: dict[str, torch.Tensor], data: FederatedData, tokenizer: Any,
                    schedule: LocalSchedule, example_passes: int, seed: int,
                    evaluate_model: Callable[[], Metrics]) -> Metrics:
    """The same-passes baseline: exactly ``example_passes`` passes over the union, then the task's metrics."""
    start = time.perf_counter()
    load_trainable_state(model, initial)
    exact = dataclasses.replace(schedule, steps=None, examples=example_passes, per_step=True)
    result = train_local(model, union_of_clients(data), tokenizer, exact, derive_seed(seed, CENTRALIZED_STREAM))
    return {**evaluate_model(), "train_loss": result.mean_loss, "steps": result.steps,
            "examples_seen": result.examples_seen, "flops": result.flops, "wall_seconds": time.perf_counter() - start}


def validation_split(union: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training rows, validation rows): ``fraction`` of the union held out, label shares kept where there are
    labels per row (classification)."""
    labels = union["labels"]
    per_row = [label if isinstance(label, int) else 0 for label in labels]  # causal LM: token labels, one stratum
    keep = len(union) - max(1, round(len(union) * fraction))
    kept, held = stratified_split(per_row, keep, seed)
    return union.select(kept), union.select(held)


def validation_score(cfg: RunConfig, model: nn.Module, table: datasets.Dataset, tokenizer: Any) -> float:
    """Higher is better: accuracy (classification) or minus the response loss (causal LM)."""
    return get_task(cfg.model.task).validation_score(cfg, model, table, tokenizer)


def run_converged(cfg: RunConfig, model: nn.Module, initial: dict[str, torch.Tensor], data: FederatedData,
                  tokenizer: Any, schedule: LocalSchedule, evaluate_model: Callable[[], Metrics]) -> Metrics:
    """The converged baseline: one optimizer, one epoch at a time over the union minus its validation slice,
    until ``centralized_patience`` epochs bring no better validation score (at most ``centralized_max_epochs``);
    the best epoch's tensors are scored with the task's metrics."""
    start, train = time.perf_counter(), cfg.train
    load_trainable_state(model, initial)
    seed = derive_seed(train.seed, CENTRALIZED_STREAM, 1)
    rows, validation = validation_split(union_of_clients(data), train.centralized_val_fraction, seed)
    epoch = dataclasses.replace(schedule, lr=train.centralized_lr or schedule.lr, epochs=1, steps=None, examples=None,
                                decay="constant", warmup_rounds=0)
    best = (validation_score(cfg, model, validation, tokenizer), 0, trainable_state(model))
    scores, seen, flops = [best[0]], 0, 0
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], epoch)  # one for every epoch
    for number in range(1, train.centralized_max_epochs + 1):
        result = train_local(model, rows, tokenizer, epoch, derive_seed(seed, number), optimizer=optimizer)
        seen, flops = seen + result.examples_seen, flops + result.flops
        scores.append(validation_score(cfg, model, validation, tokenizer))
        if scores[-1] > best[0]:
            best = (scores[-1], number, trainable_state(model))
        if number - best[1] >= train.centralized_patience:
            break
    load_trainable_state(model, best[2])
    return {**evaluate_model(), "best_epoch": best[1], "epochs": len(scores) - 1, "validation_scores": scores,
            "validation_rows": len(validation), "training_rows": len(rows), "examples_seen": seen, "flops": flops,
            "wall_seconds": time.perf_counter() - start}


def gaps(summary_metric: float, same_passes: Metrics | None, converged: Metrics | None, key: str) -> dict[str, Any]:
    """Federated minus centralized, in points of the headline metric, for each baseline that ran."""
    def gap(baseline: Metrics | None) -> float | None:
        if baseline is None or not np.isfinite(baseline.get(key, np.nan)):
            return None
        return summary_metric - baseline[key]

    return {"gap_same_passes": gap(same_passes), "gap_converged": gap(converged)}
