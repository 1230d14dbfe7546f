"""A data owner's side of federated retrieval: answers the server's messages from its own index.

Message kinds (the ``rag`` protocol in :mod:`fedcustom.protocols`):

- ``rag_describe`` (config: encoder, centroids) -> the index's unit routing centroids when asked for (float32
  payload, metric ``dim``; each the mean of at least 5 documents), document count and ``max_k`` (metric); an error
  when the index was built with another encoder than the server's.
- ``rag_search`` (payload: float32 question vectors; config: k, dim, texts) -> JSON, per question, the top k as
  ``[id, score, text]`` (``text`` omitted when ``texts`` is false: the first phase of two-phase retrieval).
- ``rag_fetch`` (config: ids as JSON) -> JSON ``{id: text}`` for the ids this client holds.

What a data owner bounds (the server reads the texts of the passages it retrieves; these keep one query from
reading more): a search asks for at most ``max_k`` passages per question (a Flower node's ``rag-max-k``, else
100; the server checks it before searching), and a fetch only for ids this client returned, without their texts, in
its last search (two-phase retrieval), each once; anything else is refused by name.
"""

from __future__ import annotations

import json
import time

import numpy as np

from fedcustom.models import model_identity
from fedcustom.rag.index import ClientIndex
from fedcustom.runtime.messages import Message, Reply

KINDS = ("rag_describe", "rag_search", "rag_fetch")
DEFAULT_MAX_K = 100  # passages per question a data owner answers unless it says otherwise (a node's rag-max-k)


class RagClient:
    """Handler over each node's index (embedded: every simulated client's; a Flower node: its own)."""

    def __init__(self, indexes: dict[int, ClientIndex], max_k: int = DEFAULT_MAX_K) -> None:
        self.indexes = indexes
        self.max_k = max_k  # the most passages one question may ask for
        # each node's ids of its last text-less search not fetched yet: what a fetch may name
        self.offered: dict[int, set[str]] = {node: set() for node in indexes}

    def __call__(self, node_id: int, message: Message) -> Reply:
        index = self.indexes[node_id]
        if message.kind == "rag_describe":
            asked = str(message.config.get("encoder", ""))
            if model_identity(asked) != model_identity(index.encoder):  # "minilm", its Hub id and folder agree
                return Reply(error=f"encoder mismatch: this index was built with {index.encoder!r}, the server "
                                   f"queries with {asked!r}", round=message.round)
            shared = index.centroids if message.config.get("centroids", True) else index.centroids[:0]
            return Reply(payload=shared.astype(np.float32).tobytes(), num_examples=len(index.documents),
                         metrics={"dim": float(index.dim), "max_k": float(self.max_k)}, round=message.round)
        if message.kind == "rag_search":
            dim, k = int(message.config["dim"]), int(message.config["k"])
            if k > self.max_k:
                return Reply(error=f"k={k}: this data owner answers at most {self.max_k} passages per question "
                                   "(its rag-max-k)", round=message.round)
            questions = np.frombuffer(message.payload, dtype=np.float32).reshape(-1, dim)
            started = time.perf_counter()
            found = index.search(questions, k)
            seconds = time.perf_counter() - started
            texts = bool(message.config.get("texts", True))
            if not texts:  # the texts the server may fetch next (a search's, replacing the last one's)
                self.offered[node_id] = {doc.id for row in found for doc, _ in row}
            body = [[[doc.id, score, doc.text] if texts else [doc.id, score] for doc, score in row] for row in found]
            return Reply(payload=json.dumps(body).encode(), num_examples=len(index.documents),
                         metrics={"search_seconds": seconds}, round=message.round)
        if message.kind == "rag_fetch":
            wanted = set(json.loads(str(message.config["ids"])))
            unoffered = wanted - self.offered[node_id]
            if unoffered:
                return Reply(error=f"asked for the texts of {len(unoffered)} passages this data owner did not return "
                                   "in its last two-phase search, or whose texts it already sent", round=message.round)
            held = {doc.id: doc.text for doc in index.documents if doc.id in wanted}
            self.offered[node_id] -= wanted  # each text once
            return Reply(payload=json.dumps(held).encode(), round=message.round)
        return Reply(error=f"unknown message kind {message.kind!r} for a retrieval client", round=message.round)
