"""Personalization (``--personalize``): which trainable tensors stay with their client, and how a client's own
model is scored.

- ``head``: the task head stays private (FedPer, Arivazhagan et al. 2019); the rest is averaged.
- ``lora-b-local``: LoRA's A matrices are shared, its B matrices stay private (FedSA-LoRA, Guo et al. 2024).
- ``dual-lora``: a second LoRA adapter (``personal``, same rank and targets, B = 0 so it starts as a no-op) is
  trained with the global one and never leaves the client (FedDPA-style, Long et al. 2024).
- ``local-prefix[:L]``: the last L of the prefix's (or prompt's) virtual tokens are the client's own, the others
  are shared and averaged (default L: half of ``--num-virtual-tokens``); the seed paper's personalized prefix.
- ``finetune:K``: everything is shared; a client's own model is the global one after K local steps on its rows.
- ``local``: nothing is shared: each client trains its own model on its own rows only, from the pretrained one
  (the local-only baseline every personalization mode should beat; the global model stays the initial one).

Private tensors never leave their client: the server's global state holds only the shared part, uploads carry
only that, and each client keeps its private part (starting from the pretrained model's) between rounds and in
checkpoints. ``personal`` scores in the round log are each client's own model on its held-out rows
(``--client-eval-fraction``, 0.2 by default when personalizing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcustom.errors import ConfigError

State = dict[str, torch.Tensor]
HEAD_MODULES = frozenset({"classifier", "score", "head", "fc"})  # as fedcustom.vision.head_names looks for
PERSONAL_ADAPTER = "personal"  # dual-lora's private LoRA adapter
DEFAULT_CLIENT_EVAL_FRACTION = 0.2  # each client's held-out share when personalizing and none is given
WHERE = "federation.personalize (--personalize)"
EXPECTED = "none, head, lora-b-local, dual-lora, local-prefix[:L] (L private virtual tokens), finetune:K (K >= 1 " \
           "local steps on the client's rows before its evaluation) or local (nothing shared: local-only training)"


def is_virtual_token_table(name: str) -> bool:
    """PEFT's prefix / prompt embedding: one row per virtual token (``prompt_encoder.<adapter>.embedding.weight``)."""
    return "prompt_encoder" in name.split(".") and name.endswith("embedding.weight")


@dataclass(frozen=True)
class Personalization:
    """A parsed ``--personalize`` value."""

    mode: str = "none"
    finetune_steps: int = 0  # finetune:K
    local_tokens: int | None = None  # local-prefix:L (None: half of the virtual tokens)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def keeps_private(self) -> bool:
        """Whether clients keep private tensors between rounds (all modes but finetune)."""
        return self.mode in ("head", "lora-b-local", "dual-lora", "local-prefix", "local")

    def is_private(self, name: str) -> bool:
        """Whether the whole trainable tensor ``name`` stays with its client (local-prefix: see :meth:`split`)."""
        parts = name.split(".")
        if self.mode == "local":
            return True
        if self.mode == "head":
            return any(part in HEAD_MODULES for part in parts)
        if self.mode == "lora-b-local":
            return "lora_B" in parts
        if self.mode == "dual-lora":
            return PERSONAL_ADAPTER in parts
        return False

    def private_rows(self, rows: int) -> int:
        """local-prefix: how many of a virtual-token table's ``rows`` (its last ones) are private."""
        return self.local_tokens if self.local_tokens is not None else rows // 2

    def split(self, state: State) -> tuple[State, State]:
        """(shared, private) parts of ``state``: whole tensors by name, or (local-prefix) a virtual-token table's
        first rows shared and its last rows private, under the same name."""
        shared: State = {}
        private: State = {}
        for name, tensor in state.items():
            if self.mode == "local-prefix" and is_virtual_token_table(name):
                cut = tensor.shape[0] - self.private_rows(tensor.shape[0])
                shared[name], private[name] = tensor[:cut], tensor[cut:].clone()  # kept: not a view of it all
            elif self.is_private(name):
                private[name] = tensor
            else:
                shared[name] = tensor
        return shared, private

    def merge(self, shared: State, private: State) -> State:
        """Inverse of :meth:`split`: every trainable tensor of a client's own model."""
        if self.mode != "local-prefix":
            return {**private, **shared}
        return {name: torch.cat([tensor, private[name]]) if name in private else tensor
                for name, tensor in shared.items()}

    def check(self, state: State, method: str) -> None:
        """A clear error when this mode leaves nothing private, or nothing shared, of ``method``'s tensors."""
        if not self.keeps_private:
            return
        shared, private = self.split(state)
        if not private:
            wanted = {"head": "a task head (a module named classifier, score, head or fc)",
                      "lora-b-local": "LoRA B matrices (--method lora)", "dual-lora": "a LoRA adapter (--method lora)",
                      "local-prefix": "virtual tokens (--method prefix or prompt)"}[self.mode]
            raise ConfigError(f"{WHERE}: {self.mode} keeps part of {wanted} private, but --method {method} trains none")
        tables = [t for n, t in state.items() if is_virtual_token_table(n)]
        if self.mode == "local-prefix" and any(not 0 < self.private_rows(t.shape[0]) < t.shape[0] for t in tables):
            raise ConfigError(f"{WHERE}: local-prefix:{self.local_tokens} private virtual tokens out of "
                              f"{tables[0].shape[0]}; expected 1 .. {tables[0].shape[0] - 1} (some must be shared)")
        if self.mode != "local" and not any(t.numel() for t in shared.values()):
            raise ConfigError(f"{WHERE}: {self.mode} would keep every tensor --method {method} trains private; "
                              f"nothing would be federated")


def parse_personalize(text: str) -> Personalization:
    """See :data:`EXPECTED`."""
    value = str(text).strip()
    if value in ("none", "head", "lora-b-local", "dual-lora", "local-prefix", "local"):
        return Personalization(value)
    mode, _, number = value.partition(":")
    if mode in ("finetune", "local-prefix") and number.isdigit() and int(number) >= 1:
        return Personalization("finetune", finetune_steps=int(number)) if mode == "finetune" \
            else Personalization("local-prefix", local_tokens=int(number))
    raise ConfigError(f"{WHERE}: {text!r}; expected {EXPECTED}")


def add_personal_lora(model: Any) -> Any:
    """dual-lora: a second LoRA adapter beside the method's (same rank, targets and scaling; B = 0, so the model is
    unchanged until it trains), active together with it on every LoRA layer. The task head stays the global
    adapter's (PEFT keeps one active head copy)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel) or not any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ConfigError(f"{WHERE}: dual-lora adds a private LoRA adapter beside the global one; it needs "
                          f"--method lora")
    model.add_adapter(PERSONAL_ADAPTER, copy.deepcopy(model.peft_config[model.active_adapter]))
    return _both_adapters_on(model)


def _both_adapters_on(model: Any) -> Any:
    """The global and the personal adapter active together in every LoRA layer (PEFT's model-level set_adapter
    takes one adapter where a classifier head is wrapped too); it also marks both trainable."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([model.active_adapter, PERSONAL_ADAPTER])
    return model


def load_personal(model: Any, folder: str | Path) -> Any:
    """A dual-lora client's own model from its saved folder ``clients/<id>/adapter``: ``model`` is the PEFT model
    with the global adapter loaded from ``folder``; this adds ``folder/personal`` and switches both on (loading the
    personal adapter alone leaves it off, and the model answers as the global one)."""
    model.load_adapter(str(Path(folder) / PERSONAL_ADAPTER), adapter_name=PERSONAL_ADAPTER)
    return _both_adapters_on(model)
