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


class Accumulator(Protocol):
    """A strategy's merge, fed one client state at a time."""

    def add(self, state: dict[str, torch.Tensor], num_examples: int, node_id: int | None = None) -> None: ...

    def result(self) -> dict[str, torch.Tensor]: ...


class Strategy(Protocol):
    """Merges client updates into the next global state."""

    name: str

    def accumulator(self, global_state: dict[str, torch.Tensor] | None = None) -> Accumulator | None:
        """A running merge the server feeds one update at a time (with its client) and then drops the update (memory
        flat in the number of clients), or None when the strategy needs every update at once (robust statistics)."""
        ...

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        ...
