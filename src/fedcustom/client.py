"""Client side of a round: decode the global state, train on private data, send back the update.

One ``TrainingClient`` serves every simulated client: they share one backbone in memory, and
what differs per client is only its data (and, for one round, the trainable tensors it loads).
"""

from __future__ import annotations

import time

import datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.codecs import Codec
from fedcustom.methods import load_trainable_state, trainable_state
from fedcustom.runtime import Message, Reply
from fedcustom.training import LocalSchedule, derive_seed, train_local

TRAIN = "train"


def schedule_to_config(schedule: LocalSchedule, seed: int) -> dict[str, int | float | bool]:
    """The round settings the server puts in a train message's config."""
    config: dict[str, int | float | bool] = {
        "lr": schedule.lr, "batch_size": schedule.batch_size, "epochs": schedule.epochs,
        "weight_decay": schedule.weight_decay, "count_flops": schedule.count_flops, "seed": seed,
    }
    if schedule.steps is not None:
        config["steps"] = schedule.steps
    return config


def schedule_from_config(config: dict) -> LocalSchedule:
    """Inverse of :func:`schedule_to_config`."""
    return LocalSchedule(
        lr=float(config["lr"]), batch_size=int(config["batch_size"]), epochs=int(config["epochs"]),
        steps=int(config["steps"]) if "steps" in config else None,
        weight_decay=float(config["weight_decay"]), count_flops=bool(config["count_flops"]),
    )


class TrainingClient:
    """Handles ``train`` messages for any node id, using that node's own rows."""

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, codec: Codec,
        client_tables: dict[int, datasets.Dataset],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.client_tables = client_tables

    def __call__(self, node_id: int, message: Message) -> Reply:
        if message.kind != TRAIN:
            return Reply(error=f"unknown message kind {message.kind!r}; this client handles {TRAIN!r}")
        return self.train(node_id, message)

    def train(self, node_id: int, message: Message) -> Reply:
        """Load the global tensors, run the local schedule, reply with the trained tensors."""
        start = time.perf_counter()
        load_trainable_state(self.model, self.codec.decode(message.payload))
        schedule = schedule_from_config(message.config)
        seed = derive_seed(int(message.config["seed"]), message.round, node_id)
        table = self.client_tables[node_id]
        result = train_local(self.model, table, self.tokenizer, schedule, seed)
        payload = self.codec.encode(trainable_state(self.model))
        metrics = {
            "train_loss": result.mean_loss, "examples_seen": float(result.examples_seen),
            "steps": float(result.steps), "flops": float(result.flops), "train_seconds": time.perf_counter() - start,
        }
        return Reply(payload=payload, num_examples=len(table), metrics=metrics)
