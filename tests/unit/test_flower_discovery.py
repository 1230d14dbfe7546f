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
        self.messages: list = []  # every message pushed, in order

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of_node)

    def push_messages(self, messages: list) -> list[str]:
        self.pushed = [m.metadata.dst_node_id for m in messages]
        self.messages += messages
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


def test_the_client_setup_travels_once_with_the_hello_and_messages_name_it_by_digest() -> None:
    # Prepare: distillation's setup (label names and public texts: far larger than its logits)
    from fedcustom.runtime import ClientSetup, Message
    from fedcustom.runtime.flower.records import CONFIG, SETUP_DIGEST

    setup = ClientSetup(["neg", "pos"], [f"public text number {i}" for i in range(50)])
    grid = _Grid({101: 1, 102: 0})
    # Execute
    runtime = FlowerRuntime(grid, expected_nodes=2, timeout=5, connect_timeout=5, setup=setup)
    hellos = list(grid.messages)
    runtime.post({0: Message("train", 1, b"x", {"lr": 0.1}), 1: Message("train", 1, b"x", {"lr": 0.1})})
    # Assert: each hello carries the whole setup, and it is counted once per node
    assert [dict(m.content["hello"]) for m in hellos] == [setup.to_config()] * 2
    assert runtime.setup_bytes == 2 * setup.wire_bytes() > len("".join(setup.public))
    # ... every training message only its digest (16 characters), not the public texts
    for message in grid.messages[2:]:
        config = dict(message.content[CONFIG])
        assert len(config[SETUP_DIGEST]) == 16 and not any("public text" in str(v) for v in config.values())
    # a rejoining node is greeted with the setup again, and counted again
    grid.partition_of_node[103] = 1
    runtime._rejoin({102, 103})
    assert dict(grid.messages[-1].content["hello"]) == setup.to_config()
    assert runtime.setup_bytes == 3 * setup.wire_bytes()
    # a node that says it lost the setup (restarted under its old node id) gets it with its next message only
    runtime.note_lost_setup(0, "Flower error 2 from partition 0: this SuperNode holds no client setup for this run")
    runtime.note_lost_setup(1, "Flower error 2 from partition 1: some other failure")
    for _ in range(2):
        runtime.post({0: Message("train", 2, b"x", {}), 1: Message("train", 2, b"x", {})})
    carried = [[k in dict(m.content[CONFIG]) for k in setup.to_config()] for m in grid.messages[-4:]]
    assert carried == [[True, True], [False, False], [False, False], [False, False]]
    assert runtime.setup_bytes == 4 * setup.wire_bytes()


def test_a_node_builds_from_the_setup_it_kept_and_refuses_a_message_without_it() -> None:
    # Prepare
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedcustom.deploy.flower.apps import keep_setup, node_setup
    from fedcustom.runtime import ClientSetup
    from fedcustom.runtime.flower.records import SETUP_DIGEST, setup_digest

    setup, other = ClientSetup(["neg", "pos"], ["a public text"]), ClientSetup(["pos", "neg"])
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    # Execute / Assert: a restarted node that was not greeted again refuses by name
    with pytest.raises(FedCustomError, match="holds no client setup for this run.*none kept"):
        node_setup({SETUP_DIGEST: setup_digest(setup.to_config())}, context)
    keep_setup(ConfigRecord({}), context)  # a ping's hello carries no setup: nothing kept
    with pytest.raises(FedCustomError, match="none kept"):
        node_setup({SETUP_DIGEST: setup_digest(setup.to_config())}, context)
    keep_setup(ConfigRecord(setup.to_config()), context)
    config = {SETUP_DIGEST: setup_digest(setup.to_config()), "lr": 0.1}
    assert node_setup(config, context) == setup and config == {"lr": 0.1}
    with pytest.raises(FedCustomError, match="kept another one"):  # a message of another setup
        node_setup({SETUP_DIGEST: setup_digest(other.to_config())}, context)
    with pytest.raises(FedCustomError, match="no 'fedcustom.setup-digest'"):
        node_setup({"lr": 0.1}, context)
    # a message that carries the setup (to a node that lost it) is served, and the node keeps it from then on
    restarted = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    config = {**setup.to_config(), SETUP_DIGEST: setup_digest(setup.to_config()), "lr": 0.1}
    assert node_setup(config, restarted) == setup and config == {"lr": 0.1}
    assert node_setup({SETUP_DIGEST: setup_digest(setup.to_config())}, restarted) == setup
