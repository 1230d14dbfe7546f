"""A bench writing to a log (not a terminal) prints each finished run's headline metric, whatever its task."""

from __future__ import annotations

import pytest

from fedcustom.bench.cells import headline


@pytest.mark.parametrize("summary, line", [
    ({"task": "classification", "final_accuracy": 0.875}, "accuracy 0.8750"),
    ({"task": "causal-lm", "final_rouge_l": 0.2}, "rouge_l 0.2000"),
    ({"task": "retrieval", "final_recall_at_5": 0.5, "final_mrr": 0.4}, "recall_at_5 0.5000"),  # it crashed here
    ({"task": "retrieval"}, "recall_at_5 n/a"),
])
def test_the_headline_is_the_tasks_first_metric(summary: dict, line: str) -> None:
    assert headline(summary) == line
