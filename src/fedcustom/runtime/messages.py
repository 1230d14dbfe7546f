"""The one primitive every protocol uses: the server sends a Message, a client answers a Reply.

This mirrors Flower's Message API (a message kind, a payload and a config record), so the Flower
runtime only translates; methods with other protocols (split learning, distillation) add their
own message kinds rather than their own transport.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

Scalar = int | float | str | bool


@dataclass(frozen=True)
class Message:
    """Server to client: what to do (``kind``), encoded tensors and plain settings."""

    kind: str
    round: int
    payload: bytes = b""
    config: dict[str, Scalar] = field(default_factory=dict)
    attachment: bytes = b""  # tensors beside the payload that no codec touches (SCAFFOLD's control variate)


@dataclass(frozen=True)
class Reply:
    """Client to server: encoded tensors, example count and metrics; ``error`` when it failed.

    ``round`` is the round the reply answers (a client sets it to ``message.round``) so the server
    can reject a stale or replayed update; None from clients that predate the field."""

    payload: bytes = b""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    round: int | None = None
    attachment: bytes = b""  # as Message.attachment (SCAFFOLD: the change of the client's control variate)


Handler = Callable[[int, Message], Reply]


LABELS_KEY = "fedcustom.labels"  # setup config: the server's label names as JSON (clients need the same order)
PUBLIC_KEY = "fedcustom.public"  # setup config: the public texts as JSON (distillation: every party labels them)


@dataclass(frozen=True)
class ClientSetup:
    """What a client built elsewhere (a Flower node) must be told to build the same side of the job as the
    server's: the label names in the server's order and, for distillation, the public texts to label. It travels
    once to each client, before the first round (a Flower node keeps it for the run)."""

    label_names: list[str]
    public: list[str] | None = None

    def to_config(self) -> dict[str, str]:
        """The setup as string settings (a message's config); :meth:`from_config` reads them back."""
        config = {LABELS_KEY: json.dumps(self.label_names)}
        if self.public is not None:
            config[PUBLIC_KEY] = json.dumps(self.public)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClientSetup:
        """Inverse of :meth:`to_config`, taking its keys out of ``config``; KeyError when it holds no setup."""
        labels = config.pop(LABELS_KEY)
        public = config.pop(PUBLIC_KEY, None)
        return cls(json.loads(str(labels)), None if public is None else json.loads(str(public)))

    def wire_bytes(self) -> int:
        """What the setup message carries: its settings' keys and values, UTF-8 (as payload bytes are counted,
        without the carrier's framing)."""
        return sum(len(k.encode()) + len(v.encode()) for k, v in self.to_config().items())


class Runtime(Protocol):
    """Moves messages between the server and clients; knows nothing about methods."""

    @property
    def local_handler(self) -> Handler | None:
        """The client handler that runs in this process (embedded), whose state a checkpoint keeps; else None."""
        ...

    def nodes(self) -> list[int]:
        """Ids of the clients that can be reached."""
        ...

    def stream(
        self, messages: dict[int, Message], on_reply: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, Reply]]:
        """Deliver one message per node and yield (node, reply) as replies arrive, in node order where the runtime
        serializes them; a consumer that drops each reply holds one at a time (see send_and_receive)."""
        ...

    def send_and_receive(
        self, messages: dict[int, Message], on_reply: Callable[[int], None] | None = None
    ) -> dict[int, Reply]:
        """Deliver one message per node and collect the replies that arrive."""
        ...

    def post(self, messages: dict[int, Message]) -> Any:
        """Deliver one message per node without waiting for the replies: :meth:`collect` gets them later, so the
        server can go on meanwhile (the embedded runtime handles them at once, in node order)."""
        ...

    def collect(self, posted: Any, on_reply: Callable[[int], None] | None = None) -> dict[int, Reply]:
        """The replies to what :meth:`post` delivered (an error reply for a node that did not answer in time);
        ``on_reply(node)`` for each reply as it is taken."""
        ...
