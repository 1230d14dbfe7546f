"""How a ``fedcustom worker`` talks to its node for one task: retries and heartbeats that never end the process.

Flower's task-side helpers are written for ``flwr-clientapp``, which runs one task per process: its simple HTTP
retry invoker sends SIGINT to its own process when the node rejects the task's token (HTTP 401), and its task
heartbeat does the same when the node answers a heartbeat with ``success = False``. A worker serves many tasks in
one process, and a heartbeat racing its task's end (the task thread pushed the output, the node finished the task
and revoked its token, the heartbeat thread's next beat arrives) then kills the whole worker: seen in CI, where
the node answered every later message of the run with "this SuperNode's fedcustom worker is gone". Here a
rejected token is an error in the calling thread (the task's own calls fail and its reply says so), and a refused
heartbeat ends that task's heartbeats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger(__name__)

# What Flower's simple HTTP invoker retries (flwr.supercore.retry.http_retry, Flower 1.41): the node restarting or
# briefly unreachable; every other HTTP status is the answer
RETRYABLE_STATUS = frozenset({httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT})
RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                       httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)


def task_retry_invoker() -> Any:
    """Flower's retries for one task's token-authenticated calls (transport errors and 502/503/504, with
    exponential backoff), except that any other HTTP error, a rejected token included, is raised to the caller
    instead of interrupting the process."""
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in RETRYABLE_STATUS

    return RetryInvoker(lambda: exponential(max_delay=MAX_RETRY_DELAY), (*RETRYABLE_TRANSPORT, httpx.HTTPStatusError),
                        max_tries=None, max_time=None, should_giveup=give_up)


def task_heartbeat(client: Any) -> Callable[[], bool]:
    """A heartbeat function for ``flwr.supercore.heartbeat.HeartbeatSender`` (True: sent or given up; False: retry
    later), as Flower's ``make_task_heartbeat_fn_http`` but a heartbeat the node refuses (the task is over) stops
    this task's heartbeats and is logged, instead of raising or interrupting the process."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    request, refused = SendTaskHeartbeatRequest(), False

    def beat() -> bool:
        nonlocal refused
        if refused:
            return True
        try:
            accepted = client.SendTaskHeartbeat(request).success
        except RETRYABLE_TRANSPORT:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in RETRYABLE_STATUS:
                return False
            accepted = False
        except Exception as exc:  # noqa: BLE001 - e.g. Flower's RunNotRunningException on 403: the task is over too
            log.debug("task heartbeat failed: %s", exc)
            accepted = False
        if not accepted:
            refused = True
            log.info("the node refused a task heartbeat (the task has ended); no more heartbeats for it")
        return True

    return beat
