"""The wake socket between a SuperNode and its worker: only the node's user may connect, a stored message wakes
the worker at once, a pushed reply ends the node's wait, and either side survives the other's restart."""

from __future__ import annotations

import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fedcustom.deploy.flower.wake import WakeClient, WakeServer


@pytest.fixture
def path():
    with tempfile.TemporaryDirectory(prefix="fcw-") as folder:  # short: a socket path is limited to ~100 bytes
        yield Path(folder) / "node.sock"


def _connected(server: WakeServer, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while server.connected < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connected == count


def test_the_socket_is_the_node_users_only(path: Path) -> None:
    server = WakeServer(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        server.close()
    assert not path.exists()


def test_a_stored_message_wakes_the_worker_and_a_pushed_reply_wakes_the_node(path: Path) -> None:
    server, client = WakeServer(path), WakeClient(path)
    try:
        assert client.wait(0.05) is False  # connects; nothing stored yet: the fallback poll's timeout
        _connected(server)
        threading.Timer(0.1, server.task_stored).start()
        start = time.monotonic()
        assert client.wait(5.0) is True
        assert time.monotonic() - start < 2.0  # woken, not timed out
        client.reply_pushed()
        start = time.monotonic()
        server.wait_for_reply(5.0)
        assert time.monotonic() - start < 2.0
    finally:
        client.close()
        server.close()


def test_a_worker_without_its_node_polls_and_reconnects_when_the_node_is_back(path: Path) -> None:
    client = WakeClient(path)
    start = time.monotonic()
    assert client.wait(0.1) is False  # no node: it only sleeps
    assert time.monotonic() - start >= 0.1
    client.reply_pushed()  # nobody to tell: no error
    server = WakeServer(path)  # the node starts (or restarts)
    try:
        assert client.wait(0.05) is False
        _connected(server)
        server.task_stored()
        assert client.wait(5.0) is True
    finally:
        client.close()
        server.close()


def test_a_node_drops_a_worker_that_went_away(path: Path) -> None:
    server, client = WakeServer(path), WakeClient(path)
    try:
        client.wait(0.01)
        _connected(server)
        client.close()  # the worker was killed
        deadline = time.monotonic() + 5
        while server.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connected == 0
        server.task_stored()  # no one to wake: no error
    finally:
        server.close()
