"""Split-FedLLM (arXiv 2501.04436): the model is cut in two, clients run the bottom, the server the top.

:mod:`~fedcustom.methods.split.cut` cuts the model; :mod:`~fedcustom.methods.split.protocol` runs
SplitFed rounds over the runtime. Not yet done: the ``--method split`` registration in the runner
and CLI (round log, summary, FLOPs per side), LoRA/prefix on the client half, the U-shaped variant
and the bench preset (see the issue "KD-FedLLM and Split-FedLLM").
"""

from fedcustom.methods.split.cut import SplitEncoder, cut_encoder
from fedcustom.methods.split.protocol import SplitClient, SplitServer

__all__ = ["SplitClient", "SplitEncoder", "SplitServer", "cut_encoder"]
