"""SplitFed rounds over the runtime's one send/receive primitive (arXiv 2501.04436, Split-FedLLM).

Per round, for each sampled client in turn (SplitFed-V2: the server half trains on one client's
batches after another):

    server --split_begin(client-half global state, schedule)--> client   loads it, builds its batches,
           client --activations, mask, labels of its first batch--> server   (embeddings + layers [0, K))
    loop:  server half: forward, loss, backward, step
           server --split_backward(grad at the cut)--> client   back-propagates, steps its optimizer,
           client --activations, mask, labels of its next batch (or done)--> server
    server --split_end--> client   replies with its trained client half

and the client halves are merged with the strategy (FedAvg). U-shaped (head on the client), the
labels stay on the client and each batch takes one more exchange: the server sends its last hidden
states (``split_head``) and the client returns the gradient of its loss with respect to them. Every exchange is one
Message/Reply, so the same protocol runs on Flower; bytes are the real encoded payloads in both directions. A
batch's backward and the next batch's forward share one exchange (the client computes them in that order either
way): on a SuperLink each exchange costs a round trip through the SuperLink (measured in benchmarks/runtimes), and a
separate forward request was half of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedcustom.codecs import Codec
from fedcustom.device import model_device, to_device
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.methods.split.cut import SplitModel
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.training import LocalSchedule, counted, derive_seed, local_batches
from fedcustom.validation import validate_update
from fedcustom.wire import schedule_from_config, schedule_to_config

log = logging.getLogger(__name__)

BEGIN, HEAD, BACKWARD, END = "split_begin", "split_head", "split_backward", "split_end"
State = dict[str, torch.Tensor]
T = TypeVar("T")


def _snapshot(params: dict[str, torch.nn.Parameter]) -> State:
    """CPU copies (what is encoded, merged and checkpointed stays on the CPU whatever the model's device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in params.items()}


def client_half_state(split: SplitModel) -> State:
    """The client half's weights (embeddings and layers [0, K)), detached copies."""
    return _snapshot(split.client_parameters())


def _copy_into(params: dict[str, torch.nn.Parameter], state: State) -> None:
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@dataclass
class _Session:
    """One client's in-flight round: its optimizer, remaining batches and the batch awaiting a gradient."""

    optimizer: torch.optim.Optimizer
    batches: Iterator[dict]
    num_examples: int
    config: dict  # the begin message's schedule and seed, to rebuild the batches after a restart
    position: int = 0  # batches drawn so far
    rng: torch.Tensor | None = None  # this client's own CPU RNG state (dropout), apart from the server's
    pending: dict[str, torch.Tensor] | None = None  # the batch whose gradient has not come back yet
    rng_before: torch.Tensor | None = None  # this client's RNG state before the pending batch's forward
    activations: torch.Tensor | None = None  # its client-half output, with the graph to back-propagate through
    flops: int = 0  # client-half forward + backward FLOPs so far this round


class SplitClient:
    """Handles the split message kinds for any node id, using that node's own rows.

    Between messages a client holds a session (optimizer, position in its batches, the pending batch). On a
    Flower SuperNode every message may run in a new process: :meth:`state_dict` and :meth:`load_state_dict`
    carry the session across, and a client that lost the pending batch's autograd graph recomputes the
    forward from the saved batch and RNG state (same dropout masks, so the same gradient) before back-propagating.

    Each session draws dropout masks from its own RNG stream, seeded at ``split_begin``, not from the process's
    global one, which the server half shares in the embedded runtime: the client computes the same in one
    process or in many, so the runtimes agree. (CPU RNG; on a GPU, dropout draws from CUDA's generator.)"""

    def __init__(self, split: SplitModel, tokenizer: PreTrainedTokenizerBase, codec: Codec,
                 client_tables: dict[int, datasets.Dataset]) -> None:
        self.split = split
        self.tokenizer = tokenizer
        self.codec = codec
        self.client_tables = client_tables
        self.sessions: dict[int, _Session] = {}

    def __call__(self, node_id: int, message: Message) -> Reply:
        handlers = {BEGIN: self.begin, HEAD: self.head, BACKWARD: self.backward, END: self.end}
        if message.kind not in handlers:
            return Reply(error=f"unknown message kind {message.kind!r}; this client handles {', '.join(handlers)}")
        if message.kind != BEGIN and node_id not in self.sessions:
            return Reply(error=f"{message.kind} before {BEGIN} for client {node_id}")
        return handlers[message.kind](node_id, message)

    def _open(self, node_id: int, config: dict, rnd: int) -> _Session:
        """A fresh session for ``node_id``: optimizer over the client half, batches from the start."""
        schedule = schedule_from_config(config)
        seed = derive_seed(int(config["seed"]), rnd, node_id)
        table = self.client_tables[node_id]
        self.split.model.train()
        session = _Session(
            optimizer=torch.optim.AdamW(self.split.client_parameters().values(), lr=schedule.lr,
                                        weight_decay=schedule.weight_decay),
            batches=local_batches(table, self.tokenizer, schedule, seed), num_examples=len(table),
            config={**config, "round": rnd}, rng=torch.Generator().manual_seed(seed).get_state(),
        )
        self.sessions[node_id] = session
        return session

    def begin(self, node_id: int, message: Message) -> Reply:
        """Load the global client half, open the round's session and reply with the first batch's activations."""
        _copy_into(self.split.client_parameters(), self.codec.decode(message.payload))
        self._open(node_id, dict(message.config), message.round)
        return self.forward(node_id)

    @staticmethod
    @contextmanager
    def _own_rng(session: _Session, state: torch.Tensor | None = None) -> Iterator[None]:
        """Run with the session's RNG (or ``state``, left unchanged), the process's RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(session.rng if state is None else state)
            yield
            if state is None:
                session.rng = torch.get_rng_state()

    def _client_forward(self, session: _Session, rng: torch.Tensor | None = None) -> torch.Tensor:
        """The client half on the pending batch, FLOPs counted; (batch, seq, hidden)."""
        batch = to_device(session.pending, model_device(self.split.model))
        with self._own_rng(session, rng):
            activations, flops = counted(self.split.model, ("split_client_forward", *batch["input_ids"].shape),
                                         lambda: self.split.client_forward(batch["input_ids"], batch["attention_mask"],
                                                                           batch.get("token_type_ids")))
        session.flops += flops
        return activations

    def forward(self, node_id: int) -> Reply:
        """The client half on the session's next batch: its activations (with the labels unless U-shaped), or
        ``done`` when the batches are used up."""
        session = self.sessions[node_id]
        batch = next(session.batches, None)
        if batch is None:
            return Reply(metrics={"done": 1.0})
        session.position += 1
        session.pending, session.rng_before = batch, session.rng.clone()
        session.activations = self._client_forward(session)
        wire = {"activations": session.activations.detach(), "attention_mask": batch["attention_mask"]}
        if not self.split.head_on_client:  # U-shaped, the labels stay here
            wire["labels"] = batch["labels"]
        return Reply(payload=self.codec.encode(wire), num_examples=len(batch["labels"]), metrics={"done": 0.0})

    def head(self, node_id: int, message: Message) -> Reply:
        """U-shaped: the loss on the server's last hidden states, and its gradient for the server."""
        session = self.sessions[node_id]
        device = model_device(self.split.model)
        hidden = self.codec.decode(message.payload)["hidden"].to(device)  # (batch, seq, hidden)
        if session.pending is None or len(hidden) != len(session.pending["labels"]):
            return Reply(error=f"hidden states for {len(hidden)} rows do not match the pending batch")
        pending = to_device(session.pending, device)
        with self._own_rng(session):
            (loss, grad), flops = counted(self.split.model, ("split_head", *hidden.shape),
                                          lambda: self.split.head_step(hidden, pending["attention_mask"],
                                                                       pending["labels"]))
        session.flops += flops
        return Reply(payload=self.codec.encode({"grad": grad}), metrics={"loss": float(loss)})

    def backward(self, node_id: int, message: Message) -> Reply:
        """Back-propagate the server's gradient at the cut, step, and reply with the next batch's forward."""
        session = self.sessions[node_id]
        grad = self.codec.decode(message.payload)["grad"].to(model_device(self.split.model))
        if session.activations is None and session.pending is not None:  # restarted since the forward
            session.activations = self._client_forward(session, rng=session.rng_before)
        if session.activations is None or grad.shape != session.activations.shape:
            return Reply(error=f"gradient of shape {tuple(grad.shape)} does not match the pending activations")
        activations = session.activations
        session.flops += counted(self.split.model, ("split_client_backward", *grad.shape),
                                 lambda: activations.backward(grad))[1]
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)
        session.activations = session.pending = session.rng_before = None
        return self.forward(node_id)

    def end(self, node_id: int, message: Message) -> Reply:
        session = self.sessions.pop(node_id)
        return Reply(payload=self.codec.encode(client_half_state(self.split)), num_examples=session.num_examples,
                     metrics={"flops": float(session.flops)})

    def in_round(self) -> bool:
        """Whether a round is in flight (a session open): a persistent worker then keeps it in memory only."""
        return bool(self.sessions)

    def state_dict(self) -> tuple[State, dict]:
        """The sessions in flight: client-half weights and gradients, optimizer moments, the pending batch, RNG."""
        tensors: State = {}
        meta: dict = {"sessions": {}}
        for node, session in self.sessions.items():
            for name, param in self.split.client_parameters().items():
                tensors[f"{node}/param/{name}"] = param.detach().to("cpu", copy=True)
                if param.grad is not None:  # U-shaped: the head's gradient waits for the backward's step
                    tensors[f"{node}/grad/{name}"] = param.grad.to("cpu", copy=True)
            for index, moments in session.optimizer.state_dict()["state"].items():
                tensors.update({f"{node}/opt/{index}/{key}": torch.as_tensor(value).to("cpu", copy=True)
                                for key, value in moments.items()})
            tensors[f"{node}/rng"] = session.rng
            if session.pending is not None:
                tensors.update({f"{node}/batch/{key}": value for key, value in session.pending.items()})
                tensors[f"{node}/rng_before"] = session.rng_before
            meta["sessions"][str(node)] = {"config": session.config, "position": session.position,
                                           "flops": session.flops}
        return tensors, meta

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`: reopen each session where it was."""
        self.sessions = {}
        for node_key, saved in meta["sessions"].items():
            node, config = int(node_key), dict(saved["config"])
            params = self.split.client_parameters()
            _copy_into(params, {name: tensors[f"{node}/param/{name}"] for name in params})
            for name, param in params.items():
                grad = tensors.get(f"{node}/grad/{name}")
                param.grad = None if grad is None else grad.to(param.device, copy=True)
            session = self._open(node, config, int(config.pop("round")))
            optimizer = session.optimizer.state_dict()
            optimizer["state"] = _moments(tensors, f"{node}/opt/")
            session.optimizer.load_state_dict(optimizer)
            for _ in range(saved["position"]):
                next(session.batches)
            session.position, session.flops, session.rng = saved["position"], saved["flops"], tensors[f"{node}/rng"]
            batch = {key.rsplit("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{node}/batch/")}
            session.pending, session.rng_before = (batch, tensors[f"{node}/rng_before"]) if batch else (None, None)


def _moments(tensors: State, prefix: str) -> dict[int, State]:
    """Optimizer state per parameter index from ``{prefix}{index}/{key}`` entries."""
    state: dict[int, State] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(index), {})[name] = value.clone()
    return state


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

    def state_dict(self) -> tuple[State, dict]:
        """The global halves and the server optimizer's moments (for checkpoints)."""
        tensors = {f"client_half/{k}": v for k, v in self.global_client_half.items()}
        tensors.update({f"server_half/{k}": v for k, v in self.global_server_half.items()})
        for index, moments in self.optimizer.state_dict()["state"].items():
            tensors.update({f"opt/{index}/{key}": torch.as_tensor(value).to("cpu", copy=True)
                            for key, value in moments.items()})
        return tensors, {}

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.global_client_half = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("client_half/")}
        self.global_server_half = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("server_half/")}
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = _moments(tensors, "opt/")
        self.optimizer.load_state_dict(optimizer)

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

    def _count(self, node: int, result: SplitRoundResult, key: tuple, work: Callable[[], T]) -> T:
        """Run the server's ``work``, adding its FLOPs (counted once per kind and shape) to ``node``'s."""
        value, flops = counted(self.split.model, key, work)
        result.server_flops[node] = result.server_flops.get(node, 0) + flops
        return value

    def _server_step(self, rnd: int, node: int, wire: State, result: SplitRoundResult) -> tuple[float, torch.Tensor]:
        """Server half with the head: forward, loss, backward on the received activations."""
        step = self._count(node, result, ("split_server_step", *wire["activations"].shape),
                           lambda: self.split.server_step(wire["activations"], wire["attention_mask"], wire["labels"]))
        return float(step.loss), step.grad_at_cut

    def _u_shaped_step(self, rnd: int, node: int, wire: State, result: SplitRoundResult) -> tuple[float, torch.Tensor]:
        """U-shaped: the middle layers forward, the client's head computes the loss on its own labels and
        returns the gradient at the top, the middle layers backward to the cut."""
        received = wire["activations"].detach().requires_grad_(True)  # (batch, seq, hidden)
        top = self._count(node, result, ("split_middle_forward", *received.shape),
                          lambda: self.split.middle_forward(received, wire["attention_mask"]))  # (batch, seq, hidden)
        head = self._exchange(node, Message(HEAD, rnd, self.codec.encode({"hidden": top.detach()})), result)
        grad_top = self.codec.decode(head.payload).get("grad")
        grad_top = None if grad_top is None else grad_top.to(top.device)
        if grad_top is None or grad_top.shape != top.shape or not torch.isfinite(grad_top).all():
            raise UpdateRejected(f"head gradient: expected finite 'grad' of shape {tuple(top.shape)}")
        self._count(node, result, ("split_middle_backward", *top.shape), lambda: top.backward(grad_top))
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
        reply = self._exchange(node, begin, result)  # the first batch's activations
        self.split.model.train()
        step = self._u_shaped_step if self.split.head_on_client else self._server_step
        while reply.metrics.get("done") == 0.0:
            wire = to_device(self.codec.decode(reply.payload), model_device(self.split.model))
            loss, grad_at_cut = step(rnd, node, wire, result)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            result.batches[node] = result.batches.get(node, 0) + 1
            result.examples_seen += len(grad_at_cut)
            reply = self._exchange(node, Message(BACKWARD, rnd, self.codec.encode({"grad": grad_at_cut})), result)
        end = self._exchange(node, Message(END, rnd), result)
        state = self.codec.decode(end.payload)
        validate_update(state, self.global_client_half)
        result.client_flops[node] = int(end.metrics.get("flops", 0))
        return ClientUpdate(node, state, end.num_examples)
