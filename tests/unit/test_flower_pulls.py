"""Flower's object pulls retry sooner in our processes (fedcustom.deploy.flower.pulls): a message object that is
not pushed yet is asked for again after about 10 ms instead of Flower's 1 s, doubling up to 0.5 s."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedcustom.deploy.flower.pulls import CAP_S, INITIAL_S, quicker_object_pulls


class RecordingEvent(threading.Event):
    """An Event whose waits are recorded and return at once (the pull loop's sleep between asks)."""

    waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        RecordingEvent.waits.append(float(timeout or 0.0))
        return self.is_set()


def test_a_late_object_is_asked_for_again_after_short_waits_that_double_up_to_the_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an object that is "not available" for its first 8 asks, then arrives
    quicker_object_pulls()
    RecordingEvent.waits = []
    # the module's own view of threading (not the threading module itself, which the thread pool uses too)
    monkeypatch.setattr(inflatable_utils, "threading", SimpleNamespace(Event=RecordingEvent, Lock=threading.Lock))
    asks = []

    def pull(object_id: str) -> bytes:
        asks.append(object_id)
        if len(asks) <= 8:
            raise ObjectUnavailableError(object_id)
        return b"content"

    # Execute
    pulled = inflatable_utils.pull_objects(["a"], pull)
    # Assert: the content, after 8 waits from about INITIAL_S (Flower's jitter is +-20%) doubling to the cap
    assert pulled == {"a": b"content"} and len(asks) == 9
    waits = RecordingEvent.waits
    assert len(waits) == 8
    assert INITIAL_S * 0.8 <= waits[0] <= INITIAL_S * 1.2
    expected = [min(INITIAL_S * 2**i, CAP_S) for i in range(8)]
    assert all(e * 0.8 <= w <= e * 1.2 for w, e in zip(waits, expected)), waits
    assert max(waits) <= CAP_S * 1.2 < 1.0  # Flower's own first wait is 1 s


def test_the_change_reaches_the_function_every_puller_calls_and_is_idempotent() -> None:
    quicker_object_pulls()
    quicker_object_pulls()
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (INITIAL_S, CAP_S)
        assert defaults["max_tries_per_object"] is None and defaults["max_time"] > 0  # bounded by time alone
