"""Split-FedLLM (arXiv 2501.04436): the model is cut in two, clients run the bottom, the server the top.

Only the cut itself is here so far (:mod:`fedcustom.methods.split.cut`); the per-batch
activation/gradient protocol over the runtime, SplitFed averaging of the client halves and the
``--method split`` registration are still to come (see the issue "KD-FedLLM and Split-FedLLM").
"""

from fedcustom.methods.split.cut import SplitEncoder, cut_encoder

__all__ = ["SplitEncoder", "cut_encoder"]
