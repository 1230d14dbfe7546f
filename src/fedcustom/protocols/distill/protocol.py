"""KD-FedLLM rounds over the runtime's send/receive primitive (arXiv 2501.04436; FedMD/FedDF-style).

    server --distill_round(global knowledge, schedule)--> sampled clients
    client: start from its own model (logits mode: first distill the global soft labels into it;
            adapter mode: load the global trainable tensors), train on its private rows, then label
            the public set --logits or top-k soft labels--> server
    server: validate, average the soft labels, distill them into the global model, evaluate;
            next round's broadcast is the global model's soft labels (logits) or its tensors (adapter)

Clients' models stay on the clients between rounds (logits mode), so they may be a different
backbone from the server's: only soft labels on shared texts cross the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.codecs import Codec
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.methods.base import load_trainable_state, trainable_state
from fedcustom.wire import schedule_from_config, schedule_to_config
from fedcustom.protocols.distill.knowledge import (
    aggregate_soft_labels, decode_knowledge, encode_knowledge,
)
from fedcustom.protocols.distill.public_set import knowledge_classes, public_set
from fedcustom.rounds import RoundResult, check_reply, sample_clients
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.training import LocalSchedule, derive_seed, train_local

log = logging.getLogger(__name__)

DISTILL = "distill_round"
DIGEST_EPOCHS = 1  # passes a client makes over the global soft labels before its local training (logits mode)
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KDSettings:
    """What both sides agree on: the public set, the label space and how knowledge is encoded."""

    public: list  # texts (classification) or [prompt, response] pairs (causal LM)
    label_names: list[str]
    max_length: int
    temperature: float
    topk: int | None
    broadcast: str  # "logits" or "adapter"
    weighting: str  # "uniform", "examples" or "confidence"
    distill_epochs: int
    task: str = "classification"  # causal-lm: knowledge is the next-token distribution on each public response token

    @property
    def over_vocabulary(self) -> bool:
        """Knowledge is a distribution over the vocabulary per public response token (renormalized top-k)."""
        from fedcustom.tasks import get_task

        return get_task(self.task).knowledge_over_vocabulary


class DistillClient:
    """Handles ``distill_round`` for any node id; keeps each node's own model state between rounds."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, codec: Codec,
                 client_tables: dict[int, datasets.Dataset], settings: KDSettings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.client_tables = client_tables
        self.settings = settings
        self.public = public_set(settings.public, settings.task, tokenizer, settings.max_length)
        self.classes = knowledge_classes(model, settings)
        self.initial = trainable_state(model)
        self.local_states: dict[int, State] = {}

    def state_dict(self) -> tuple[State, dict]:
        """Each node's own model state, kept between rounds (a Flower node keeps it in its context)."""
        tensors = {f"{node}/{name}": value for node, state in self.local_states.items() for name, value in state.items()}
        return tensors, {"nodes": sorted(self.local_states)}

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.local_states = {int(node): {name.split("/", 1)[1]: value for name, value in tensors.items()
                                         if name.split("/", 1)[0] == str(node)} for node in meta["nodes"]}

    def __call__(self, node_id: int, message: Message) -> Reply:
        if message.kind != DISTILL:
            return Reply(error=f"unknown message kind {message.kind!r}; this client handles {DISTILL!r}")
        ours, theirs = ",".join(self.settings.label_names), str(message.config.get("labels", ""))
        if ours != theirs:
            return Reply(error=f"label space mismatch: this client's model predicts [{ours}], the server's [{theirs}]")
        return self.train(node_id, message)

    def train(self, node_id: int, message: Message) -> Reply:
        """Take in the global knowledge, train on private rows, label the public set."""
        start, s = time.perf_counter(), self.settings
        schedule = schedule_from_config(message.config)
        seed = derive_seed(int(message.config["seed"]), message.round, node_id)
        state = self.local_states.get(node_id, self.initial)
        received = self.codec.decode(message.payload) if message.payload else None
        if received is not None and message.config["broadcast"] == "adapter":
            state = received
        load_trainable_state(self.model, state)
        digest_flops = 0
        if received is not None and message.config["broadcast"] == "logits":
            expected = (self.public.rows, self.classes)
            try:  # dense soft labels (classification), or top-k ones over a vocabulary (causal LM)
                targets = received["soft_labels"] if "soft_labels" in received else \
                    decode_knowledge(received, *expected, s.temperature, renormalize=s.over_vocabulary)
            except UpdateRejected as exc:
                return Reply(error=f"global knowledge: {exc}")
            if tuple(targets.shape) != expected:
                return Reply(error=f"soft_labels of shape {tuple(targets.shape)}, expected {expected}")
            _, digest_flops = self.public.distill(self.model, targets, schedule.lr, schedule.batch_size, DIGEST_EPOCHS,
                                                  s.temperature, seed, schedule.count_flops)
        result = train_local(self.model, self.client_tables[node_id], self.tokenizer, schedule, seed)
        logits, label_flops = self.public.logits(self.model, 2 * schedule.batch_size, schedule.count_flops)
        self.local_states[node_id] = trainable_state(self.model)
        payload = self.codec.encode(encode_knowledge(logits, s.topk, s.temperature))
        metrics = {
            "train_loss": result.mean_loss, "examples_seen": float(result.examples_seen),
            "flops": float(result.flops + digest_flops + label_flops), "train_seconds": time.perf_counter() - start,
        }
        return Reply(payload=payload, num_examples=len(self.client_tables[node_id]), metrics=metrics)


class DistillServer:
    """Holds the global model's state and the knowledge it broadcasts; runs one KD round at a time."""

    def __init__(self, runtime: Runtime, model: nn.Module, tokenizer: PreTrainedTokenizerBase, codec: Codec,
                 settings: KDSettings, schedule: LocalSchedule, clients_per_round: int, seed: int,
                 evaluate: Callable[[], dict[str, float]]) -> None:
        self.runtime = runtime
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.settings = settings
        self.public = public_set(settings.public, settings.task, tokenizer, settings.max_length)
        self.classes = knowledge_classes(model, settings)
        self.schedule = schedule
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.evaluate = evaluate
        self._global = trainable_state(model)
        self.last_targets: torch.Tensor | None = None  # the aggregated soft labels of the last round
        self.broadcast = b"" if settings.broadcast == "logits" else codec.encode(self._global)

    @property
    def global_state(self) -> State:
        return {k: v.clone() for k, v in self._global.items()}

    def state_dict(self) -> tuple[State, dict]:
        """The global tensors, the next broadcast and the last aggregated soft labels (for checkpoints)."""
        tensors = {f"global/{k}": v for k, v in self._global.items()}
        tensors["broadcast"] = torch.frombuffer(bytearray(self.broadcast), dtype=torch.uint8) if self.broadcast \
            else torch.zeros(0, dtype=torch.uint8)
        if self.last_targets is not None:
            tensors["last_targets"] = self.last_targets
        return tensors, {}

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self._global = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("global/")}
        self.broadcast = tensors["broadcast"].numpy().tobytes()
        self.last_targets = tensors.get("last_targets")

    def evaluate_initial(self) -> RoundResult:
        load_trainable_state(self.model, self._global)
        return RoundResult(round=0, eval=self.evaluate())

    def run_round(self, rnd: int, on_reply: Callable[[int], None] | None = None) -> RoundResult:
        """Broadcast, collect soft labels, distill their average into the global model, evaluate."""
        start, s = time.perf_counter(), self.settings
        chosen = sample_clients(self.runtime.nodes(), self.clients_per_round, self.seed, rnd)
        config = {**schedule_to_config(self.schedule, self.seed, rnd), "labels": ",".join(s.label_names),
                  "broadcast": s.broadcast}
        replies = self.runtime.send_and_receive(
            {node: Message(DISTILL, rnd, self.broadcast, config) for node in chosen}, on_reply)
        result = RoundResult(round=rnd, eval={}, clients=chosen, bytes_down={n: len(self.broadcast) for n in chosen})
        accepted = self._accept(replies, result)
        load_trainable_state(self.model, self._global)
        if accepted:
            self.last_targets = aggregate_soft_labels([soft for _, soft, _ in accepted],
                                                      [n for _, _, n in accepted], s.weighting)
            flops = self._distill(rnd, self.last_targets)
            result.server_flops = {node: flops // len(accepted) for node, _, _ in accepted}
        else:
            log.warning("round %d: no valid knowledge; the global model is unchanged", rnd)
        result.eval = self.evaluate()
        result.wall_seconds = time.perf_counter() - start
        return result

    def _distill(self, rnd: int, targets: torch.Tensor) -> int:
        """Distill ``targets`` into the global model and prepare the next broadcast; returns server FLOPs."""
        s, sched = self.settings, self.schedule
        seed = derive_seed(self.seed, rnd, 0xD15)
        loss, flops = self.public.distill(self.model, targets, sched.lr, sched.batch_size, s.distill_epochs,
                                          s.temperature, seed, sched.count_flops)
        log.info("round %d: server distillation loss %.4f", rnd, loss)
        self._global = trainable_state(self.model)
        if s.broadcast == "adapter":
            self.broadcast = self.codec.encode(self._global)
            return flops
        logits, label_flops = self.public.logits(self.model, 2 * sched.batch_size, sched.count_flops)
        if s.over_vocabulary:  # a vocabulary per response token: the top-k soft labels only
            self.broadcast = self.codec.encode(encode_knowledge(logits, s.topk, s.temperature))
        else:
            self.broadcast = self.codec.encode({"soft_labels": torch.softmax(logits / s.temperature, dim=-1)})
        return flops + label_flops

    def _accept(self, replies: dict[int, Reply], result: RoundResult) -> list[tuple[int, torch.Tensor, int]]:
        """(node, soft labels, examples) of each valid reply; rejections are logged and recorded."""
        s, accepted, losses = self.settings, [], []
        for node in sorted(set(result.clients) - replies.keys()):
            result.rejected[node] = "no reply"
        for node, reply in sorted(replies.items()):
            result.bytes_up[node] = len(reply.payload)
            try:
                check_reply(reply)
                soft = decode_knowledge(self.codec.decode(reply.payload), self.public.rows, self.classes,
                                        s.temperature, renormalize=s.over_vocabulary)
            except (PayloadError, UpdateRejected) as exc:
                log.warning("round %d: rejected knowledge from client %d: %s", result.round, node, exc)
                result.rejected[node] = str(exc)
                continue
            accepted.append((node, soft, reply.num_examples))
            losses.append((reply.metrics.get("train_loss", np.nan), reply.num_examples))
            result.client_flops[node] = int(reply.metrics.get("flops", 0))
            result.examples_seen += int(reply.metrics.get("examples_seen", 0))
        if losses:
            result.train_loss = float(np.average([l for l, _ in losses], weights=[n for _, n in losses]))
        return accepted
