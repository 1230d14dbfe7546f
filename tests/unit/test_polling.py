"""Idle polling of `fedcustom worker` and `fedcustom supernode`: fast right after work, backing off while idle."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from fedcustom.deploy.flower import worker  # noqa: E402


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(worker.time, "sleep", waits.append)
    return waits


def test_backoff_doubles_to_its_ceiling_and_resets_after_work(slept: list[float]) -> None:
    backoff = worker.Backoff(0.05, 0.5)
    for _ in range(6):
        backoff.wait()
    backoff.reset()
    backoff.wait()
    assert slept == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.05])


def test_the_supernodes_idle_wait_backs_off_and_its_reply_wait_is_short(slept: list[float]) -> None:
    # Flower's loop sleeps 3 s after an empty pull and 0.5 s while waiting for a task's reply
    node = worker._NodeSleep(0.05, 0.5)
    for _ in range(4):
        node.sleep(3)
    node.sleep(0.5)  # busy: a message is being handled
    node.sleep(3)
    assert slept == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.05, 0.05])
    assert node.monotonic() > 0  # everything else is the time module's


def test_the_supernode_commands_own_flags_may_follow_flowers_and_flowers_pass_through_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcustom.cli import main

    calls: list[tuple] = []
    monkeypatch.setattr(worker, "run_supernode", lambda *args: calls.append(args))
    flower = ["--superlink", "127.0.0.1:9092", "--port", "9094", "--isolation", "process", "--node-config",
              "partition-id=0 data-path='/data/my rows.csv'", "--insecure"]
    assert main(["supernode", "--poll", "0.02", *flower, "--wake-socket", "/tmp/n.sock", "--max-poll", "0.3"]) == 0
    assert main(["supernode", *flower, "--worker-grace", "2"]) == 0
    assert calls == [(flower, 0.02, 0.3, "/tmp/n.sock", 5.0), (flower, 0.05, 0.5, None, 2.0)]
