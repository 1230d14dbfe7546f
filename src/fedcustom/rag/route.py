"""Which clients a question goes to: all of them, or the N with an index centroid nearest the question (source
selection as in FeB4RAG / RAGRoute, in a simple form: each client shares a few unit k-means centroids of its
vectors once, a client scores by its nearest centroid, and a question goes only where documents like it are)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcustom.errors import FedCustomError


@dataclass(frozen=True)
class Route:
    top: int | None = None  # None: every client

    @classmethod
    def parse(cls, spec: str) -> Route:
        """``all`` or ``topn:N`` (N >= 1)."""
        if spec == "all":
            return cls()
        name, _, count = spec.partition(":")
        if name == "topn" and count.isdigit() and int(count) >= 1:
            return cls(int(count))
        raise FedCustomError(f"--route {spec!r}: expected all or topn:N with N a whole number >= 1")

    def __str__(self) -> str:
        return "all" if self.top is None else f"topn:{self.top}"

    def pick(self, question: np.ndarray, centroids: dict[int, np.ndarray]) -> list[int]:
        """The clients this question (a unit vector) is sent to, in id order; ``centroids``: client -> (n, dim). A
        client that shared no centroid (an index of an older fedcustom) cannot be ranked and is always asked."""
        clients = sorted(centroids)
        if self.top is None or self.top >= len(clients):
            return clients
        unranked = [c for c in clients if centroids[c].size == 0]
        ranked = [c for c in clients if c not in unranked]
        similarity = {c: float(np.max(np.atleast_2d(centroids[c]) @ question)) for c in ranked}
        return sorted(unranked + sorted(ranked, key=lambda c: (-similarity[c], c))[: self.top])
