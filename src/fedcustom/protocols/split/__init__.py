"""Split-FedLLM's protocol (arXiv 2501.04436): per-batch exchanges of activations and gradients at the cut
(:mod:`.protocol`), the round driver the runner sees (:mod:`.driver`), built from a run's parts by :mod:`.plugin`.
The cut itself is a model transform: :mod:`fedcustom.methods.split`."""
