"""A FedAvg round under secure aggregation: the server learns only the weighted sum of the updates.

The four stages of :mod:`fedcustom.privacy.secagg` travel through the runtime like any other
message kinds. The third stage is the training message: it carries the global state and the
client's routed key shares, and the client answers with its masked, fixed-point update

    x_u = (n_u / N) * (trained_u - start_u)        (N: examples of every client that advertised)

so the unmasked sum, rescaled by N / (examples of the survivors), is the example-weighted FedAvg
update of the clients that answered. Example counts travel in the clear (as in plain FedAvg);
the tensors never do. Each client's update is clipped per element to ``clip`` before encoding; the
fixed-point step is ``2 * clip / (2^bits - 1)`` with the most bits that cannot overflow the ring.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.privacy.secagg import (
    ADVERTISE, SHARE, UNMASK, SecAggAbort, SecAggClient, SecAggServer, decode_sum, encode_vector, max_clients,
)
from fedcustom.runtime import Message, Reply, Runtime

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
TRAIN_MASKED = "train_secagg"
_LEN = struct.Struct(">Q")


def flatten(state: State) -> np.ndarray:
    """Every tensor in sorted-name order, as one float64 vector."""
    return torch.cat([state[n].reshape(-1).double() for n in sorted(state)]).numpy()


def unflatten(vector: np.ndarray, like: State) -> State:
    """Inverse of :func:`flatten`, in ``like``'s shapes and dtypes."""
    names = sorted(like)
    pieces = torch.split(torch.from_numpy(vector), [like[n].numel() for n in names])
    return {n: p.reshape(like[n].shape).to(like[n].dtype) for n, p in zip(names, pieces)}


def fixed_point_bits(clients: int) -> int:
    """The finest fixed point whose sum over ``clients`` encodings cannot wrap the 32-bit ring."""
    return next(bits for bits in range(31, 0, -1) if max_clients(bits) >= clients)


def pack(train_payload: bytes, routed: bytes) -> bytes:
    """The training message's payload: the encoded global state, then the client's routed shares."""
    return _LEN.pack(len(train_payload)) + train_payload + routed


def unpack(payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) < _LEN.size or _LEN.unpack_from(payload)[0] > len(payload) - _LEN.size:
        raise PayloadError(f"secure-aggregation training payload of {len(payload)} bytes is truncated")
    size = _LEN.unpack_from(payload)[0]
    return payload[_LEN.size:_LEN.size + size], payload[_LEN.size + size:]


@dataclass
class SecureRoundOutcome:
    """What the server learned: the weighted mean update (None when the round aborted) and who counted."""

    mean_update: State | None
    survivors: list[int]
    replies: dict[int, Reply]  # the masked-input replies (metrics, example counts)
    rejected: dict[int, str]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]


class SecureRound:
    """Server side of one securely aggregated round over ``runtime``."""

    def __init__(self, runtime: Runtime, rnd: int, chosen: list[int], like: State, clip: float, threshold: float):
        self.runtime, self.rnd, self.chosen, self.like, self.clip = runtime, rnd, chosen, like, clip
        length = sum(t.numel() for t in like.values())
        self.threshold = max(2, math.ceil(threshold * len(chosen))) if len(chosen) > 1 else 1
        self.server = SecAggServer(rnd, self.threshold, length)
        self.bits = fixed_point_bits(len(chosen))
        self.rejected: dict[int, str] = {}
        self.bytes_up = dict.fromkeys(chosen, 0)
        self.bytes_down = dict.fromkeys(chosen, 0)
        self.examples: dict[int, int] = {}

    def run(self, train_messages: Callable[[list[int]], dict[int, Message]],
            on_reply: Callable[[int], None] | None = None) -> SecureRoundOutcome:
        """All four stages; ``train_messages`` builds the usual training messages for the given nodes."""
        masked: dict[int, Reply] = {}
        try:
            self._stage({n: Message(ADVERTISE, self.rnd) for n in self.chosen}, self._advertised)
            self._stage({n: Message(SHARE, self.rnd, p) for n, p in self.server.share_requests().items()},
                        lambda n, r: self.server.receive_shares(n, r.payload))
            routed = self.server.masked_input_requests()
            total = sum(self.examples[n] for n in routed)
            config = {"secagg_total_examples": total, "secagg_clip": self.clip, "secagg_bits": self.bits}
            train = train_messages(sorted(routed))
            messages = {n: Message(TRAIN_MASKED, self.rnd, pack(m.payload, routed[n]), {**m.config, **config})
                        for n, m in train.items()}
            masked = self._stage(messages, lambda n, r: self.server.receive_masked_input(n, r.payload), on_reply)
            self._stage({n: Message(UNMASK, self.rnd, p) for n, p in self.server.unmask_requests().items()},
                        lambda n, r: self.server.receive_unmask(n, r.payload))
            ring_sum = self.server.unmask()
        except SecAggAbort as exc:
            log.warning("round %d: secure aggregation aborted: %s", self.rnd, exc)
            for node in self.chosen:
                self.rejected.setdefault(node, str(exc))
            return SecureRoundOutcome(None, [], masked, self.rejected, self.bytes_up, self.bytes_down)
        survivors = self.server.survivors
        for node in set(survivors) & set(self.rejected):  # failed only the unmask stage: its input is in the sum
            log.info("round %d: client %d did not help unmask, but its masked update is in the sum", self.rnd, node)
            del self.rejected[node]
        weighted = decode_sum(ring_sum, len(survivors), self.clip, self.bits)
        mean = weighted * (total / sum(self.examples[n] for n in survivors))
        replies = {n: masked[n] for n in survivors}
        return SecureRoundOutcome(unflatten(mean, self.like), survivors, replies, self.rejected,
                                  self.bytes_up, self.bytes_down)

    def _advertised(self, node: int, reply: Reply) -> None:
        if reply.num_examples <= 0:
            raise UpdateRejected(f"num_examples must be positive, got {reply.num_examples}")
        self.server.receive_advertise(node, reply.payload)
        self.examples[node] = reply.num_examples

    def _stage(self, messages: dict[int, Message], receive: Callable[[int, Reply], None],
               on_reply: Callable[[int], None] | None = None) -> dict[int, Reply]:
        """Send one stage; record each valid answer; a failed or malformed one drops that client."""
        for node, message in messages.items():
            self.bytes_down[node] += len(message.payload)
        replies = self.runtime.send_and_receive(messages, on_reply)
        accepted = {}
        for node in sorted(messages):
            reply = replies.get(node)
            try:
                if reply is None:
                    raise UpdateRejected("no reply")
                self.bytes_up[node] += len(reply.payload)
                if reply.error:
                    raise UpdateRejected(f"client reported an error: {reply.error}")
                if reply.round is not None and reply.round != self.rnd:
                    raise UpdateRejected(f"stale round: the reply answers round {reply.round}, expected {self.rnd}")
                receive(node, reply)
            except (PayloadError, UpdateRejected) as exc:
                log.warning("round %d: client %d dropped from secure aggregation: %s", self.rnd, node, exc)
                self.rejected.setdefault(node, str(exc))
                continue
            accepted[node] = reply
        return accepted


class SecureClientSide:
    """Client side: one SecAggClient per node for the round in progress (its keys never leave it)."""

    def __init__(self) -> None:
        self.sessions: dict[int, SecAggClient] = {}

    def handle(self, node: int, message: Message, num_examples: int) -> Reply:
        """Stages 1, 2 and 4 (stage 3 is training: see :meth:`masked_update`); ``num_examples`` is announced in
        stage 1, in the clear, as plain FedAvg reveals it."""
        if message.kind == ADVERTISE:
            self.sessions[node] = SecAggClient(node, message.round)
            return Reply(self.sessions[node].advertise(), num_examples=num_examples, round=message.round)
        session = self._session(node, message)
        payload = session.share(message.payload) if message.kind == SHARE else session.unmask(message.payload)
        if message.kind == UNMASK:
            del self.sessions[node]
        return Reply(payload, num_examples=1, round=message.round)

    def masked_update(self, node: int, message: Message, routed: bytes, start: State, trained: State,
                      num_examples: int) -> bytes:
        """This client's example-weighted update, clipped, fixed-point encoded and masked."""
        cfg = message.config
        share = num_examples / float(cfg["secagg_total_examples"])
        update = np.nan_to_num(flatten(trained) - flatten(start)) * share
        ring = encode_vector(update, float(cfg["secagg_clip"]), int(cfg["secagg_bits"]))
        return self._session(node, message).masked_input(routed, ring)

    def _session(self, node: int, message: Message) -> SecAggClient:
        session = self.sessions.get(node)
        if session is None:
            raise PayloadError(f"secure-aggregation message {message.kind!r} for round {message.round} before this "
                               f"client advertised its keys")
        return session
