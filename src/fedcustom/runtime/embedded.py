"""Embedded runtime: every client is a handler called in this process, one after another.

Sequential on purpose: all simulated clients share one backbone in memory, so peak memory is one
model plus one client's trainable tensors, whatever the number of clients.

Network conditions are simulated, not slept through: each (round, client) draws from its own seed
whether the client fails and how long it would take to answer; a client slower than the deadline is
a straggler. Either way it gives no update, so users can study dropouts and deadlines reproducibly.
With device profiles (fedcustom.profiles) a client's time is its measured training time scaled by its
compute speed plus its bytes over its bandwidth, known once it has trained: a straggler trains, and its
update arrives too late.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from fedcustom.profiles import ClientProfile, profile_of
from fedcustom.runtime.messages import Handler, Message, Reply

log = logging.getLogger(__name__)
FAULT_STREAM = 7  # separates simulated faults from every other seeded draw


@dataclass(frozen=True)
class SimulatedFaults:
    """Per message: fail with ``failure_rate``; answer after Exp(``mean_latency``) seconds, too late past ``deadline``."""

    failure_rate: float = 0.0
    mean_latency: float = 0.0
    deadline: float = float("inf")
    seed: int = 0
    profiles: tuple[ClientProfile, ...] | list[ClientProfile] = ()  # cycled over the clients (--client-profiles)

    def outcome(self, message: Message, node_id: int) -> str | None:
        """Why this client does not answer ``message`` (None: it answers in time)."""
        from fedcustom.training import derive_seed  # training imports torch; keep this module light

        rng = np.random.default_rng(derive_seed(self.seed, message.round, node_id, FAULT_STREAM))
        failed, latency = rng.random() < self.failure_rate, rng.exponential(self.mean_latency or 1.0)
        if failed:
            return "simulated client failure"
        if self.mean_latency and latency > self.deadline:
            return f"straggler: simulated latency {latency:.1f} s exceeds the {self.deadline:g} s deadline"
        return None

    def on_device(self, message: Message, node_id: int, reply: Reply) -> Reply:
        """With profiles: ``reply`` with the client's simulated seconds (metric ``simulated_seconds``), or a
        straggler's error when that exceeds the deadline (the round waited until then)."""
        if not self.profiles or reply.error is not None:
            return reply
        profile = profile_of(list(self.profiles), node_id)
        moved = len(message.payload) + len(message.attachment) + len(reply.payload) + len(reply.attachment)
        seconds = profile.seconds(float(reply.metrics.get("train_seconds", 0.0)), moved)
        if seconds > self.deadline:
            return Reply(error=f"straggler: simulated {seconds:.1f} s on device {profile.name or node_id} exceeds "
                               f"the {self.deadline:g} s deadline", metrics={"simulated_seconds": self.deadline})
        reply.metrics["simulated_seconds"] = seconds
        return reply


class EmbeddedRuntime:
    """Delivers messages by calling ``handler(node_id, message)`` for each node in id order."""

    def __init__(self, handler: Handler, num_nodes: int, faults: SimulatedFaults | None = None) -> None:
        self._handler = handler
        self._nodes = list(range(num_nodes))
        self._faults = faults

    @property
    def local_handler(self) -> Handler:
        """The in-process clients (their state goes into checkpoints)."""
        return self._handler

    def nodes(self) -> list[int]:
        return list(self._nodes)

    def stream(
        self, messages: dict[int, Message], on_reply: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, Reply]]:
        """Call each node's handler in id order, yielding its reply before the next node trains."""
        for node_id in sorted(messages):
            if node_id not in self._nodes:
                raise KeyError(f"node {node_id} is not part of this runtime")
            dropped = self._faults.outcome(messages[node_id], node_id) if self._faults else None
            if dropped:
                log.warning("client %d gave no update: %s", node_id, dropped)
                reply = Reply(error=dropped)
            else:
                reply = self._call(node_id, messages[node_id])
                if self._faults:
                    reply = self._faults.on_device(messages[node_id], node_id, reply)
            if on_reply:
                on_reply(node_id)
            yield node_id, reply

    def send_and_receive(
        self, messages: dict[int, Message], on_reply: Callable[[int], None] | None = None
    ) -> dict[int, Reply]:
        return dict(self.stream(messages, on_reply))

    def post(self, messages: dict[int, Message]) -> dict[int, Reply]:
        """Handled at once, in node order (the replies are what :meth:`collect` returns)."""
        return self.send_and_receive(messages)

    def collect(self, posted: dict[int, Reply], on_reply: Callable[[int], None] | None = None) -> dict[int, Reply]:
        for node_id in posted if on_reply else ():
            on_reply(node_id)
        return posted

    def _call(self, node_id: int, message: Message) -> Reply:
        try:
            return self._handler(node_id, message)
        except Exception as exc:  # a failing client must not stop the round
            log.warning("client %d failed: %s", node_id, exc)
            return Reply(error=f"{type(exc).__name__}: {exc}")
