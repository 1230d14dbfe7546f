"""A worker's per-task calls to its node: a rejected task token is an error of that task, never a SIGINT to the
worker's process (Flower's task helpers interrupt the process, which killed a worker whose heartbeat raced its
task's end)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from fedcustom.deploy.flower.task_client import task_heartbeat, task_retry_invoker  # noqa: E402


def status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:9094/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError(f"HTTP {code}", request=request, response=httpx.Response(code, request=request))


@pytest.fixture
def interrupts() -> Iterator[list[int]]:
    """Every SIGINT this process receives while the test runs (instead of a KeyboardInterrupt)."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


class Node:
    """A node's SendTaskHeartbeat answering from a script: an exception to raise or a success flag."""

    def __init__(self, *answers: object) -> None:
        self.answers, self.calls = list(answers), 0

    def SendTaskHeartbeat(self, _request: object) -> SimpleNamespace:  # noqa: N802 - Flower's method name
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(success=answer)


@pytest.mark.parametrize("refusal", [status_error(401), status_error(403), False], ids=["401", "403", "success-false"])
def test_a_refused_heartbeat_ends_the_tasks_heartbeats_without_interrupting_the_worker(interrupts, refusal) -> None:
    node = Node(True, refusal, True)
    beat = task_heartbeat(node)
    assert beat() and beat()  # sent; refused (given up, not retried)
    assert beat() and node.calls == 2  # no more heartbeats for this task
    assert interrupts == []


def test_a_heartbeat_the_node_cannot_take_now_is_retried(interrupts) -> None:
    node = Node(status_error(503), httpx.ConnectError("node restarting"), True)
    beat = task_heartbeat(node)
    assert not beat() and not beat() and beat()
    assert node.calls == 3 and interrupts == []


def test_a_rejected_token_is_raised_to_the_task_and_transient_errors_are_retried(interrupts) -> None:
    invoker = task_retry_invoker()
    answers = [status_error(503), status_error(401)]

    def call() -> str:
        raise answers.pop(0)

    with pytest.raises(httpx.HTTPStatusError) as raised:  # the 503 retried, the 401 raised
        invoker.invoke(call)
    assert raised.value.response.status_code == 401 and answers == [] and interrupts == []


def test_the_retried_failures_are_still_flowers() -> None:
    """task_client copies the two lists of what Flower's HTTP invoker retries (private names in Flower); when a Flower
    upgrade changes them, this fails so the copies are reviewed rather than silently drifting."""
    from flwr.supercore.retry import http_retry

    from fedcustom.deploy.flower.task_client import RETRYABLE_STATUS, RETRYABLE_TRANSPORT

    assert RETRYABLE_STATUS == http_retry._RETRYABLE_STATUS_CODES  # noqa: SLF001
    assert set(RETRYABLE_TRANSPORT) == set(http_retry._RETRYABLE_TRANSPORT_ERRORS)  # noqa: SLF001
