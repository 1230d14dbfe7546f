"""How the Flower runtime learns which partition each connected SuperNode holds (a grid stand-in: the hello
exchange's replies are what our ClientApp answers; the real exchange runs in tests/deploy)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedcustom.errors import FedCustomError  # noqa: E402
from fedcustom.runtime.flower.runtime import FlowerRuntime  # noqa: E402


@pytest.fixture(autouse=True)
def _in_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every message with the run and node of the process sending it (a ServerApp's, here)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _Grid:
    """Connected nodes answering the hello with the partition-id of their node config."""

    def __init__(self, partition_of_node: dict[int, int]) -> None:
        self.partition_of_node = partition_of_node
        self.pushed: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of_node)

    def push_messages(self, messages: list) -> list[str]:
        self.pushed = [m.metadata.dst_node_id for m in messages]
        return [f"hello-{node}" for node in self.pushed]

    def pull_messages(self, ids: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(has_error=lambda: False,
                                content={"hello": {"partition-id": self.partition_of_node[int(i.split("-")[1])]}},
                                metadata=SimpleNamespace(src_node_id=int(i.split("-")[1]), reply_to_message_id=i))
                for i in ids]


def test_each_partition_id_maps_to_the_node_that_holds_it() -> None:
    runtime = FlowerRuntime(_Grid({101: 1, 102: 0, 103: 2}), expected_nodes=3, timeout=5, connect_timeout=5)
    assert runtime.partitions == {0: 102, 1: 101, 2: 103}


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_a_partition_id_outside_the_runs_clients_is_refused_at_the_start(bad: int) -> None:
    with pytest.raises(FedCustomError, match=rf"partition-id={bad}.*federation.clients = 3.*0\.\.2"):
        FlowerRuntime(_Grid({101: bad, 102: 0, 103: 1}), expected_nodes=3, timeout=5, connect_timeout=5)


def test_a_rejoining_node_takes_its_partition_and_the_lost_node_state_is_named(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: three nodes; the machine of partition 1 dies and its SuperNode comes back as node 104
    grid = _Grid({101: 1, 102: 0, 103: 2})
    runtime = FlowerRuntime(grid, expected_nodes=3, timeout=5, connect_timeout=5)
    grid.partition_of_node[104] = 1
    # Execute
    runtime._rejoin({102, 103, 104})
    # Assert
    assert runtime.partitions == {0: 102, 1: 104, 2: 103}
    assert "partition 1 rejoined as SuperNode 104 (was 101)" in caplog.text
    assert "SCAFFOLD control variate" in caplog.text and "starts again from zero" in caplog.text
