"""LoRA (Hu et al., 2021): low-rank updates on attention projections, via PEFT.

Federated as in FedPETuning (Zhang et al., ACL 2023): only the LoRA factors and the task head
are trained, uploaded and averaged.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.errors import ConfigError
from fedcustom.methods.base import Method, peft_task_type, register, table_defaults
from fedcustom.methods.lora_capacity import freeze_a


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """PEFT LoRA model; the target modules are ``lora_targets`` when set, else the task's (images: the convolution
    and linear layers, see fedcustom.vision), else PEFT's defaults for the architecture."""
    from fedcustom.tasks import get_task

    defaults = get_task(task).lora_defaults(backbone)
    if cfg.lora_targets:
        defaults["target_modules"] = list(cfg.lora_targets)
    config = LoraConfig(
        task_type=peft_task_type(task),
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        **{"target_modules": None, **defaults},
    )
    try:
        model = get_peft_model(backbone, config)
    except NoMatchingPeftModuleError:
        raise ConfigError(f"method.lora_targets (--lora-targets) {', '.join(cfg.lora_targets or ())}: no module of "
                          f"the model has that name; its linear layers are named {', '.join(linear_names(backbone))}"
                          ) from None
    if cfg.lora_aggregation == "ffa":
        freeze_a(model)
    return model


def linear_names(model: nn.Module, most: int = 12) -> list[str]:
    """The distinct last names of the model's linear layers (what ``--lora-targets`` matches), at most ``most``."""
    names = dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, nn.Linear) and name)
    return [*list(names)[:most], *(["..."] if len(names) > most else [])]


METHOD = register(Method("lora", build, table_defaults("lora"), description="low-rank adapters + head"))
