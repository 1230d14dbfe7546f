"""Soft prompt tuning (Lester et al., 2021): trainable virtual tokens before the input, via PEFT."""

from __future__ import annotations

from peft import PromptTuningConfig, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, peft_task_type, register, table_defaults
from fedcustom.methods.soft_init import init_token_ids, initialise_prompt


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """PEFT prompt-tuning model with ``num_virtual_tokens`` soft tokens, initialised from real token embeddings
    (``cfg.prompt_init``, as PEFT's TEXT initialisation; see :mod:`fedcustom.methods.soft_init`). On images: visual
    prompt tuning of a ViT-family backbone (``cfg.prompt_deep``: a prompt at every layer)."""
    from fedcustom.tasks import get_task

    if peft_task_type(task) is None:  # images (fedcustom.methods.visual_prompt)
        from fedcustom.methods.visual_prompt import VisualPrompts

        return VisualPrompts(backbone, cfg.num_virtual_tokens, cfg.prompt_deep, get_task(task).head_modules(backbone))
    ids = init_token_ids(cfg.prompt_init, tokenizer, cfg.num_virtual_tokens, backbone, task)
    config = PromptTuningConfig(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens)
    model = get_peft_model(backbone, config)
    if ids is not None:
        initialise_prompt(model, ids)
    return model


METHOD = register(Method("prompt", build, table_defaults("prompt"), description="soft input prompt + head (images: visual prompts)"))
