"""FedLLM, the parameter-sharing protocol: the server sends the global trainable tensors (``train``), each
sampled client trains them on its rows and sends its update back; a strategy (and optionally a server optimizer,
DP, secure aggregation) merges them. :mod:`.server` and :mod:`.client` are the two sides, :mod:`.plugin` builds
them from a run's parts."""
