"""Split-FedLLM (arXiv 2501.04436): the model is cut in two, clients run the bottom, the server the top.

:mod:`~fedcustom.methods.split.cut` cuts the model, :mod:`~fedcustom.methods.split.protocol` runs
SplitFed rounds over the runtime's send/receive primitive, :mod:`~fedcustom.methods.split.federated`
gives those rounds the server interface the runner drives. Not yet done: LoRA/prefix on the client
half, the U-shaped variant (head on the client), causal LMs, and the Flower runtime for it.
"""

from torch import nn

from fedcustom.config import MethodConfig
from fedcustom.methods.base import Method, register
from fedcustom.methods.split.cut import SplitEncoder, cut_encoder

__all__ = ["METHOD", "SplitEncoder", "cut_encoder"]


def build(backbone: nn.Module, cfg: MethodConfig, task: str) -> nn.Module:
    """Every weight trains (the client its half, the server the rest); the cut is checked here, early."""
    cut_encoder(backbone, cfg.cut_layer)
    for param in backbone.parameters():
        param.requires_grad_(True)
    return backbone


METHOD = register(Method("split", build, default_lr=lambda cfg: 1e-4, protocol="split",
                         description="Split-FedLLM: the client runs layers [0, K), the server the rest"))
