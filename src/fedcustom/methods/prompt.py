"""Soft prompt tuning (Lester et al., 2021): trainable virtual tokens before the input, via PEFT."""

from __future__ import annotations

from peft import PromptTuningConfig, get_peft_model
from torch import nn

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, peft_task_type, register


def build(backbone: nn.Module, cfg: MethodConfig, task: str) -> nn.Module:
    """PEFT prompt-tuning model with ``num_virtual_tokens`` randomly initialised soft tokens."""
    config = PromptTuningConfig(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens)
    return get_peft_model(backbone, config)


METHOD = register(Method("prompt", build, default_lr=lambda cfg: 3e-2, description="soft input prompt + head"))
