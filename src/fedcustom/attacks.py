"""Simulated malicious clients, so users can see what a robust strategy buys them.

The attacks are the standard ones of the Byzantine-robust FL literature (Blanchard et al., 2017;
Fang et al., 2020; Tolpegin et al., 2020): model poisoning by flipping or scaling the update or
replacing it with noise, and data poisoning by flipping labels. Which clients are malicious is fixed
once per run from the seed, so every strategy in a comparison faces the same attackers.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from fedcustom.training import derive_seed

State = dict[str, torch.Tensor]
ATTACKER_STREAM = 3  # separates the choice of attackers from sampling and training seeds
MODEL_POISONING = ("sign-flip", "scale", "noise")


def malicious_clients(num_clients: int, fraction: float, seed: int) -> set[int]:
    """round(fraction x clients) client ids, the same for every strategy run with this seed."""
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, ATTACKER_STREAM))
    return {int(c) for c in rng.choice(num_clients, size=count, replace=False)}


def poison_update(kind: str, start: State, trained: State, scale: float, generator: torch.Generator) -> State:
    """What a malicious client sends instead of ``trained`` (it started the round from ``start``)."""
    out = {}
    for name, value in trained.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        update = value - start[name]
        if kind == "sign-flip":
            update = -scale * update
        elif kind == "scale":
            update = scale * update
        elif kind == "noise":
            update = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.dtype) * scale
        else:
            raise ValueError(f"attack {kind!r}: expected one of {', '.join(MODEL_POISONING)}")
        out[name] = start[name] + update
    return out


def flip_labels(table: datasets.Dataset, num_labels: int) -> datasets.Dataset:
    """Data poisoning: label y becomes num_labels - 1 - y (for two classes, the opposite class)."""
    return table.map(lambda row: {"labels": num_labels - 1 - int(row["labels"])}, desc=None)
