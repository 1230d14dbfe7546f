"""Full fine-tuning: every weight trains and travels (FedAvg as in McMahan et al., 2017).

The baseline the paper compares against (arXiv 2601.00526, Table "full FT"): best accuracy,
largest payload, highest client compute.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, register, table_defaults


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The backbone itself with all parameters trainable."""
    for param in backbone.parameters():
        param.requires_grad_(True)
    return backbone


METHOD = register(Method("full", build, table_defaults("full"), description="all weights"))
