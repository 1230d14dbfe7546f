"""KD-FedLLM (arXiv 2501.04436): clients share knowledge as soft labels on a public set, not parameters.

:mod:`~fedcustom.methods.distill.knowledge` holds the tensor math (encode, validate, aggregate,
distill), :mod:`~fedcustom.methods.distill.protocol` the rounds, and
:mod:`~fedcustom.methods.distill.federated` wires them from a run config. The global model and each
client's model are trained with ``method.local_method`` (full, LoRA, prompt or prefix tuning); the
clients' backbone may differ from the server's (``method.client_model``).
"""

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, get_method, register


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The global (and each client's) model: ``cfg.local_method`` applied to the backbone."""
    return get_method(cfg.local_method).build(backbone, cfg, task, tokenizer)


def default_lr(cfg: MethodConfig) -> float:
    """The local method's rate, used for local training and for distillation alike."""
    return get_method(cfg.local_method).default_lr(cfg)


METHOD = register(Method("distill", build, default_lr, protocol="distill",
                         description="KD-FedLLM: soft labels on a public set, distilled into the global model"))
