"""The server's merge step: a strategy maps the global state and client updates to a new state.

Strategies see only ``dict[str, Tensor]`` and example counts, never a method's internals, so
every method works with every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded, validated contribution to a round."""

    node_id: int
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """Merges client updates into the next global state."""

    name: str

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        ...
