"""Flower SecAgg+'s max_weight (the bound on a client's example count in the weighted sum) is the largest count the
round's clients have, never Flower's default of 1,000 when the server knows better: with 5,000 rows a client the
default wrapped the ring and the mean update came back 5x too large."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from fedcustom.runtime.flower.secaggplus import MAX_WEIGHT, SecAggPlusRound  # noqa: E402


def _max_weight(node_stats: dict, partition_examples: dict, chosen: list[int]) -> float:
    runtime = SimpleNamespace(node_stats=node_stats, partition_examples=partition_examples)
    return SecAggPlusRound(runtime, 1, chosen, {}, 8.0, 0.6)._max_weight()


def test_the_bound_is_the_largest_count_of_the_rounds_clients() -> None:
    own = {0: {"examples": 120}, 1: {"examples": 7000}, 2: {"examples": 40}}
    assert _max_weight(own, {}, [0, 2]) == 120.0  # the nodes' own files, as they reported them
    assert _max_weight({}, {0: 5000, 1: 5000, 2: 10}, [0, 1]) == 5000.0  # the server's own split (flower-sim)
    assert _max_weight(own, {0: 1, 1: 1, 2: 1}, [1]) == 7000.0  # what the nodes say wins
    assert _max_weight({}, {}, [0, 1]) == MAX_WEIGHT  # nothing known: Flower's default
