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
from fedcustom.device import autocast, grad_scaler, model_device, to_device
from fedcustom.privacy.dp_sgd import DPSGDSettings, private_training

T = TypeVar("T")


@dataclass(frozen=True)
class LocalSchedule:
    """How long and how fast one training session runs, and how the rate moves over the whole run."""

    lr: float
    batch_size: int
    epochs: int = 1
    steps: int | None = None  # when set, overrides epochs (cycling through the data)
    examples: int | None = None  # when set, overrides both: exactly this many example passes
    weight_decay: float = 0.0
    count_flops: bool = True
    optimizer: str = "adamw"  # or "sgd"
    decay: str = "constant"  # the rate over the run after warm-up: constant, cosine or linear
    warmup_rounds: int = 0
    rounds: int = 1  # the run's length, which ``decay`` spans
    per_step: bool = False  # apply warm-up and decay over this session's own steps (the centralized baseline)
    precision: str = "fp32"  # autocast of the forward pass (fedcustom.device)

    def lr_at_round(self, rnd: int) -> float:
        """The client rate of federated round ``rnd`` (1-based); constant within the round."""
        return self.lr * lr_multiplier(self.decay, self.warmup_rounds, self.rounds, rnd)


def lr_multiplier(decay: str, warmup: int, total: int, t: int) -> float:
    """Share of the base rate at step (or round) ``t`` of ``total`` (1-based): a linear rise over the first
    ``warmup``, then constant, cosine or linear decay that stays above zero at ``t = total``."""
    if t <= warmup:
        return t / (warmup + 1)
    progress = min(1.0, (t - warmup - 1) / max(1, total - warmup))  # 0 after warm-up, < 1 at the last step
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return 1.0 - progress
    return 1.0


@dataclass(frozen=True)
class DriftControl:
    """Client-drift correction inside one local session.

    FedProx (Li et al., 2020) adds ``prox_mu / 2 * ||w - anchor||^2`` to the loss, i.e. ``prox_mu * (w - anchor)``
    to every gradient. SCAFFOLD (Karimireddy et al., 2020, Algorithm 1) steps along ``g + c - c_i``; here the
    correction ``c - c_i`` (``correction``) is added to each optimizer step's update as ``-lr * (c - c_i)``, which
    for plain SGD is exactly the paper's step, and for AdamW corrects the drift in the space the steps are taken."""

    anchor: dict[str, torch.Tensor] | None = None  # the received global tensors (FedProx)
    prox_mu: float | None = None
    correction: dict[str, torch.Tensor] | None = None  # c - c_i per trainable tensor (SCAFFOLD)


@dataclass(frozen=True)
class TrainResult:
    """What one training session did: examples processed, mean loss, counted FLOPs."""

    examples_seen: int
    steps: int
    mean_loss: float
    flops: int
    skipped_steps: int = 0  # fp16: steps the gradient scaler skipped (inf/NaN gradients), counted in ``steps``


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
        # the last batch is cut to hit the count exactly; a tensor with several rows per example (retrieval's
        # question and passage rows, one label per pair) keeps all the rows of the examples it keeps
        examples = len(batch["labels"])
        yield {k: v[:remaining * max(1, len(v) // examples)] for k, v in batch.items()}
        remaining -= examples


# FLOPs of one optimisation step, per model and batch shape. FlopCounterMode intercepts every
# aten op and roughly halves CPU throughput on a MiniLM-sized model, so each distinct (batch, seq)
# shape is counted once with it and reused: the same model on the same shapes runs the same ops,
# so the count is still measured, not estimated.
_STEP_FLOPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


@dataclass
class _Step:
    """What every step of one session shares: its precision and, for fp16, the gradient scaler."""

    device: torch.device
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None
    skipped: int = 0  # steps the scaler skipped so far


def _train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                drift: _DriftHooks | None = None, step: _Step | None = None) -> float:
    step = step or _Step(torch.device("cpu"))
    with autocast(step.device, step.precision):
        loss = model(**to_device(batch, step.device)).loss
    if step.scaler:
        step.scaler.scale(loss).backward()
        step.scaler.unscale_(optimizer)  # FedProx's term and SCAFFOLD's correction act on true gradients
    else:
        loss.backward()
    if drift:
        drift.before_step()
    stepped = True
    if step.scaler:
        scale = step.scaler.get_scale()
        step.scaler.step(optimizer)
        step.scaler.update()
        stepped = step.scaler.get_scale() >= scale  # it backs off exactly when it skipped the step
        step.skipped += not stepped
    else:
        optimizer.step()
    if drift and stepped:  # a skipped step moved nothing: SCAFFOLD's correction belongs to a taken one
        drift.after_step(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class _DriftHooks:
    """A DriftControl bound to the model's trainable parameters (by name)."""

    def __init__(self, model: nn.Module, drift: DriftControl) -> None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        # a client's private tensors (--personalize) have no global anchor or control variate: no term for them
        self.prox = [(p, drift.anchor[name].to(p.device)) for name, p in params.items() if name in drift.anchor] \
            if drift.prox_mu is not None else []
        self.mu = drift.prox_mu or 0.0
        self.correction = [(p, drift.correction[name].to(p.device)) for name, p in params.items()
                           if name in drift.correction] \
            if drift.correction else []

    @torch.no_grad()
    def before_step(self) -> None:
        for param, anchor in self.prox:  # d/dw of mu/2 ||w - anchor||^2
            if param.grad is not None:
                param.grad.add_(param - anchor, alpha=self.mu)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        for param, correction in self.correction:
            param.sub_(correction, alpha=lr)


def _count_cpu_attention() -> None:
    """Give FlopCounterMode the CPU kernel of scaled_dot_product_attention. Torch 2.13 counts the CUDA kernels
    (flash, efficient, cuDNN) but not ``_scaled_dot_product_flash_attention_for_cpu``, so on CPU every attention
    product (QK^T and the weighted sum of V, forward and backward) counted as 0 FLOPs: a few percent of an encoder
    step at 64 tokens, and all of the extra cost of a prefix (its keys and values only enter attention). The
    formulas are torch's own for the other kernels."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, fc.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fc.sdpa_backward_flop)):
        if op not in fc.flop_registry and getattr(op, "default", None) not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)  # the formulas are shape-wrapped already


_count_cpu_attention()


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


def _counted_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                  drift: _DriftHooks | None = None, step: _Step | None = None) -> tuple[float, int]:
    """One training step and its FLOPs (counted once per batch shape)."""
    inputs = batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]
    # a prompt's length changes the step's cost without changing the batch (--prefix-lengths)
    virtual_tokens = getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None)),
                             "num_virtual_tokens", None)
    return counted(model, ("train", *inputs.shape, virtual_tokens),
                   lambda: _train_step(model, batch, optimizer, drift, step))


def make_optimizer(params: list[nn.Parameter], schedule: LocalSchedule) -> torch.optim.Optimizer:
    """AdamW (default) or plain SGD over ``params`` at the schedule's rate.

    Not fused, though torch's fused CPU AdamW takes a MiniLM step in 19 ms instead of 76: its last-bit differences
    flip the same-passes centralized LoRA baseline of the main job (5e-3 over 9,000 passes) from 0.706 to a collapse
    at the majority class (0.578). That baseline sits on an edge; see the note of 2026-11-29 before switching."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    return torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)


def planned_steps(table_rows: int, schedule: LocalSchedule) -> int:
    """How many optimizer steps a session over ``table_rows`` rows takes."""
    if schedule.examples is not None:  # whole epochs (each ending in a partial batch), then the rest
        full_epochs, rest = divmod(schedule.examples, table_rows)
        return full_epochs * math.ceil(table_rows / schedule.batch_size) + math.ceil(rest / schedule.batch_size)
    if schedule.steps is not None:
        return schedule.steps
    return schedule.epochs * math.ceil(table_rows / schedule.batch_size)


def _step_scheduler(optimizer: torch.optim.Optimizer, schedule: LocalSchedule, rows: int) -> Callable[[], None]:
    """Per-step warm-up and decay when ``schedule.per_step`` (warm-up takes the same share of the steps as of
    the run's rounds); a no-op otherwise."""
    if not schedule.per_step or (schedule.decay == "constant" and schedule.warmup_rounds == 0):
        return lambda: None
    total = planned_steps(rows, schedule)
    warmup = round(total * schedule.warmup_rounds / max(1, schedule.rounds))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_multiplier(schedule.decay, warmup, total, done + 1))
    return scheduler.step


def train_local(
    model: nn.Module, table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, schedule: LocalSchedule, seed: int,
    dp_sgd: DPSGDSettings | None = None, drift: DriftControl | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """AdamW (or SGD) on the model's trainable parameters over ``table``; dropout and shuffling seeded by
    ``seed``; with ``dp_sgd``, per-example clipping and noise (Opacus); with ``drift``, FedProx's proximal term
    and SCAFFOLD's correction. An ``optimizer`` given continues (its moments carry over); else a fresh one."""
    optimizer = optimizer or make_optimizer([p for p in model.parameters() if p.requires_grad], schedule)
    advance = _step_scheduler(optimizer, schedule, len(table))
    torch.manual_seed(seed)
    model.train()
    losses, seen, steps, flops = [], 0, 0, 0
    hooks = _DriftHooks(model, drift) if drift else None
    device = model_device(model)
    step = _Step(device, schedule.precision, grad_scaler(device, schedule.precision))
    private = private_training(model, optimizer, dp_sgd, schedule.batch_size) if dp_sgd else None
    with private or contextlib.nullcontext((model, optimizer)) as (module, step_optimizer):
        for batch in local_batches(table, tokenizer, schedule, seed):
            if schedule.count_flops:
                loss, step_flops = _counted_step(module, batch, step_optimizer, hooks, step)
                flops += step_flops
            else:
                loss = _train_step(module, batch, step_optimizer, hooks, step)
            advance()
            losses.append(loss)
            seen += len(batch["labels"])
            steps += 1
    return TrainResult(seen, steps, float(np.mean(losses)) if losses else math.nan, int(flops), step.skipped)


@torch.no_grad()
def evaluate(
    model: nn.Module, table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``model`` on a tokenized labelled table."""
    model.eval()
    device = model_device(model)
    predictions, labels, loss_sum = [], [], 0.0
    for batch in make_loader(table, tokenizer, batch_size, seed=None):
        out = model(**to_device(batch, device))
        loss_sum += out.loss.item() * len(batch["labels"])
        predictions.append(out.logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"])
    y_pred, y_true = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "loss": loss_sum / len(y_true),
    }

