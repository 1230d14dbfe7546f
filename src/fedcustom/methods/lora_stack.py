"""``--lora-aggregation stack`` on the clients: the backbone weights LoRA adapts travel down with the adapter.

FLoRA (arXiv 2409.05976) merges each round's exact aggregate sum p_k s_k B_k A_k into the backbone and restarts
the adapter (B = 0), so every round's update is exact whatever each client's rank. The server therefore owns the
adapted weights W of every LoRA layer (``<module>.base_layer.weight``): they are part of the global state it
broadcasts, never trained (frozen as in any LoRA run) and never uploaded. :class:`StackedBase` names them, reads
them and puts a broadcast's values in place before a client trains or the global model is evaluated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedcustom.errors import ConfigError

if TYPE_CHECKING:
    from fedcustom.config import RunConfig

State = dict[str, torch.Tensor]
BASE_WEIGHT = "base_layer.weight"


def save_merged(model: nn.Module, folder: Path) -> None:
    """A stacked run's model as a whole transformers model: its federated training lives in the merged backbone,
    not in the adapter (which restarts each round), so the adapter is merged into a copy and the copy saved."""
    copy.deepcopy(model).merge_and_unload().save_pretrained(folder)


def stacks(cfg: RunConfig) -> bool:
    """--lora-aggregation stack: each round's exact LoRA aggregate is merged into the backbone."""
    return cfg.method.name == "lora" and cfg.method.lora_aggregation == "stack"


def base_weight_name(lora_a_name: str) -> str:
    """``<module>.lora_A.<adapter>.weight`` -> ``<module>.base_layer.weight`` (the weight that A's layer adapts)."""
    parts = lora_a_name.split(".")
    return ".".join([*parts[:parts.index("lora_A")], *BASE_WEIGHT.split(".")])


class StackedBase:
    """The adapted backbone weights of a PEFT LoRA model: read, split off a broadcast, and written back."""

    def __init__(self, model: nn.Module, scaling: float) -> None:
        from peft.tuners.lora import Linear, LoraLayer

        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if not isinstance(layer, Linear) or getattr(layer, "fan_in_fan_out", False):
                raise ConfigError(f"--lora-aggregation stack: {name} is a {type(layer).__name__} LoRA layer; stack "
                                  f"merges B A into nn.Linear weights only (use --lora-targets to pick linear "
                                  f"layers, or --lora-aggregation svd)")
            for adapter, value in layer.scaling.items():
                if abs(float(value) - scaling) > 1e-12:
                    raise ConfigError(f"--lora-aggregation stack: {name} adapter {adapter!r} scales B A by "
                                      f"{value}, expected --lora-alpha / --lora-r = {scaling}")
            self.params[f"{name}.{BASE_WEIGHT}"] = params[f"{name}.{BASE_WEIGHT}"]
        if not self.params:
            raise ConfigError("--lora-aggregation stack: the model has no LoRA layer to merge into")
        self.initial = self.base_state()  # the pretrained values (centralized baselines start from them)

    def base_state(self) -> State:
        """CPU copies of the adapted weights (the server's initial values)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}

    def split(self, state: State) -> tuple[State, State]:
        """(the adapter and head tensors, the adapted backbone weights) of a broadcast global state."""
        trainable = {k: v for k, v in state.items() if k not in self.params}
        return trainable, {k: v for k, v in state.items() if k in self.params}

    @torch.no_grad()
    def apply(self, base: State) -> None:
        """Write the broadcast's adapted weights into the backbone (every one must be there)."""
        missing = sorted(self.params.keys() - base.keys())
        if missing:
            raise ValueError(f"--lora-aggregation stack: the global state lacks adapted weights {missing[:3]}")
        for name, tensor in base.items():
            self.params[name].copy_(tensor)
