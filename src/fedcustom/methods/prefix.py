"""Federated prefix tuning (arXiv 2601.00526; prefix tuning from Li & Liang, 2021), via PEFT.

Each client keeps the backbone frozen and trains per-layer key/value prefix vectors (optionally
produced by a reparameterization MLP); only the prefixes and the task head are uploaded and
averaged.
"""

from __future__ import annotations

from peft import PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, peft_task_type, register, table_defaults
from fedcustom.methods.soft_init import init_token_ids, initialise_prefix


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """PEFT prefix-tuning model: ``num_virtual_tokens`` key/value prefixes in every layer, initialised from the
    backbone's own key/values of real tokens (``cfg.prefix_init``; see :mod:`fedcustom.methods.soft_init`)."""
    hidden = backbone.config.hidden_size
    config = PrefixTuningConfig(
        task_type=peft_task_type(task),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.projection_hidden or hidden,
    )
    spec = "random" if cfg.prefix_projection and cfg.prefix_init == "task" else cfg.prefix_init
    ids = init_token_ids(spec, tokenizer, cfg.num_virtual_tokens, backbone, task)
    model = get_peft_model(backbone, config)
    if ids is not None:
        initialise_prefix(model, ids)
    return model


METHOD = register(Method("prefix", build, table_defaults("prefix"), description="per-layer key/value prefixes + head"))
