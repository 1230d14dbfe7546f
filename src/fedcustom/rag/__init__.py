"""Federated retrieval-augmented generation (the sixth customization technique of arXiv 2601.00526).

Each client keeps its own documents and a local vector index (:mod:`.index`); the server broadcasts a question
through the same ``Message``/``Reply`` runtime every protocol uses (embedded or a Flower Grid), each client
returns its top k (:mod:`.client`), the server merges them (:mod:`.merge`; optionally asking only the clients a
router picks, :mod:`.route`) and a causal LM answers with the merged passages in its prompt (:mod:`.answer`).
:mod:`.evaluate` measures retrieval recall, answer quality and bytes per question against one central index.

Flower's ``fedrag`` example is the anchor; unlike its merge (which overwrites the score of a document several
nodes return), ours deduplicates by content hash and either keeps the exact inner product (every index uses the
same encoder, so scores compare: the federated top k equals a central index's) or sums reciprocal ranks.
"""
