"""``--lora-aggregation svd``: LoRA merged by its products (FlexLoRA, arXiv 2402.11505).

Averaging A and B separately gives (sum p_k B_k)(sum p_k A_k), not the average update sum p_k B_k A_k. This
strategy averages the products exactly (float64, one dense out x in sum per adapted weight, so memory stays flat in
the number of clients) and factors the mean back to the adapter's rank R by SVD (fedcustom.strategies.lora_ranks
.truncate): B = U sqrt(S), A = sqrt(S) V^T, components ordered by singular value. When the clients' ranks add up to
at most R the result is exact; otherwise it is the best rank-R approximation. A client of rank r then takes the
first r components (fedcustom.methods.lora_capacity), the best rank-r approximation. Every other tensor (the task
head) is averaged as FedAvg does. The adapter's scaling alpha / R is the same for every client, so it cancels.
"""

from __future__ import annotations

import torch

from fedcustom.strategies.base import ClientUpdate
from fedcustom.strategies.fedavg import RunningMean
from fedcustom.strategies.lora_ranks import truncate

A, B = "lora_A", "lora_B"


def lora_pairs(names: list[str]) -> dict[str, str]:
    """A-name -> B-name of every adapted weight in ``names``."""
    pairs = {}
    for name in names:
        parts = name.split(".")
        if A in parts:
            partner = ".".join(B if p == A else p for p in parts)
            if partner in names:
                pairs[name] = partner
    return pairs


class ProductMean:
    """The running example-weighted mean of B A per adapted weight, and of every other tensor."""

    def __init__(self) -> None:
        self.others = RunningMean()
        self.products: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.Size, torch.dtype]] = {}
        self.pairs: dict[str, str] = {}
        self.total = 0.0

    def add(self, state: dict[str, torch.Tensor], num_examples: float, node_id: int | None = None) -> None:
        if not self.pairs:
            self.pairs = lora_pairs(list(state))
        for a_name, b_name in self.pairs.items():
            a, b = state[a_name].double(), state[b_name].double()
            self.shapes[a_name] = (a.shape, b.shape, state[a_name].dtype)
            product = self.products.setdefault(a_name, torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64))
            product.addmm_(b, a, alpha=float(num_examples))
        paired = set(self.pairs) | set(self.pairs.values())
        self.others.add({k: v for k, v in state.items() if k not in paired}, num_examples)
        self.total += float(num_examples)

    def result(self) -> dict[str, torch.Tensor]:
        if self.total <= 0:
            raise ValueError(f"weights must sum to a positive number, got {self.total}")
        merged = self.others.result() if self.others.total else {}
        for a_name, b_name in self.pairs.items():
            a_shape, b_shape, dtype = self.shapes[a_name]
            a, b = truncate(self.products[a_name] / self.total, a_shape[0], 1.0)
            merged[a_name], merged[b_name] = a.to(dtype), b.to(dtype)
        return merged


class LoraSvd:
    """FedAvg on the LoRA products, factored back to the adapter's rank (see the module docstring)."""

    name = "lora-svd"

    def accumulator(self, global_state: dict[str, torch.Tensor] | None = None) -> ProductMean:
        return ProductMean()

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        if not updates:
            return global_state
        mean = ProductMean()
        for update in updates:
            mean.add(update.state, update.num_examples)
        return mean.result()
