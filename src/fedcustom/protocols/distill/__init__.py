"""KD-FedLLM's protocol (arXiv 2501.04436): clients share knowledge as soft labels on a public set, not
parameters. :mod:`.knowledge` holds the tensor math (encode, validate, aggregate, distill), :mod:`.public_set`
what is labelled (texts, or response tokens of a causal LM), :mod:`.protocol` the rounds, and :mod:`.plugin` builds
them from a run's parts. The models are built by :mod:`fedcustom.methods.distill` (``method.local_method``)."""
