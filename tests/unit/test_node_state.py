"""What a Flower node keeps in ``context.state`` between messages: everything, in a process per message; in a
persistent worker, nothing while a round is in flight (the worker holds it; a restart continues from the state
before the round)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from flwr.app import Context, RecordDict  # noqa: E402

from fedcustom.deploy.flower import node  # noqa: E402


class _Handler:
    def __init__(self, in_round: bool, value: float) -> None:
        self.round_open, self.value = in_round, value

    def in_round(self) -> bool:
        return self.round_open

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"w": torch.full((2,), self.value)}, {"value": self.value}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.value = meta["value"]


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


@pytest.fixture
def persistent(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(node, "_PERSISTENT", False)
    return lambda: monkeypatch.setattr(node, "_PERSISTENT", True)


def test_a_process_per_message_keeps_the_round_in_flight_in_the_context(persistent) -> None:
    context = _context()
    node.keep_client_state(node.NodeClient(_Handler(in_round=True, value=3.0), 0), context)
    restored = node.NodeClient(_Handler(in_round=False, value=0.0), 0)
    node.restore_client_state(restored, context)
    assert restored.handler.value == 3.0


def test_a_worker_keeps_only_the_state_between_rounds(persistent) -> None:
    persistent()
    context = _context()
    node.keep_client_state(node.NodeClient(_Handler(in_round=False, value=1.0), 0), context)  # a round ended
    node.keep_client_state(node.NodeClient(_Handler(in_round=True, value=2.0), 0), context)  # mid-round: skipped
    restarted = node.NodeClient(_Handler(in_round=False, value=0.0), 0)  # a worker started after a kill
    node.restore_client_state(restarted, context)
    assert restarted.handler.value == 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_a_node_describes_the_rows_it_trains_on_not_those_it_holds_out(tiny_config, tmp_path, fraction) -> None:
    # Prepare: an owner's own file of 40 rows, 30 of label 1; per-client evaluation holds a quarter out
    import json

    from conftest import toy_rows
    from fedcustom.runtime import ClientSetup

    rows = toy_rows(40)
    rows["label"] = [1] * 30 + [0] * 10
    own = tmp_path / "own.csv"
    rows.to_csv(own, index=False)
    cfg = tiny_config(federation__client_eval_fraction=fraction)
    # Execute
    described = node.describe_own_data(cfg, ["0", "1"], str(own), 1)
    client = node.build_node_client(cfg, ClientSetup(["0", "1"]), 1, str(own))
    # Assert: the counts are those of the rows the node trains on
    table = client.handler.client_tables[1]
    expected = [sum(1 for label in table["labels"] if label == k) for k in (0, 1)]
    assert described == {"examples": len(table), "label-histogram": json.dumps(expected)}
    assert len(table) == (30 if fraction else 40) and sum(expected) == len(table)
