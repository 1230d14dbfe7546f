"""FedAvg (McMahan et al., 2017): the example-weighted mean of client states."""

from __future__ import annotations

import torch

from fedcustom.strategies.base import ClientUpdate


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Per-tensor weighted mean, accumulated in float64 so identical inputs return themselves exactly."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out = {}
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[name].to(torch.float64) * (weight / total)
        out[name] = acc.to(first.dtype)
    return out


class FedAvg:
    """Weighted by each client's number of training examples."""

    name = "fedavg"

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        if not updates:
            return global_state
        return weighted_average([u.state for u in updates], [u.num_examples for u in updates])
