"""Client side of a round: decode the global state, train on private data, send back the update.

One ``TrainingClient`` serves every simulated client: they share one backbone in memory, and
what differs per client is only its data (and, for one round, the trainable tensors it loads).
"""

from __future__ import annotations

import time

import datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.codecs import Codec, Link, uses_delta
from fedcustom.methods import load_trainable_state, trainable_state
from fedcustom.runtime import Message, Reply
from fedcustom.training import LocalSchedule, derive_seed, train_local

TRAIN = "train"


class CodecOutOfSync(Exception):
    """The server's difference is against a state this client does not hold; the server resets the link."""


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
        client_tables: dict[int, datasets.Dataset], codec_down: Codec | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec  # client to server
        self.codec_down = codec_down or codec  # server to client
        self.client_tables = client_tables
        # Each node's own ends of its links (in a deployment a client holds just its own two).
        self.links_down: dict[int, Link] = {}
        self.links_up: dict[int, Link] = {}

    def __call__(self, node_id: int, message: Message) -> Reply:
        if message.kind != TRAIN:
            return Reply(error=f"unknown message kind {message.kind!r}; this client handles {TRAIN!r}")
        return self.train(node_id, message)

    def _receive(self, node_id: int, message: Message) -> dict:
        """Decode the global state; a difference is applied to this node's last reconstruction."""
        if not uses_delta(self.codec_down):
            return self.codec_down.decode(message.payload)
        base = int(message.config.get("codec_base", 0))
        link = self.links_down.get(node_id) if base else None
        if base and (link is None or link.round != base):
            raise CodecOutOfSync(f"the server sent a difference against round {base}, this client holds round "
                                 f"{link.round if link else 0}")
        link = self.links_down[node_id] = link or Link()
        state = self.codec_down.decode(message.payload, link)
        link.round = message.round
        return state

    def train(self, node_id: int, message: Message) -> Reply:
        """Load the global tensors, run the local schedule, reply with the trained tensors."""
        start = time.perf_counter()
        received = self._receive(node_id, message)
        load_trainable_state(self.model, received)
        schedule = schedule_from_config(message.config)
        seed = derive_seed(int(message.config["seed"]), message.round, node_id)
        table = self.client_tables[node_id]
        result = train_local(self.model, table, self.tokenizer, schedule, seed)
        up = self.links_up.setdefault(node_id, Link())
        up.reference = received if uses_delta(self.codec) else None  # the difference starts where we started
        payload = self.codec.encode(trainable_state(self.model), up)
        metrics = {
            "train_loss": result.mean_loss, "examples_seen": float(result.examples_seen),
            "steps": float(result.steps), "flops": float(result.flops), "train_seconds": time.perf_counter() - start,
        }
        return Reply(payload=payload, num_examples=len(table), metrics=metrics)
