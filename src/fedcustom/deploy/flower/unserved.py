"""A SuperNode's error reply to a message whose worker is gone.

A node started with ``--isolation process`` leaves each message's task to an external executor, its ``fedcustom
worker``. When that worker is down (killed, crashed, out of memory, restarting), Flower 1.41's node waits for a
reply that does not come: a task nobody claimed stays pending for good, and one whose worker died mid-task is
given up only when its heartbeats lapse (2 x 30 s). Meanwhile the server waits out its whole ``--round-timeout``
(600 s by default) for this node, round after round until the worker is back (measured: a worker killed between
rounds cost its node's next round the test's full 45 s timeout).

The node can tell that its worker is gone: a worker connects to the node's wake socket as it starts, before its
imports, and stays connected until it exits (:mod:`.wake`). So once a node has seen a worker there, a message
that has waited ``grace`` seconds while no worker was connected is answered by the node itself with Flower's
error reply (and its task finished as failed, so a worker that comes back later does not run it), as Flower's
own node answers a message whose ClientApp crashed. The server counts the node out of that round at once; its
next message goes to the worker again if one is back. A node whose workers never connect to its wake socket
(started without ``--wake-socket``) waits as Flower's does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, Status, SubStatus
from flwr.supercore.date import now
from flwr.supercore.constant import TaskType
from flwr.supernode.start_client_internal import _insert_message

from fedcustom.deploy.flower.wake import WakeServer

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    """The message the node waits to send a reply to, and its task."""

    state: Any  # the node's NodeState
    object_store: Any  # the node's ObjectStore
    message: Message
    task_id: int
    stored_at: float  # time.monotonic()


class UnservedReplies:
    """Watches the message the node's loop stored last, and answers it with an error when its worker is gone."""

    def __init__(self, wake: WakeServer, grace: float) -> None:
        self.wake, self.grace = wake, grace
        self.waiting: _Waiting | None = None

    def track(self, state: Any, object_store: Any, message: Message, since: datetime) -> None:
        """The node's loop stored ``message`` and made its task (at or after ``since``): watch it."""
        run_id = message.metadata.run_id
        newest = [task for task in state.get_tasks(run_ids=[run_id], order_by="pending_at", ascending=False)
                  if task.type == TaskType.CLIENT_APP][:1]
        if newest and datetime.fromisoformat(newest[0].pending_at) >= since:
            self.waiting = _Waiting(state, object_store, message, newest[0].task_id, time.monotonic())
        else:  # no task: the node answered the message itself (a FAB it could not verify)
            self.waiting = None

    def check(self) -> bool:
        """Called while the node waits for the reply: answer the message if its worker is gone. Returns whether
        it answered."""
        waiting = self.waiting
        if waiting is None or not self.wake.ever_connected:
            return False
        tasks = waiting.state.get_tasks(task_ids=[waiting.task_id])
        if not tasks or tasks[0].status.status == Status.FINISHED:
            self.waiting = None  # its worker replied
            return False
        alone = self.wake.seconds_without_worker()
        if min(alone, time.monotonic() - waiting.stored_at) < self.grace:  # a worker starting now gets the grace too
            return False
        pending = tasks[0].status.status == Status.PENDING
        if pending and waiting.state.claim_task(waiting.task_id) is None:
            return False  # a worker took it just now
        self.waiting = None
        _answer(waiting, pending, f"this SuperNode's fedcustom worker is gone (none connected to its wake socket "
                                  f"{self.wake.path} for {alone:.1f} s): the message was not "
                                  f"{'run' if pending else 'finished'}")
        return True


def _answer(waiting: _Waiting, pending: bool, reason: str) -> None:
    """Store the error reply for the node's loop to send, and finish the message's task as failed (a task claimed
    by a worker that died loses its token: nothing it left can push a reply any more)."""
    state, message = waiting.state, waiting.message
    log.warning("run %s: %s", message.metadata.run_id, reason)
    state.finish_task(waiting.task_id, sub_status=SubStatus.FAILED, details=reason)
    message_id = message.metadata.message_id
    if pending:  # a worker records the start when it pulls the message
        state.record_message_processing_start(message_id)
    state.record_message_processing_end(message_id)  # the node reports the processing time with the reply
    # Stored as Flower's node stores the error replies it makes itself (a FAB it cannot verify)
    _insert_message(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message), state,
                    waiting.object_store)
    waiting.object_store.delete(message_id)  # unless a worker confirmed receiving it (which frees it), it stays


def started() -> datetime:
    """Now, as Flower's node state stamps a task's ``pending_at``."""
    return now()
