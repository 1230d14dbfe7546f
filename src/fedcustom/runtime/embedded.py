"""Embedded runtime: every client is a handler called in this process, one after another.

Sequential on purpose: all simulated clients share one backbone in memory, so peak memory is one
model plus one client's trainable tensors, whatever the number of clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedcustom.runtime.messages import Handler, Message, Reply

log = logging.getLogger(__name__)


class EmbeddedRuntime:
    """Delivers messages by calling ``handler(node_id, message)`` for each node in id order."""

    def __init__(self, handler: Handler, num_nodes: int) -> None:
        self._handler = handler
        self._nodes = list(range(num_nodes))

    def nodes(self) -> list[int]:
        return list(self._nodes)

    def send_and_receive(
        self, messages: dict[int, Message], on_reply: Callable[[int], None] | None = None
    ) -> dict[int, Reply]:
        replies = {}
        for node_id in sorted(messages):
            if node_id not in self._nodes:
                raise KeyError(f"node {node_id} is not part of this runtime")
            try:
                replies[node_id] = self._handler(node_id, messages[node_id])
            except Exception as exc:  # a failing client must not stop the round
                log.warning("client %d failed: %s", node_id, exc)
                replies[node_id] = Reply(error=f"{type(exc).__name__}: {exc}")
            if on_reply:
                on_reply(node_id)
        return replies
