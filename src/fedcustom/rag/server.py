"""The server's side of federated retrieval: broadcast (or route) questions, merge what comes back, count bytes.

Questions travel in batches (one message per client carries every question routed to it), as vectors the server
encodes once; bytes are what crosses the wire: message payload plus its JSON config down, reply payload up. (On a
real SuperLink the question texts also reach every SuperNode: they travel in the Flower run's config, which Flower
gives the nodes too; see README, "On Flower".)"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fedcustom.errors import FedCustomError
from fedcustom.rag.encoder import Encoder
from fedcustom.rag.merge import Hit, Merged, merge
from fedcustom.rag.route import Route
from fedcustom.runtime.messages import Message, Reply, Runtime

log = logging.getLogger(__name__)


def wire_bytes(message: Message) -> int:
    """What a message puts on the wire: its payload and its JSON config."""
    return len(message.payload) + len(json.dumps(message.config))


@dataclass(frozen=True)
class Retrieval:
    """One question's merged top k and what it cost."""

    question: str
    hits: list[Merged]
    clients: list[int]  # the clients it was sent to
    bytes_down: float  # this question's share of the messages sent
    bytes_up: float
    seconds: float  # this question's share of the wall time of the round trip(s)

    def as_row(self, answer: str | None) -> dict:
        """What `fedcustom rag query --json` prints and a Flower ServerApp writes to answers.jsonl."""
        return {"question": self.question, "answer": answer, "clients": self.clients,
                "bytes": self.bytes_down + self.bytes_up, "seconds": self.seconds,
                "passages": [{"id": h.id, "score": h.score, "clients": list(h.clients), "text": h.text}
                             for h in self.hits]}


@dataclass
class FederatedRetriever:
    runtime: Runtime
    encoder: Encoder
    k: int = 5
    how: str = "score"
    route: Route = field(default_factory=Route)
    two_phase: bool = False
    centroids: dict[int, np.ndarray] = field(default_factory=dict)
    _round: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise FedCustomError(f"--k {self.k}: expected a whole number >= 1")

    def _send(self, messages: dict[int, Message]) -> tuple[dict[int, Reply], int, int]:
        replies = self.runtime.send_and_receive(messages)
        down = sum(wire_bytes(m) for m in messages.values())
        up = sum(len(r.payload) for r in replies.values())
        return replies, down, up

    def _message(self, kind: str, payload: bytes = b"", **config: object) -> Message:
        self._round += 1
        return Message(kind, self._round, payload, dict(config))

    def describe(self) -> None:
        """Ask every client for its centroid and size, once; an encoder mismatch stops here with its reason."""
        nodes = self.runtime.nodes()
        # centroids only where routing uses them: every one a client shares tells the server about its documents
        message = self._message("rag_describe", encoder=self.encoder.name, centroids=self.route.top is not None)
        replies = self.runtime.send_and_receive({node: message for node in nodes})
        for node in nodes:
            reply = replies.get(node)
            if reply is None or reply.error:
                reason = reply.error if reply else "no reply"
                if reply is not None and reply.error and "encoder mismatch" in reply.error:
                    raise FedCustomError(f"client {node}: {reply.error}; query with --encoder matching the index or "
                                         f"rebuild the index")
                log.warning("client %d is left out of retrieval: %s", node, reason)
                continue
            bound = reply.metrics.get("max_k")
            if bound is not None and self.k > bound:
                raise FedCustomError(f"--k {self.k}: client {node} answers at most {bound:g} passages per question "
                                     "(its rag-max-k); ask for fewer")
            dim = int(reply.metrics.get("dim", self.encoder.dim))
            self.centroids[node] = np.frombuffer(reply.payload, dtype=np.float32).reshape(-1, dim).copy()
        if not self.centroids:
            raise FedCustomError("no client answered: retrieval needs at least one client with an index")

    def retrieve(self, questions: list[str]) -> list[Retrieval]:
        """Each question's merged top k."""
        if not questions:
            return []
        if not self.centroids:
            self.describe()
        started = time.perf_counter()
        vectors = self.encoder.encode(questions)
        routed = {q: self.route.pick(vectors[q], self.centroids) for q in range(len(questions))}
        asked: dict[int, list[int]] = {}
        for q, clients in routed.items():
            for client in clients:
                asked.setdefault(client, []).append(q)
        messages = {client: self._message("rag_search", vectors[qs].tobytes(), k=self.k, dim=int(vectors.shape[1]),
                                          texts=not self.two_phase) for client, qs in asked.items()}
        replies = self.runtime.send_and_receive(messages)
        hits: dict[int, dict[int, list[Hit]]] = {q: {} for q in routed}
        share_down = {q: 0.0 for q in routed}
        share_up = {q: 0.0 for q in routed}
        for client, qs in asked.items():
            reply = replies.get(client)
            sent = wire_bytes(messages[client])
            for q in qs:
                share_down[q] += sent / len(qs)
            if reply is None or reply.error:
                log.warning("client %d gave no results: %s", client, reply.error if reply else "no reply")
                continue
            rows = json.loads(reply.payload)
            for q, row in zip(qs, rows):
                share_up[q] += len(reply.payload) / len(qs)
                hits[q][client] = [Hit(item[0], float(item[1]), rank, item[2] if len(item) > 2 else None)
                                   for rank, item in enumerate(row, 1)]
        merged = {q: merge(hits[q], self.k, self.how) for q in routed}
        if self.two_phase:
            merged = self._fetch_texts(merged, share_down, share_up)
        per_question = (time.perf_counter() - started) / len(questions)
        return [Retrieval(questions[q], merged[q], routed[q], share_down[q], share_up[q], per_question)
                for q in range(len(questions))]

    def _fetch_texts(self, merged: dict[int, list[Merged]], share_down: dict[int, float],
                     share_up: dict[int, float]) -> dict[int, list[Merged]]:
        """Second phase: ask each document's first holder for the texts the merge kept, and only those."""
        wanted: dict[int, set[str]] = {}
        for hits in merged.values():
            for hit in hits:
                wanted.setdefault(hit.clients[0], set()).add(hit.id)
        messages = {c: self._message("rag_fetch", ids=json.dumps(sorted(ids))) for c, ids in wanted.items()}
        replies, down, up = self._send(messages)
        texts: dict[str, str] = {}
        for client in messages:
            reply = replies.get(client)
            if reply is not None and not reply.error:
                texts.update(json.loads(reply.payload))
        count = len(merged)
        for q in merged:  # the fetch serves every question of the batch: an even share each
            share_down[q] += down / count
            share_up[q] += up / count
        return {q: [Merged(h.id, h.score, h.clients, texts.get(h.id)) for h in hits] for q, hits in merged.items()}
