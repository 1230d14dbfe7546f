"""FedAvg for prompts of per-client lengths (``--prefix-lengths``): each virtual-token row is averaged over the
clients that hold it (example-weighted), a row that no client of the round holds keeps its global value, and every
other tensor (the task head) is averaged as FedAvg does. See fedcustom.methods.prompt_capacity."""

from __future__ import annotations

from typing import Callable

import torch

from fedcustom.methods.prompt_capacity import is_positional
from fedcustom.strategies.base import ClientUpdate
from fedcustom.strategies.fedavg import RunningMean

State = dict[str, torch.Tensor]
Length = Callable[[int], int]  # client -> the number of leading virtual tokens it trains


class PositionMean:
    """The running example-weighted mean per virtual-token row over the clients that hold it."""

    def __init__(self, global_state: State, length: Length, full: int) -> None:
        self.global_state, self.length, self.full = global_state, length, full
        self.others = RunningMean()
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, state: State, num_examples: float, node_id: int | None = None) -> None:
        if node_id is None:
            raise ValueError("positional averaging needs each update's client")
        length = self.length(node_id)
        rows = [name for name, value in state.items() if is_positional(name, value, self.full)]
        for name in rows:
            value = state[name]
            total = self.sums.setdefault(name, torch.zeros(value.shape, dtype=torch.float64))
            weight = self.weights.setdefault(name, torch.zeros(value.shape[0], dtype=torch.float64))
            total[:length].add_(value[:length].double(), alpha=float(num_examples))
            weight[:length] += float(num_examples)
        self.others.add({k: v for k, v in state.items() if k not in rows}, num_examples)

    def result(self) -> State:
        merged = self.others.result() if self.others.total else {}
        for name, total in self.sums.items():
            weight = self.weights[name]
            held = weight > 0
            out = self.global_state[name].double().clone()
            out[held] = total[held] / weight[held].unsqueeze(1)
            merged[name] = out.to(self.global_state[name].dtype)
        return merged


class PositionFedAvg:
    """FedAvg with each prompt row averaged over its holders (see the module docstring)."""

    name = "fedavg-positions"

    def __init__(self, length: Length, full: int) -> None:
        self.length, self.full = length, full  # each client's virtual tokens, and the adapter's

    def accumulator(self, global_state: State | None = None) -> PositionMean:
        if global_state is None:
            raise ValueError("positional averaging keeps unheld rows at the global state; pass it")
        return PositionMean(global_state, self.length, self.full)

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            return global_state
        mean = PositionMean(global_state, self.length, self.full)
        for update in updates:
            mean.add(update.state, update.num_examples, update.node_id)
        return mean.result()
