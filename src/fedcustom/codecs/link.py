"""One end's memory of one codec link, how ends that hold the same reference share one copy of it, and how a set
of links is saved and restored (checkpoints, a Flower node's state between messages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedcustom.tensorstate import Tensors, group, put

State = dict[str, torch.Tensor]


@dataclass
class Link:
    """One end's memory of one directed link (server to client c, or client c to server)."""

    reference: State | None = None  # the state both ends agree on (delta)
    residual: State = field(default_factory=dict)  # sender only: what was not delivered yet (topk)
    round: int = 0  # the round ``reference`` was agreed in; 0: none yet (the next delta is against zero)
    # Error feedback: on a link whose reference follows the receiver's reconstruction from round to round
    # (server to client), the next difference already contains everything not yet delivered, so adding a
    # residual would send it twice; only links whose reference is reset each round (client to server,
    # where each update starts from the new global) keep one.
    error_feedback: bool = True


def same_tensors(a: State, b: State) -> bool:
    """Same names, shapes, dtypes and bits."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class SharedReferences:
    """Links whose references hold the same tensors share one copy of them.

    With a lossless delta chain every client sent the global state of round r rebuilds exactly that state, so the
    server's and (embedded) the clients' ends of all those links would otherwise hold one full copy each: 100
    clients of full fine-tuning, 100 x 91 MB per end. Sharing is decided by comparing bits, not assumed, so a
    lossy chain (whose references differ per link) simply shares nothing. A copy lives while some link still
    holds it: memory grows with the number of distinct rounds that clients last took part in, not with clients.
    """

    def __init__(self) -> None:
        self._by_round: dict[int, State] = {}

    def share(self, link: Link, links: dict[int, Link]) -> None:
        """Point ``link.reference`` at an identical copy another link already holds, or offer it for sharing."""
        if link.reference is None:
            return
        pooled = self._by_round.get(link.round)
        if pooled is not None and pooled is not link.reference and same_tensors(pooled, link.reference):
            link.reference = pooled
            return
        if pooled is None:
            held = {id(other.reference) for other in links.values() if other.reference is not None}
            self._by_round = {r: s for r, s in self._by_round.items() if id(s) in held}  # drop what no link holds
        self._by_round.setdefault(link.round, link.reference)

    def adopt(self, links: dict[int, Link]) -> None:
        """Offer restored links' references (shared again by :func:`links_from_state`) for sharing."""
        self._by_round = {}
        for link in links.values():
            if link.reference is not None:
                self._by_round.setdefault(link.round, link.reference)


def links_state(prefix: str, links: dict[int, Link], tensors: Tensors) -> dict[str, Any]:
    """Put each link's tensors into ``tensors`` under ``prefix``; return the rest as JSON. A reference several links
    share is stored once (safetensors refuses tensors that share memory, and a checkpoint should not grow with
    clients either)."""
    meta, stored = {}, {}
    for node, link in links.items():
        key = f"{prefix}.{node}"
        reference = None
        if link.reference is not None:
            reference = stored.get(id(link.reference))
            if reference is None:
                reference = stored[id(link.reference)] = f"{prefix}.reference.{len(stored)}"
                put(tensors, reference, link.reference)
        put(tensors, f"{key}.residual", link.residual)
        meta[str(node)] = {"round": link.round, "error_feedback": link.error_feedback, "reference": reference}
    return meta


def links_from_state(prefix: str, meta: dict[str, Any], tensors: Tensors) -> dict[int, Link]:
    """Inverse of :func:`links_state` (links that shared a reference share it again). Also reads checkpoints
    written before references were shared (one ``has_reference`` copy per link)."""
    links, references = {}, {}
    for node, info in meta.items():
        key = f"{prefix}.{node}"
        if "has_reference" in info:
            reference = group(tensors, f"{key}.reference") if info["has_reference"] else None
        elif info["reference"] is None:
            reference = None
        else:
            reference = references.get(info["reference"])
            if reference is None:
                reference = references[info["reference"]] = group(tensors, info["reference"])
        links[int(node)] = Link(reference=reference, residual=group(tensors, f"{key}.residual"),
                                round=int(info["round"]), error_feedback=bool(info["error_feedback"]))
    return links
