"""KD-FedLLM (arXiv 2501.04436): clients share knowledge as soft labels on a public set, not parameters.

:mod:`~fedcustom.protocols.distill.knowledge` holds the tensor math (encode, validate, aggregate,
distill), :mod:`~fedcustom.protocols.distill.protocol` the rounds, and
:mod:`~fedcustom.protocols.distill.plugin` wires them from a run config. The global model and each
client's model are trained with ``method.local_method`` (full, LoRA, prompt or prefix tuning); the
clients' backbone may differ from the server's (``method.client_model``).
"""

import dataclasses

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, get_method, register
from fedcustom.methods.defaults import Recommended


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The global (and each client's) model: ``cfg.local_method`` applied to the backbone."""
    return get_method(cfg.local_method).build(backbone, cfg, task, tokenizer)


def recommended(cfg: MethodConfig, task: str) -> Recommended:
    """The local method's settings (its rate serves local training and distillation alike), one local epoch."""
    return dataclasses.replace(get_method(cfg.local_method).recommended(cfg, task), local_epochs=1)


METHOD = register(Method("distill", build, recommended, protocol="distill",
                         description="KD-FedLLM: soft labels on a public set, distilled into the global model"))
