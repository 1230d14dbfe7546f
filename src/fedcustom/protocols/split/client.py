"""The client side of SplitFed (:mod:`fedcustom.protocols.split.protocol` describes the round): each node runs the
embeddings and layers [0, K) on its own rows and keeps its round's session between messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedcustom.codecs import Codec
from fedcustom.device import model_device, to_device
from fedcustom.errors import PayloadError
from fedcustom.methods.split.cut import SplitModel
from fedcustom.protocols.split.protocol import (BACKWARD, BASE, BASE_MISSING, BEGIN, HEAD, KEEPS_BASE, LAST,
                                                ROWS_ONLY, VERSION, State, client_half_state, copy_into, moments)
from fedcustom.protocols.split.rows import changed_rows, decode_rows, encode_rows
from fedcustom.runtime import Message, Reply
from fedcustom.training import counted, derive_seed, local_batches, make_optimizer
from fedcustom.wire import schedule_from_config


@dataclass
class _Session:
    """One client's in-flight round: its optimizer, remaining batches and the batch awaiting a gradient."""

    optimizer: torch.optim.Optimizer
    batches: Iterator[dict]
    num_examples: int
    config: dict  # the begin message's schedule and seed, to rebuild the batches after a restart
    position: int = 0  # batches used so far (not counting the one drawn ahead)
    rng: torch.Tensor | None = None  # this client's own CPU RNG state (dropout), apart from the server's
    pending: dict[str, torch.Tensor] | None = None  # the batch whose gradient has not come back yet
    rng_before: torch.Tensor | None = None  # this client's RNG state before the pending batch's forward
    activations: torch.Tensor | None = None  # its client-half output, with the graph to back-propagate through
    flops: int = 0  # client-half forward + backward FLOPs so far this round
    base: State | None = None  # the global client half received at split_begin (in memory only, not in state_dict)
    ahead: dict | None = None  # the batch after the pending one, drawn early to say which batch is the last (not in
    # state_dict: a restored session draws it again, from the same position)


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
        self.kept: dict[int, tuple[str, State]] = {}  # node -> the last global client half it received, its version

    def __call__(self, node_id: int, message: Message) -> Reply:
        handlers = {BEGIN: self.begin, HEAD: self.head, BACKWARD: self.backward}
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
            optimizer=make_optimizer(list(self.split.client_parameters().values()), schedule),
            batches=local_batches(table, self.tokenizer, schedule, seed), num_examples=len(table),
            config={**config, "round": rnd}, rng=torch.Generator().manual_seed(seed).get_state(),
        )
        self.sessions[node_id] = session
        return session

    def begin(self, node_id: int, message: Message) -> Reply:
        """Load the global client half (whole, or the rows changed since the version this node keeps), open the
        round's session and reply with the first batch's activations."""
        config = dict(message.config)
        base, version = config.pop(BASE, None), config.pop(VERSION, None)
        received = self.codec.decode(message.payload)
        if base is not None:
            kept = self.kept.get(node_id)
            if kept is None or kept[0] != base:  # e.g. a restarted worker: the server sends it whole
                return Reply(metrics={BASE_MISSING: 1.0})
            try:
                received = decode_rows(kept[1], received)
            except PayloadError as exc:
                return Reply(error=f"{BEGIN}: {exc}")
        self._keep(node_id, version, received)
        copy_into(self.split.client_parameters(), received)
        self._open(node_id, config, message.round).base = received
        return self.forward(node_id)

    def _keep(self, node_id: int, version: str | None, state: State) -> None:
        """Remember the global half this node received (nodes holding the same version share one copy)."""
        if version is None:
            self.kept.pop(node_id, None)
            return
        same = next((kept for v, kept in self.kept.values() if v == version), state)
        self.kept[node_id] = (version, same)

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
        """The client half on the session's next batch: its activations (with the labels unless U-shaped), or,
        when the batches are used up, ``done`` with the trained client half (:meth:`finish`)."""
        session = self.sessions[node_id]
        batch = session.ahead if session.ahead is not None else next(session.batches, None)
        session.ahead = None
        if batch is None:
            return self.finish(node_id)
        session.position += 1
        session.pending, session.rng_before = batch, session.rng.clone()
        session.activations = self._client_forward(session)
        wire = {"activations": session.activations.detach(), "attention_mask": batch["attention_mask"]}
        if not self.split.head_on_client:  # U-shaped, the labels stay here
            wire["labels"] = batch["labels"]
        session.ahead = next(session.batches, None)
        return Reply(payload=self.codec.encode(wire), num_examples=len(batch["labels"]),
                     metrics={"done": 0.0, LAST: float(session.ahead is None)})

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

    def finish(self, node_id: int) -> Reply:
        """Close the session and reply ``done`` with the trained client half: the rows that differ from the received
        global half, or (a session restored from the node's context, without it) whole. It rides on the reply to
        the last batch's backward rather than on a message of its own: one round trip less per client and round."""
        session = self.sessions.pop(node_id)
        trained, metrics = client_half_state(self.split), {"done": 1.0, "flops": float(session.flops)}
        if session.base is not None:
            trained = encode_rows(trained, changed_rows(trained, session.base))
            metrics.update({ROWS_ONLY: 1.0, KEEPS_BASE: float(node_id in self.kept)})
        return Reply(payload=self.codec.encode(trained), num_examples=session.num_examples, metrics=metrics)

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
            for index, saved in session.optimizer.state_dict()["state"].items():
                tensors.update({f"{node}/opt/{index}/{key}": torch.as_tensor(value).to("cpu", copy=True)
                                for key, value in saved.items()})
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
            copy_into(params, {name: tensors[f"{node}/param/{name}"] for name in params})
            for name, param in params.items():
                grad = tensors.get(f"{node}/grad/{name}")
                param.grad = None if grad is None else grad.to(param.device, copy=True)
            session = self._open(node, config, int(config.pop("round")))
            optimizer = session.optimizer.state_dict()
            optimizer["state"] = moments(tensors, f"{node}/opt/")
            session.optimizer.load_state_dict(optimizer)
            for _ in range(saved["position"]):
                next(session.batches)
            session.position, session.flops, session.rng = saved["position"], saved["flops"], tensors[f"{node}/rng"]
            batch = {key.rsplit("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{node}/batch/")}
            session.pending, session.rng_before = (batch, tensors[f"{node}/rng_before"]) if batch else (None, None)
