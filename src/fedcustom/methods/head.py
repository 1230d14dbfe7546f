"""Head-only training (linear probing; FedPer's shared part inverted): the backbone stays frozen and only the task
head trains and travels, the cheapest method on the wire and on the client."""

from __future__ import annotations

from torch import nn

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, register, table_defaults


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: object) -> nn.Module:
    """The backbone with every parameter frozen except the task head's."""
    from fedcustom.tasks import get_task

    head = tuple(get_task(task).head_modules(backbone))
    for name, param in backbone.named_parameters():
        param.requires_grad_(name.split(".")[0] in head)
    return backbone


METHOD = register(Method("head", build, table_defaults("head"), description="task head only, backbone frozen"))
