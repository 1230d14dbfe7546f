"""SplitFed rounds over the runtime's one send/receive primitive (arXiv 2501.04436, Split-FedLLM).

Per round, for each sampled client in turn (SplitFed-V2: the server half trains on one client's
batches after another):

    server --split_begin(client-half global state, schedule)--> client   loads it, builds its batches
    loop:  server --split_forward--> client   runs embeddings + layers [0, K) on its next batch
           client --activations, mask, labels--> server   server half: forward, loss, backward, step
           server --split_backward(grad at the cut)--> client   back-propagates, steps its optimizer
    server --split_end--> client   replies with its trained client half

and the client halves are merged with the strategy (FedAvg). U-shaped (head on the client), the
labels stay on the client and each batch takes one more exchange: the server sends its last hidden
states (``split_head``) and the client returns the gradient of its loss with respect to them. Every exchange is one Message/Reply,
so the same protocol will run on Flower; bytes are the real encoded payloads in both directions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedTokenizerBase

from fedcustom.client import schedule_from_config, schedule_to_config
from fedcustom.codecs import Codec
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.methods.split.cut import SplitModel
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.training import LocalSchedule, derive_seed, local_batches
from fedcustom.validation import validate_update

log = logging.getLogger(__name__)

BEGIN, FORWARD, HEAD, BACKWARD, END = "split_begin", "split_forward", "split_head", "split_backward", "split_end"
State = dict[str, torch.Tensor]


def _snapshot(params: dict[str, torch.nn.Parameter]) -> State:
    return {k: v.detach().clone() for k, v in params.items()}


def client_half_state(split: SplitModel) -> State:
    """The client half's weights (embeddings and layers [0, K)), detached copies."""
    return _snapshot(split.client_parameters())


def _copy_into(params: dict[str, torch.nn.Parameter], state: State) -> None:
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@dataclass
class _Session:
    """One client's in-flight round: its optimizer, remaining batches and the graph awaiting a gradient."""

    optimizer: torch.optim.Optimizer
    batches: Iterator[dict]
    num_examples: int
    activations: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # U-shaped: the pending batch's labels, kept on the client
    mask: torch.Tensor | None = None  # U-shaped: its attention mask (a decoder's head reads the last real token)
    flops: int = 0  # client-half forward + backward FLOPs so far this round


class SplitClient:
    """Handles the four split message kinds for any node id, using that node's own rows."""

    def __init__(self, split: SplitModel, tokenizer: PreTrainedTokenizerBase, codec: Codec,
                 client_tables: dict[int, datasets.Dataset]) -> None:
        self.split = split
        self.tokenizer = tokenizer
        self.codec = codec
        self.client_tables = client_tables
        self.sessions: dict[int, _Session] = {}

    def __call__(self, node_id: int, message: Message) -> Reply:
        handlers = {BEGIN: self.begin, FORWARD: self.forward, HEAD: self.head, BACKWARD: self.backward, END: self.end}
        if message.kind not in handlers:
            return Reply(error=f"unknown message kind {message.kind!r}; this client handles {', '.join(handlers)}")
        if message.kind != BEGIN and node_id not in self.sessions:
            return Reply(error=f"{message.kind} before {BEGIN} for client {node_id}")
        return handlers[message.kind](node_id, message)

    def begin(self, node_id: int, message: Message) -> Reply:
        params = self.split.client_parameters()
        _copy_into(params, self.codec.decode(message.payload))
        schedule = schedule_from_config(message.config)
        seed = derive_seed(int(message.config["seed"]), message.round, node_id)
        table = self.client_tables[node_id]
        self.split.model.train()
        self.sessions[node_id] = _Session(
            optimizer=torch.optim.AdamW(params.values(), lr=schedule.lr, weight_decay=schedule.weight_decay),
            batches=local_batches(table, self.tokenizer, schedule, seed), num_examples=len(table),
        )
        torch.manual_seed(seed)
        return Reply(num_examples=len(table))

    def forward(self, node_id: int, message: Message) -> Reply:
        session = self.sessions[node_id]
        batch = next(session.batches, None)
        if batch is None:
            return Reply(metrics={"done": 1.0})
        with FlopCounterMode(display=False) as counter:
            session.activations = self.split.client_forward(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (batch, seq, hidden)
        session.flops += counter.get_total_flops()
        wire = {"activations": session.activations.detach(), "attention_mask": batch["attention_mask"]}
        if self.split.head_on_client:
            session.labels, session.mask = batch["labels"], batch["attention_mask"]  # U-shaped: labels stay here
        else:
            wire["labels"] = batch["labels"]
        return Reply(payload=self.codec.encode(wire), num_examples=len(batch["labels"]), metrics={"done": 0.0})

    def head(self, node_id: int, message: Message) -> Reply:
        """U-shaped: the loss on the server's last hidden states, and its gradient for the server."""
        session = self.sessions[node_id]
        hidden = self.codec.decode(message.payload)["hidden"]  # (batch, seq, hidden)
        if session.labels is None or len(hidden) != len(session.labels):
            return Reply(error=f"hidden states for {len(hidden)} rows do not match the pending batch")
        with FlopCounterMode(display=False) as counter:
            loss, grad = self.split.head_step(hidden, session.mask, session.labels)
        session.flops += counter.get_total_flops()
        return Reply(payload=self.codec.encode({"grad": grad}), metrics={"loss": float(loss)})

    def backward(self, node_id: int, message: Message) -> Reply:
        session = self.sessions[node_id]
        grad = self.codec.decode(message.payload)["grad"]
        if session.activations is None or grad.shape != session.activations.shape:
            return Reply(error=f"gradient of shape {tuple(grad.shape)} does not match the pending activations")
        with FlopCounterMode(display=False) as counter:
            session.activations.backward(grad)
        session.flops += counter.get_total_flops()
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)
        session.activations = None
        return Reply()

    def end(self, node_id: int, message: Message) -> Reply:
        session = self.sessions.pop(node_id)
        return Reply(payload=self.codec.encode(client_half_state(self.split)), num_examples=session.num_examples,
                     metrics={"flops": float(session.flops)})


@dataclass
class SplitRoundResult:
    """Bytes per client in each direction, batches exchanged and the server's mean loss."""

    round: int
    clients: list[int]
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)
    client_flops: dict[int, int] = field(default_factory=dict)  # forward + backward of the client half
    server_flops: dict[int, int] = field(default_factory=dict)  # the server half's work on that client's batches
    examples_seen: int = 0
    train_loss: float | None = None
    rejected: dict[int, str] = field(default_factory=dict)


class SplitServer:
    """Holds the global client half, trains the server half, and runs one SplitFed round at a time."""

    def __init__(self, runtime: Runtime, split: SplitModel, strategy: Strategy, codec: Codec,
                 schedule: LocalSchedule, seed: int) -> None:
        self.runtime = runtime
        self.split = split
        self.strategy = strategy
        self.codec = codec
        self.schedule = schedule
        self.seed = seed
        self.global_client_half = client_half_state(split)
        # The server half lives in the (shared) model while a round runs; between rounds this copy is
        # the truth, so anything else that trains the model (the centralized baseline) cannot leak in.
        self.global_server_half = _snapshot(split.server_parameters())
        self.optimizer = torch.optim.AdamW(split.server_parameters().values(), lr=schedule.lr,
                                           weight_decay=schedule.weight_decay)

    def load_global(self) -> None:
        """Put the global model (merged client half, server half) into the model, e.g. to evaluate it."""
        _copy_into(self.split.client_parameters(), self.global_client_half)
        _copy_into(self.split.server_parameters(), self.global_server_half)

    def run_round(self, rnd: int, clients: list[int],
                  on_client_done: Callable[[int], None] | None = None) -> SplitRoundResult:
        """Train the server half on each client's batches in turn, then merge the client halves."""
        result = SplitRoundResult(round=rnd, clients=clients)
        _copy_into(self.split.server_parameters(), self.global_server_half)
        updates, losses = [], []
        for node in clients:
            try:
                updates.append(self._train_client(rnd, node, result, losses))
            except (PayloadError, UpdateRejected) as exc:
                log.warning("round %d: rejected client %d: %s", rnd, node, exc)
                result.rejected[node] = str(exc)
            if on_client_done:
                on_client_done(node)
        self.global_server_half = _snapshot(self.split.server_parameters())
        if updates:
            self.global_client_half = self.strategy.aggregate(self.global_client_half, updates)
        result.train_loss = float(np.mean(losses)) if losses else None
        return result

    def _count(self, node: int, result: SplitRoundResult, counter: FlopCounterMode) -> None:
        result.server_flops[node] = result.server_flops.get(node, 0) + counter.get_total_flops()

    def _server_step(self, rnd: int, node: int, wire: State, result: SplitRoundResult) -> tuple[float, torch.Tensor]:
        """Server half with the head: forward, loss, backward on the received activations."""
        with FlopCounterMode(display=False) as counter:
            step = self.split.server_step(wire["activations"], wire["attention_mask"], wire["labels"])
        self._count(node, result, counter)
        return float(step.loss), step.grad_at_cut

    def _u_shaped_step(self, rnd: int, node: int, wire: State, result: SplitRoundResult) -> tuple[float, torch.Tensor]:
        """U-shaped: the middle layers forward, the client's head computes the loss on its own labels and
        returns the gradient at the top, the middle layers backward to the cut."""
        with FlopCounterMode(display=False) as counter:
            received = wire["activations"].detach().requires_grad_(True)  # (batch, seq, hidden)
            top = self.split.middle_forward(received, wire["attention_mask"])  # (batch, seq, hidden)
        self._count(node, result, counter)
        head = self._exchange(node, Message(HEAD, rnd, self.codec.encode({"hidden": top.detach()})), result)
        grad_top = self.codec.decode(head.payload).get("grad")
        if grad_top is None or grad_top.shape != top.shape or not torch.isfinite(grad_top).all():
            raise UpdateRejected(f"head gradient: expected finite 'grad' of shape {tuple(top.shape)}")
        with FlopCounterMode(display=False) as counter:
            top.backward(grad_top)
        self._count(node, result, counter)
        return float(head.metrics["loss"]), received.grad

    def _exchange(self, node: int, message: Message, result: SplitRoundResult) -> Reply:
        reply = self.runtime.send_and_receive({node: message})[node]
        result.bytes_down[node] = result.bytes_down.get(node, 0) + len(message.payload)
        result.bytes_up[node] = result.bytes_up.get(node, 0) + len(reply.payload)
        if reply.error:
            raise UpdateRejected(f"client reported an error: {reply.error}")
        return reply

    def _train_client(self, rnd: int, node: int, result: SplitRoundResult, losses: list[float]) -> ClientUpdate:
        config = schedule_to_config(self.schedule, self.seed)
        begin = Message(BEGIN, rnd, self.codec.encode(self.global_client_half), config)
        self._exchange(node, begin, result)
        self.split.model.train()
        step = self._u_shaped_step if self.split.head_on_client else self._server_step
        while (reply := self._exchange(node, Message(FORWARD, rnd), result)).metrics.get("done") == 0.0:
            loss, grad_at_cut = step(rnd, node, self.codec.decode(reply.payload), result)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            result.batches[node] = result.batches.get(node, 0) + 1
            result.examples_seen += len(grad_at_cut)
            self._exchange(node, Message(BACKWARD, rnd, self.codec.encode({"grad": grad_at_cut})), result)
        end = self._exchange(node, Message(END, rnd), result)
        state = self.codec.decode(end.payload)
        validate_update(state, self.global_client_half)
        result.client_flops[node] = int(end.metrics.get("flops", 0))
        return ClientUpdate(node, state, end.num_examples)
