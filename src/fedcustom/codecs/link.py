"""One end's memory of one codec link, and how a set of links is saved and restored (checkpoints, a Flower
node's state between messages)."""

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


def links_state(prefix: str, links: dict[int, Link], tensors: Tensors) -> dict[str, Any]:
    """Put each link's tensors into ``tensors`` under ``prefix``; return the rest as JSON."""
    meta = {}
    for node, link in links.items():
        key = f"{prefix}.{node}"
        put(tensors, f"{key}.reference", link.reference or {})
        put(tensors, f"{key}.residual", link.residual)
        meta[str(node)] = {"round": link.round, "error_feedback": link.error_feedback,
                           "has_reference": link.reference is not None}
    return meta


def links_from_state(prefix: str, meta: dict[str, Any], tensors: Tensors) -> dict[int, Link]:
    """Inverse of :func:`links_state`."""
    links = {}
    for node, info in meta.items():
        key = f"{prefix}.{node}"
        links[int(node)] = Link(
            reference=group(tensors, f"{key}.reference") if info["has_reference"] else None,
            residual=group(tensors, f"{key}.residual"), round=int(info["round"]),
            error_feedback=bool(info["error_feedback"]),
        )
    return links
