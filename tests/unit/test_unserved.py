"""A SuperNode answers a message with an error when its worker is gone, on Flower's real node state: a message
no worker took and one whose worker died mid-task, only once the message waited the grace period with no worker
connected, never while one is connected, never for a node whose workers do not use the wake socket."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")

from flwr.app import ConfigRecord, Metadata, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supernode.nodestate import NodeStateFactory  # noqa: E402
from flwr.supernode.start_client_internal import _insert_message  # noqa: E402

from fedcustom.deploy.flower.unserved import UnservedReplies, started  # noqa: E402
from fedcustom.deploy.flower.wake import WakeClient, WakeServer  # noqa: E402

RUN = 7


@pytest.fixture
def wake() -> Iterator[WakeServer]:
    with tempfile.TemporaryDirectory(prefix="fcw-") as folder:  # short: a socket path is limited to ~100 bytes
        server = WakeServer(Path(folder) / "node.sock")
        yield server
        server.close()


def _node_with_a_message(unserved: UnservedReplies) -> tuple[Any, Any, int]:
    """Flower's node state after its loop stored a server message and created its task (as in
    ``_pull_and_store_message``), watched by ``unserved``: the state, the message and the task id."""
    since = started()
    state = NodeStateFactory(ObjectStoreFactory()).state()
    metadata = Metadata(run_id=RUN, message_id="", src_node_id=1, dst_node_id=5, reply_to_message_id="",
                        group_id="2", created_at=time.time(), ttl=600, message_type="train")
    message = make_message(metadata, RecordDict({"fedcustom.config": ConfigRecord({"lr": 0.1})}))
    _insert_message(message, state, state.object_store)
    task = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN)
    unserved.track(state, state.object_store, message, since)
    return state, message, task


def _worker_came_and_went(wake: WakeServer) -> None:
    """A worker connected to the node's wake socket and exited."""
    worker = WakeClient(wake.path)
    assert worker.connect()
    _connected(wake)
    worker.close()
    _disconnected(wake)


def _connected(server: WakeServer) -> None:
    deadline = time.monotonic() + 5
    while not server.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connected


def _disconnected(server: WakeServer) -> None:
    deadline = time.monotonic() + 5
    while server.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.connected


def _check_until(unserved: UnservedReplies, seconds: float) -> bool:
    """The node's reply wait: check every 0.05 s for ``seconds``; whether the node answered."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if unserved.check():
            return True
        time.sleep(0.05)
    return False


def _assert_answered(state: Any, message: Any, task: int) -> None:
    """One error reply to ``message`` for the node's loop to send; its task finished as failed."""
    replies = state.get_messages_legacy(is_reply=True)
    assert len(replies) == 1 and replies[0].metadata.reply_to_message_id == message.metadata.message_id
    assert "this SuperNode's fedcustom worker is gone" in replies[0].error.reason
    status = state.get_tasks(task_ids=[task])[0].status
    assert (status.status, status.sub_status) == ("finished", "failed")


def test_a_message_no_worker_took_is_answered_once_it_waited_the_grace_period(wake: WakeServer) -> None:
    # Prepare: the node's worker was killed before the message came
    _worker_came_and_went(wake)
    unserved = UnservedReplies(wake, grace=0.5)
    state, message, task = _node_with_a_message(unserved)
    # Execute
    early = unserved.check()
    answered = _check_until(unserved, 5.0)
    # Assert: not at once (a worker starting now gets the grace), then answered; the task is finished, so a worker
    # that comes back later does not run it; the message's objects are freed; nothing more to answer
    assert not early and answered
    _assert_answered(state, message, task)
    assert state.claim_task(task) is None
    assert state.object_store.get(message.metadata.message_id) is None
    assert not unserved.check() and unserved.waiting is None


def test_a_message_whose_worker_died_mid_task_is_answered(wake: WakeServer) -> None:
    # Prepare: a connected worker claimed the message's task and started it
    unserved = UnservedReplies(wake, grace=0.2)
    worker = WakeClient(wake.path)
    assert worker.connect()
    _connected(wake)
    state, message, task = _node_with_a_message(unserved)
    assert state.claim_task(task) is not None and state.activate_task(task)
    # Execute: while it runs, well past the grace period, then it is killed
    while_running = _check_until(unserved, 0.6)
    worker.close()
    _disconnected(wake)
    answered = _check_until(unserved, 5.0)
    # Assert: no answer while the worker was there; then the node's error reply, and the task's token is revoked
    assert not while_running and answered
    _assert_answered(state, message, task)


def test_a_message_a_worker_took_and_finished_is_left_to_it(wake: WakeServer) -> None:
    # Prepare: the worker is gone by the time the node looks again, but it finished the task first
    unserved = UnservedReplies(wake, grace=0.0)
    _worker_came_and_went(wake)
    state, message, task = _node_with_a_message(unserved)
    assert state.claim_task(task) is not None and state.activate_task(task)
    assert state.finish_task(task, sub_status="completed", details="")
    # Execute / Assert: nothing to answer
    assert not _check_until(unserved, 0.3) and state.get_messages_legacy(is_reply=True) == []


def test_a_node_whose_workers_never_used_the_wake_socket_waits_as_flowers_does(wake: WakeServer) -> None:
    # Prepare: a worker that polls without the wake socket will take the message later
    unserved = UnservedReplies(wake, grace=0.0)
    state, _message, _task = _node_with_a_message(unserved)
    # Execute / Assert
    assert not _check_until(unserved, 0.3) and state.get_messages_legacy(is_reply=True) == []
