"""Local training: FLOPs counted once per batch shape equal a fresh count of every step."""

from __future__ import annotations

import datasets
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer

from fedcustom.config import MethodConfig
from fedcustom.data.features import make_loader, tokenize
from fedcustom.methods import get_method
from fedcustom.models import load_model
from fedcustom.training import LocalSchedule, _train_step, train_local

from conftest import toy_rows


def _setup(tiny_bert: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    table = tokenize(datasets.Dataset.from_pandas(toy_rows(40)).rename_column("sentence", "text"), tokenizer, 32)
    model = get_method("lora").build(load_model(tiny_bert, "classification", ["neg", "pos"], tokenizer, 0),
                                     MethodConfig(name="lora"), "classification", tokenizer)
    return tokenizer, table, model


def test_cached_flop_count_equals_counting_every_step(tiny_bert: str) -> None:
    # Prepare
    tokenizer, table, model = _setup(tiny_bert)
    schedule = LocalSchedule(lr=1e-3, batch_size=8, epochs=2)
    # Execute: train twice (second run hits the shape cache), then count every step directly
    first = train_local(model, table, tokenizer, schedule, seed=1)
    second = train_local(model, table, tokenizer, schedule, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    direct = 0
    for epoch in range(2):
        for batch in make_loader(table, tokenizer, 8, seed=None):
            with FlopCounterMode(display=False) as counter:
                _train_step(model, batch, optimizer)
            direct += counter.get_total_flops()
    # Assert
    assert first.flops > 0
    assert first.flops == second.flops == direct
    assert first.steps == 10 and first.examples_seen == 80


def test_flops_not_counted_when_disabled(tiny_bert: str) -> None:
    tokenizer, table, model = _setup(tiny_bert)
    result = train_local(model, table, tokenizer, LocalSchedule(lr=1e-3, batch_size=8, count_flops=False), seed=0)
    assert result.flops == 0 and result.steps == 5


def test_a_checkpoint_with_another_number_of_classes_gets_a_new_head(tiny_bert: str) -> None:
    # tiny_bert was saved with a 2-class head; a 4-class corpus (AG News) must get a 4-class head, not a load error
    from fedcustom.models import load_classifier

    model = load_classifier(tiny_bert, ["world", "sports", "business", "tech"], AutoTokenizer.from_pretrained(tiny_bert))
    assert model.classifier.out_features == 4 and model.config.id2label[3] == "tech"


def test_attention_on_cpu_is_counted_in_flops() -> None:
    # torch counts its CUDA attention kernels; fedcustom.training registers the CPU one (4 b h s^2 d forward)
    import fedcustom.training  # noqa: F401 - registers the formula

    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == 4 * 2 * 4 * 10 * 10 * 8
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] > 0


def test_the_same_passes_schedule_plans_every_step_it_takes(tiny_bert: str) -> None:
    # Prepare: 40 rows, batch 16 (each epoch ends in a batch of 8), 100 passes: 2 whole epochs and 20 rows more
    import dataclasses

    from fedcustom.training import local_batches, lr_multiplier, planned_steps

    tokenizer, table, _ = _setup(tiny_bert)
    schedule = LocalSchedule(lr=1e-3, batch_size=16, epochs=1, examples=100, decay="linear", per_step=True)
    # Execute
    taken = sum(1 for _ in local_batches(table, tokenizer, schedule, seed=0))
    # Assert: 3 + 3 + 2 batches, all planned, so a decaying rate stays positive to the last step (it once ran
    # past the plan: the linear rate turned negative, the cosine one rose again)
    total = planned_steps(len(table), schedule)
    assert taken == total == 8
    assert all(lr_multiplier("linear", 0, total, t) > 0 for t in range(1, taken + 1))
    assert lr_multiplier("linear", 0, total, total + 3) == 0.0  # clamped: never below zero
    assert planned_steps(40, dataclasses.replace(schedule, examples=80)) == 6


def test_a_step_the_fp16_scaler_skips_moves_nothing_and_is_not_a_scaffold_step(tiny_bert: str) -> None:
    # Prepare: a gradient scaler (on the CPU here) and a first step whose gradient overflows (one tensor's is
    # inf, as an fp16 overflow leaves it on a GPU); SCAFFOLD's correction on every trainable tensor
    from fedcustom.training import DriftControl, _DriftHooks, _Step

    tokenizer, table, model = _setup(tiny_bert)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1)
    hooks = _DriftHooks(model, DriftControl(correction={n: torch.ones_like(p) for n, p in params.items()}))
    step = _Step(torch.device("cpu"), "fp32", torch.amp.GradScaler("cpu"))
    batch = next(iter(make_loader(table, tokenizer, 8, seed=None)))
    before = {n: p.detach().clone() for n, p in params.items()}
    overflow = next(iter(params.values())).register_hook(lambda grad: grad * float("inf"))
    # Execute / Assert: the skipped step leaves every tensor as it was (SCAFFOLD's -lr (c - c_i) included)
    _train_step(model, batch, optimizer, hooks, step)
    overflow.remove()
    assert step.skipped == 1 and all(torch.equal(p, before[n]) for n, p in params.items())
    # the next one is taken: the gradient step and the correction both move the tensors
    _train_step(model, batch, optimizer, hooks, step)
    assert step.skipped == 1 and all(not torch.equal(p, before[n]) for n, p in params.items())
