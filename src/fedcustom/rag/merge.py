"""Merging the clients' top-k lists into one, deduplicated by content hash.

- ``score``: every index holds unit vectors from the same encoder, so inner products from different clients
  compare; keeping the best k by score gives exactly the top k of one central index over all documents.
- ``rrf``: reciprocal rank fusion (Cormack et al., SIGIR 2009): a document scores the *sum* over clients of
  1 / (60 + rank), so one returned by several clients rises; ranks only, for scores that do not compare.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcustom.errors import FedCustomError

MERGES = ("score", "rrf")
RRF_CONSTANT = 60  # Cormack et al.'s k, which the paper found robust across collections


@dataclass(frozen=True)
class Hit:
    """One document as a client returned it: its rank is 1-based within that client's list."""

    id: str
    score: float
    rank: int
    text: str | None = None  # None in the first phase of two-phase retrieval


@dataclass(frozen=True)
class Merged:
    id: str
    score: float  # the best inner product (score merge) or the fused reciprocal-rank sum (rrf)
    clients: tuple[int, ...]  # every client that returned it
    text: str | None = None


def merge(lists: dict[int, list[Hit]], k: int, how: str = "score") -> list[Merged]:
    """The top ``k`` documents over the clients' ``lists`` (client id -> hits in rank order)."""
    if how not in MERGES:
        raise FedCustomError(f"--merge {how!r}: expected one of {', '.join(MERGES)}")
    scores: dict[str, float] = {}
    holders: dict[str, list[int]] = {}
    texts: dict[str, str | None] = {}
    for client in sorted(lists):
        for hit in lists[client]:
            value = hit.score if how == "score" else 1.0 / (RRF_CONSTANT + hit.rank)
            if how == "score":
                scores[hit.id] = max(scores.get(hit.id, value), value)
            else:
                scores[hit.id] = scores.get(hit.id, 0.0) + value
            holders.setdefault(hit.id, []).append(client)
            if texts.get(hit.id) is None:
                texts[hit.id] = hit.text
    order = sorted(scores, key=lambda doc: (-scores[doc], doc))[:k]
    return [Merged(doc, scores[doc], tuple(holders[doc]), texts[doc]) for doc in order]
