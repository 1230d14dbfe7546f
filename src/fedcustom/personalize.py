"""Personalization (``--personalize``): which trainable tensors stay with their client, and how a client's own
model is scored.

- ``head``: the task head stays private (FedPer, Arivazhagan et al. 2019); the rest is averaged.
- ``lora-b-local``: LoRA's A matrices are shared, its B matrices stay private (FedSA-LoRA, Guo et al. 2024).
- ``finetune:K``: everything is shared; a client's own model is the global one after K local steps on its rows.

Private tensors never leave their client: the server's global state holds only the shared names, uploads carry
only those, and each client keeps its private tensors (starting from the pretrained model's) between rounds, in
checkpoints, and in the node's state on Flower. ``personal`` scores in the round log are each client's own model on
its held-out rows (``--client-eval-fraction``, 0.2 by default when personalizing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcustom.errors import ConfigError

State = dict[str, torch.Tensor]
MODES = ("none", "head", "lora-b-local", "finetune")
HEAD_MODULES = frozenset({"classifier", "score", "head", "fc"})  # as fedcustom.vision.head_names looks for
DEFAULT_CLIENT_EVAL_FRACTION = 0.2  # each client's held-out share when personalizing and none is given
WHERE = "federation.personalize (--personalize)"


@dataclass(frozen=True)
class Personalization:
    """A parsed ``--personalize`` value."""

    mode: str = "none"
    finetune_steps: int = 0  # finetune:K

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def keeps_private(self) -> bool:
        """Whether clients keep private tensors between rounds (head, lora-b-local)."""
        return self.mode in ("head", "lora-b-local")

    def is_private(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` stays with its client."""
        parts = name.split(".")
        if self.mode == "head":
            return any(part in HEAD_MODULES for part in parts)
        if self.mode == "lora-b-local":
            return "lora_B" in parts
        return False

    def split(self, state: State) -> tuple[State, State]:
        """(shared, private) parts of ``state``."""
        shared = {k: v for k, v in state.items() if not self.is_private(k)}
        return shared, {k: v for k, v in state.items() if self.is_private(k)}

    def check(self, trainable: list[str], method: str) -> None:
        """A clear error when this mode leaves nothing private, or nothing shared, for ``method``'s tensors."""
        if not self.keeps_private:
            return
        private = [n for n in trainable if self.is_private(n)]
        if not private:
            wanted = "a task head (a module named classifier, score, head or fc)" if self.mode == "head" \
                else "LoRA B matrices (--method lora)"
            raise ConfigError(f"{WHERE}: {self.mode} keeps {wanted} private, but --method {method} trains none")
        if len(private) == len(trainable):
            raise ConfigError(f"{WHERE}: {self.mode} would keep every tensor --method {method} trains private; "
                              f"nothing would be federated")


def parse_personalize(text: str) -> Personalization:
    """``none``, ``head``, ``lora-b-local`` or ``finetune:K`` (K >= 1 local steps)."""
    value = str(text).strip()
    if value in ("none", "head", "lora-b-local"):
        return Personalization(value)
    if value.startswith("finetune:"):
        steps = value.split(":", 1)[1]
        if steps.isdigit() and int(steps) >= 1:
            return Personalization("finetune", int(steps))
    raise ConfigError(f"{WHERE}: {text!r}; expected none, head, lora-b-local or finetune:K (K >= 1 local steps on "
                      f"the client's rows before its evaluation)")
