"""Per-client evaluation (issue 21, item 1): each client holds out part of its rows; every round the global model is
scored on each client's held-out rows, which no one trains on."""

from __future__ import annotations

import json

import pytest

from fedcustom.assemble import check_runtime_support
from fedcustom.config import ConfigError
from fedcustom.methods import load_trainable_state
from fedcustom.runner import build_job, execute


def test_each_client_is_scored_on_rows_it_held_out(tiny_config) -> None:
    # Prepare
    cfg = tiny_config(method__name="lora", federation__clients=3, federation__client_eval_fraction=0.25,
                      train__centralized=True)
    job = build_job(cfg)
    data = job.data
    # Execute
    summary = execute(job)
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    # Assert: held-out rows are a quarter of each client's, disjoint from what it (and the baseline) trains on
    for c in range(3):
        held, kept = set(data.client_eval_indices[c]), set(data.client_indices[c])
        assert held and not held & kept and abs(len(held) - 0.25 * (len(held) + len(kept))) <= 1
    assert summary["train_examples"] == sum(len(rows) for rows in data.client_indices)
    # every round, every client has a score; the summary's final scores are the global model's on those rows
    assert all(set(r["client_eval"]) == {"0", "1", "2"} for r in log)
    assert set(summary["client_accuracy"]) == {"0", "1", "2"}
    load_trainable_state(job.model, job.server.global_state)
    for c in range(3):
        own = job.client_evaluators[c]()["accuracy"]
        assert summary["client_accuracy"][str(c)] == pytest.approx(own, abs=1e-9)
    scores = sorted(summary["client_accuracy"].values())
    assert summary["client_accuracy_worst10"] == scores[0]
    assert summary["client_accuracy_mean"] == pytest.approx(sum(scores) / 3)
    assert len(summary["client_accuracy_mean_per_round"]) == len(log)


@pytest.mark.parametrize("overrides, expected", [
    ({"federation__client_eval_fraction": 1.0}, "is not in [0, 1)"),
    ({"federation__client_eval_fraction": 0.2, "method__name": "split"}, "has no single one per round"),
])
def test_per_client_evaluation_mistakes_are_named(tiny_config, overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        check_runtime_support(tiny_config(**overrides))
