"""Heterogeneous LoRA ranks (``--lora-ranks``) and FFA-LoRA's frozen A (``--lora-aggregation ffa``) on the clients.

Every client holds the adapter at its full rank R (``--lora-r``); a client of rank r uses only the first r
components: whenever its model is loaded, rows r.. of every A and columns r.. of every B are zeroed. They then stay
exactly zero through its local training (the gradient of a component vanishes while both of its factors are zero,
for SGD and AdamW alike, weight decay included), so its update has rank r and the same shapes as everyone's. A
frozen A (ffa) is restored from its shared initialisation before being masked, since it is not part of the state
that travels. With ``--lora-aggregation svd`` the server keeps the global factors ordered by singular value, so the
first r components a client takes are the best rank-r approximation of the global update (FlexLoRA).
"""

from __future__ import annotations

import torch
from torch import nn

from fedcustom.errors import ConfigError

WHERE = "method.lora_ranks (--lora-ranks)"


def parse_ranks(text: str, full_rank: int) -> list[int]:
    """``"4,8,16"`` -> [4, 8, 16]; each rank in 1 .. ``full_rank``; empty -> []."""
    if not str(text).strip():
        return []
    try:
        ranks = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"{WHERE}: {text!r}; expected comma-separated integers such as 4,8,16") from None
    return check_ranks(ranks, full_rank, f"{WHERE}: {text!r}")


def check_ranks(ranks: list[int], full_rank: int, where: str) -> list[int]:
    """``ranks`` when each is in 1 .. ``full_rank``, else a ConfigError naming ``where`` they came from."""
    if any(not 1 <= r <= full_rank for r in ranks):
        raise ConfigError(f"{where}; each rank must be between 1 and the adapter's rank --lora-r {full_rank}")
    return ranks


def freeze_a(model: nn.Module) -> None:
    """FFA-LoRA: every LoRA A stays at its (seeded, hence shared) initialisation; only B trains and travels."""
    for name, param in model.named_parameters():
        if "lora_A" in name.split("."):
            param.requires_grad_(False)


class ClientRanks:
    """Which rank each client uses on a rank-R adapter, applied to the model when a client's state is loaded."""

    def __init__(self, model: nn.Module, ranks: list[int]) -> None:
        from peft.tuners.lora import LoraLayer

        self.ranks = ranks
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        # frozen A (ffa) does not travel: its initialisation is put back before a client masks it
        self.frozen_a = {id(layer): {a: w.weight.detach().clone() for a, w in layer.lora_A.items()}
                         for layer in self.layers if not any(w.weight.requires_grad for w in layer.lora_A.values())}

    def rank(self, node_id: int | None) -> int | None:
        """Client ``node_id``'s rank (None: the full rank, e.g. the global model)."""
        if node_id is None or not self.ranks:
            return None
        return self.ranks[node_id % len(self.ranks)]

    @torch.no_grad()
    def apply(self, node_id: int | None) -> None:
        """Put client ``node_id``'s rank on the loaded model (None: the full adapter, frozen A restored)."""
        rank = self.rank(node_id)
        for layer in self.layers:
            for adapter, a in layer.lora_A.items():
                if id(layer) in self.frozen_a:
                    a.weight.copy_(self.frozen_a[id(layer)][adapter])
                if rank is not None:
                    a.weight[rank:] = 0
                    layer.lora_B[adapter].weight[:, rank:] = 0
