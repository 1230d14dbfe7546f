"""The unlabelled public set of knowledge distillation (KD-FedLLM): texts every party can see.

By default it is carved from training rows that no client owns (so it is disjoint from every
private set), with labels dropped; or it comes from another corpus. Only texts leave this module:
each party tokenizes them with its own tokenizer, which is what lets client backbones differ.
"""

from __future__ import annotations

import numpy as np

from fedcustom.data.sources import LabeledData, _text_series, read_frame
from fedcustom.errors import ConfigError, FedCustomError


def carve_public(spare: LabeledData, size: int, seed: int, used: int) -> list[str]:
    """``size`` texts drawn at random from training rows outside the ``used`` the clients own."""
    if size > len(spare):
        raise ConfigError(
            f"method.public_size (--public-size) {size}: the training set has only {len(spare)} rows outside the "
            f"{used} the clients use; lower --public-size or --max-train-examples, or give --public-dataset"
        )
    rows = np.random.default_rng(seed).choice(len(spare), size=size, replace=False)
    return [spare.dataset[int(i)]["text"] for i in sorted(rows)]


def load_public(source: str, size: int, seed: int, text_column: str | None = None) -> list[str]:
    """Up to ``size`` texts of another corpus (any --dataset form; labels, if any, are ignored)."""
    frame, _ = read_frame(source)
    texts = [t for t in _text_series(frame, text_column, source).tolist() if t.strip()]
    if not texts:
        raise FedCustomError(f"public dataset {source}: no rows with text; the public set must not be empty")
    if len(texts) > size:
        rows = np.random.default_rng(seed).choice(len(texts), size=size, replace=False)
        texts = [texts[int(i)] for i in sorted(rows)]
    return texts
