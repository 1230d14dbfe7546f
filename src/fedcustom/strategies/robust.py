"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum, Multi-Krum, norm bounding.

- Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
- Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
- Norm bounding: Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
  2019 (arXiv:1911.07963).

The math is pure functions over lists of tensors; the strategy classes only pick out the
floating-point tensors, compute in float64 and cast back to the global state's dtypes.
Non-floating tensors (step counters, index buffers) are taken unchanged from the first update.
Median, trimmed mean and Krum are translation-equivariant, so they work on client states
directly (identical to working on deltas ``state - global_state``); norm bounding needs deltas.
"""

from __future__ import annotations

import logging
import math

import torch

from fedcustom.strategies.base import ClientUpdate
from fedcustom.strategies.fedavg import weighted_average

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]


# ---- pure functions -------------------------------------------------------------------------

def coordinate_median(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median in float64; for an even count, the mean of the two middle values."""
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values  # (n, *shape)
    n = len(tensors)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def trimmed_mean(tensors: list[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping floor(beta * n) values at each end, in float64."""
    n = len(tensors)
    k = math.floor(beta * n + 1e-9)  # the epsilon keeps e.g. 0.29 * 100 from trimming 28
    ordered = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values  # (n, *shape)
    return ordered[k:n - k].mean(dim=0)


def pairwise_sq_distances(flat: list[list[torch.Tensor]]) -> torch.Tensor:
    """(n, n) squared L2 distances; ``flat[i]`` is client i's tensors, all flattened together."""
    n = len(flat)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for j in range(len(flat[0])):
        x = torch.stack([parts[j].reshape(-1).to(torch.float64) for parts in flat])  # (n, d_j)
        for i in range(n):
            dist[i] += ((x - x[i]) ** 2).sum(dim=1)
    return dist


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Each client's sum of squared distances to its n - f - 2 nearest other clients."""
    n = dist.shape[0]
    others = dist + torch.diag(torch.full((n,), math.inf, dtype=dist.dtype))  # exclude self
    return torch.topk(others, n - f - 2, dim=1, largest=False).values.sum(dim=1)


def krum_select(dist: torch.Tensor, f: int, m: int) -> list[int]:
    """Indices of the m lowest Krum scores (ties go to the lower index). Needs n >= 2f + 3."""
    order = torch.argsort(krum_scores(dist, f), stable=True)
    return [int(i) for i in order[:m]]


def global_norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of all tensors flattened together, in float64."""
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in tensors))


# ---- plumbing shared by the strategies -------------------------------------------------------

def _float_names(global_state: State) -> list[str]:
    return [name for name, t in global_state.items() if t.is_floating_point()]


def _finish(global_state: State, updates: list[ClientUpdate], merged: State) -> State:
    """Cast merged float64 tensors to the global dtypes; copy the rest from the first update."""
    return {name: merged[name].to(t.dtype) if name in merged else updates[0].state[name]
            for name, t in global_state.items()}


def _weights(updates: list[ClientUpdate]) -> list[float]:
    """Example counts, or equal weights when no update reports any example."""
    counts = [float(max(u.num_examples, 0)) for u in updates]
    return counts if sum(counts) > 0 else [1.0] * len(updates)


def _median_state(global_state: State, updates: list[ClientUpdate]) -> State:
    merged = {n: coordinate_median([u.state[n] for u in updates]) for n in _float_names(global_state)}
    return _finish(global_state, updates, merged)


# ---- strategies ------------------------------------------------------------------------------

class WholeRound:
    """Robust statistics compare the updates with each other: they need every update of the round at once (the
    server then holds every client's state until the merge; memory grows with the clients per round)."""

    def accumulator(self, global_state: State | None = None) -> None:
        return None


class Median(WholeRound):
    """Coordinate-wise median of client states (unweighted); robust while attackers < n / 2."""

    def __init__(self) -> None:
        self.name = "median"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        return _median_state(global_state, updates) if updates else global_state


class TrimmedMean(WholeRound):
    """Coordinate-wise beta-trimmed mean (unweighted); robust while attackers <= floor(beta * n)."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed-mean BETA must satisfy 0 <= BETA < 0.5, got {beta}")
        self.beta = beta
        self.name = f"trimmed-mean:{beta:g}"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            return global_state
        merged = {n: trimmed_mean([u.state[n] for u in updates], self.beta) for n in _float_names(global_state)}
        return _finish(global_state, updates, merged)


class MultiKrum(WholeRound):
    """Example-weighted mean of the m clients with the best Krum scores (default m = n - f).

    With fewer than 2f + 3 updates Krum's guarantee does not hold; the round then logs a warning
    and falls back to the coordinate-wise median, which still tolerates attackers < n / 2.
    """

    def __init__(self, f: int, m: int | None = None) -> None:
        if f < 0:
            raise ValueError(f"Krum's F must be an integer >= 0, got {f}")
        if m is not None and m < 1:
            raise ValueError(f"Multi-Krum's M must be an integer >= 1, got {m}")
        self.f, self.m = f, m
        self.name = f"multi-krum:{f}" + ("" if m is None else f":{m}")

    def _count(self, n: int) -> int:
        return min(n - self.f if self.m is None else self.m, n)

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            return global_state
        n = len(updates)
        if n < 2 * self.f + 3:
            log.warning("%s needs at least %d updates, got %d; using the coordinate-wise median this round",
                        self.name, 2 * self.f + 3, n)
            return _median_state(global_state, updates)
        names = _float_names(global_state)
        dist = pairwise_sq_distances([[u.state[name] for name in names] for u in updates])
        chosen = [updates[i] for i in krum_select(dist, self.f, self._count(n))]
        log.debug("%s chose nodes %s", self.name, [u.node_id for u in chosen])
        merged = weighted_average([{n_: u.state[n_] for n_ in names} for u in chosen], _weights(chosen))
        return _finish(global_state, updates, merged)


class Krum(MultiKrum):
    """The single client state with the best Krum score (Multi-Krum with m = 1)."""

    def __init__(self, f: int) -> None:
        super().__init__(f, 1)
        self.name = f"krum:{f}"


class NormBound(WholeRound):
    """FedAvg of global + each client's delta scaled down to L2 norm <= c (all tensors together)."""

    def __init__(self, c: float) -> None:
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"norm-bound C must be a finite number > 0, got {c}")
        self.c = c
        self.name = f"norm-bound:{c:g}"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            return global_state
        names = _float_names(global_state)
        bounded = [self._bound(global_state, u.state, names) for u in updates]
        return _finish(global_state, updates, weighted_average(bounded, _weights(updates)))

    def _bound(self, global_state: State, state: State, names: list[str]) -> State:
        """The client's state with its delta scaled to norm <= c; untouched when already inside."""
        deltas = {n: state[n].to(torch.float64) - global_state[n].to(torch.float64) for n in names}
        norm = global_norm(list(deltas.values()))
        if norm <= self.c:
            return {n: state[n].to(torch.float64) for n in names}
        scale = self.c / norm
        return {n: global_state[n].to(torch.float64) + deltas[n] * scale for n in names}
