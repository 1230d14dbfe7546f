"""``--lora-aggregation stack``: FLoRA's exact aggregate merged into the backbone (arXiv 2409.05976).

FLoRA stacks the clients' factors, A_stack = [p_1 s_1 A_1; ...] and B_stack = [B_1 ... B_K], so that B_stack A_stack
is exactly sum p_k s_k B_k A_k (fedcustom.strategies.lora_ranks.stack), merges that into the backbone weight and
starts the next round from fresh adapters. The server here computes the same product directly (float64, one dense
out x in sum per adapted weight, so memory stays flat in the number of clients) and merges it:

    W <- W + s * sum_k p_k B_k A_k,   A <- A_0 (its shared initialisation),   B <- 0

with p_k each client's share of the round's examples and s = alpha / r the adapter's scaling (the same for every
client: a client of rank r_k trains the first r_k components of the rank-R adapter, fedcustom.methods
.lora_capacity, so its product has rank r_k and its scaling is the adapter's). Every other tensor (the task head)
is averaged as FedAvg does. The adapted weights W travel down with the adapter (fedcustom.methods.lora_stack); the
clients upload only A, B and the head.
"""

from __future__ import annotations

import torch

from fedcustom.methods.lora_stack import base_weight_name
from fedcustom.strategies.base import ClientUpdate
from fedcustom.strategies.lora_svd import ProductMean

State = dict[str, torch.Tensor]


class StackedMerge(ProductMean):
    """The running mean of B A per adapted weight, merged into the current global weights at the end."""

    def __init__(self, global_state: State, scaling: float) -> None:
        super().__init__()
        self.global_state = global_state
        self.scaling = scaling

    def result(self) -> State:
        if self.total <= 0:
            raise ValueError(f"weights must sum to a positive number, got {self.total}")
        merged = dict(self.global_state)  # adapters restart where they began (A_0, B = 0); W is replaced below
        if self.others.total:
            merged.update(self.others.result())
        for a_name, b_name in self.pairs.items():
            merged[a_name], merged[b_name] = self.global_state[a_name], self.global_state[b_name]
            w_name = base_weight_name(a_name)
            if w_name not in self.global_state:
                raise ValueError(f"--lora-aggregation stack: the global state has no {w_name} to merge {a_name} "
                                 f"into")
            w = self.global_state[w_name]
            merged[w_name] = (w.double() + self.products[a_name] * (self.scaling / self.total)).to(w.dtype)
        return merged


class LoraStack:
    """FedAvg of the LoRA products, merged into the backbone each round (see the module docstring)."""

    name = "lora-stack"

    def __init__(self, scaling: float) -> None:
        self.scaling = scaling

    def accumulator(self, global_state: State | None = None) -> StackedMerge:
        if global_state is None:
            raise ValueError("--lora-aggregation stack merges into the current global state; none was given")
        return StackedMerge(global_state, self.scaling)

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            return global_state
        merge = self.accumulator(global_state)
        for update in updates:
            merge.add(update.state, update.num_examples)
        return merge.result()
