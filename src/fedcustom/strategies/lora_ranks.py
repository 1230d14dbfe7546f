"""Aggregating LoRA adapters of different ranks exactly (issue 21: heterogeneous clients).

A client k with rank r_k trains A_k (r_k x in) and B_k (out x r_k); its update to a weight is s_k B_k A_k with
s_k = alpha_k / r_k. Averaging A and B separately (FedAvg of the factors, zero-padded to the largest rank) gives
(sum p_k B_k)(sum p_k A_k), which is not the average of the products sum p_k s_k B_k A_k as soon as clients differ.

- :func:`stack` is FLoRA's exact aggregate (arXiv 2409.05976): the factors stacked along the rank, each client's
  A scaled by p_k s_k, so that B_stack @ A_stack equals sum p_k s_k B_k A_k exactly; its rank is sum r_k.
- :func:`truncate` brings that product back to a client's rank r by SVD (FlexLoRA, arXiv 2402.11505): the best
  rank-r approximation, split as B = U sqrt(S), A = sqrt(S) V^T and divided by that client's scaling.
- :func:`padded_average` is the inexact baseline, kept to show the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClientLora:
    """One client's factors for one adapted weight, its LoRA scaling alpha / r and its aggregation weight."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    weight: float

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LoRA factors must be A (r x in) and B (out x r), got A {tuple(self.a.shape)} and "
                             f"B {tuple(self.b.shape)}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _normalised(clients: list[ClientLora]) -> list[float]:
    total = sum(c.weight for c in clients)
    if not clients or total <= 0:
        raise ValueError("stacking needs at least one client with a positive weight")
    return [c.weight / total for c in clients]


def weighted_delta(clients: list[ClientLora]) -> torch.Tensor:
    """sum p_k s_k B_k A_k in float64: the update FedAvg of the products would apply (the exact target)."""
    shares = _normalised(clients)
    return sum(p * c.scaling * (c.b.double() @ c.a.double()) for p, c in zip(shares, clients))


def stack(clients: list[ClientLora]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stack (sum r_k x in), B_stack (out x sum r_k)) with B_stack @ A_stack = sum p_k s_k B_k A_k."""
    shares = _normalised(clients)
    a = torch.cat([p * c.scaling * c.a.double() for p, c in zip(shares, clients)], dim=0)
    b = torch.cat([c.b.double() for c in clients], dim=1)
    return a, b


def truncate(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank x in), B (out x rank)) with scaling * B @ A the best rank-``rank`` approximation of ``delta``."""
    if rank <= 0 or scaling == 0:
        raise ValueError(f"rank must be positive and scaling non-zero, got {rank} and {scaling}")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:keep] = root[:, None] * vh[:keep] / scaling
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


def padded_average(clients: list[ClientLora]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of the factors, zero-padded to the largest rank: what a rank-agnostic server does (inexact)."""
    shares, rank = _normalised(clients), max(c.rank for c in clients)
    a = sum(p * torch.nn.functional.pad(c.a.double(), (0, 0, 0, rank - c.rank)) for p, c in zip(shares, clients))
    b = sum(p * torch.nn.functional.pad(c.b.double(), (0, rank - c.rank)) for p, c in zip(shares, clients))
    return a, b
