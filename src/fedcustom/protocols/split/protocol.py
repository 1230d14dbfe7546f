"""SplitFed rounds over the runtime's one send/receive primitive (arXiv 2501.04436, Split-FedLLM).

Per round, for each sampled client in turn (SplitFed-V2: the server half trains on one client's
batches after another):

    server --split_begin(client-half global state, schedule)--> client   loads it, builds its batches,
           (a node that keeps the version it received last gets only the rows changed since: rows.py)
           client --activations, mask, labels of its first batch--> server   (embeddings + layers [0, K))
    loop:  server half: forward, loss, backward, step
           server --split_backward(grad at the cut)--> client   back-propagates, steps its optimizer,
           client --activations, mask, labels of its next batch, or done with its trained client half
                   (the rows it changed)--> server

and the client halves are merged with the strategy (FedAvg). U-shaped (head on the client), the
labels stay on the client and each batch takes one more exchange: the server sends its last hidden
states (``split_head``) and the client returns the gradient of its loss with respect to them. Every exchange is one
Message/Reply, so the same protocol runs on Flower; bytes are the real encoded payloads in both directions. A
batch's backward and the next batch's forward share one exchange (the client computes them in that order either
way): on a SuperLink each exchange costs a round trip through the SuperLink (measured in benchmarks/runtimes), and a
separate forward request was half of them; for the same reason the trained client half rides on the reply to the
last batch's backward instead of a message of its own. The client side is :mod:`.client`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from fedcustom.codecs import Codec
from fedcustom.device import model_device, to_device
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.methods.split.cut import SplitModel
from fedcustom.protocols.split.rows import VersionHistory, decode_rows, encode_rows
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.training import LocalSchedule, counted, make_optimizer
from fedcustom.validation import validate_update
from fedcustom.wire import schedule_to_config

log = logging.getLogger(__name__)

BEGIN, HEAD, BACKWARD = "split_begin", "split_head", "split_backward"
# split_begin's config: the version of the global client half it carries, and (rows only) the version it builds on
VERSION, BASE = "split.version", "split.base"
# reply metrics: split_begin's base is not here (send it whole); the done reply sends rows only, keeps the version
BASE_MISSING, ROWS_ONLY, KEEPS_BASE = "base_missing", "rows_only", "keeps_base"
LAST = "last"  # activations' reply metric: this is the client's last batch (its backward's reply is the trained half)
State = dict[str, torch.Tensor]
T = TypeVar("T")


def snapshot(params: dict[str, torch.nn.Parameter]) -> State:
    """CPU copies (what is encoded, merged and checkpointed stays on the CPU whatever the model's device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in params.items()}


def client_half_state(split: SplitModel) -> State:
    """The client half's weights (embeddings and layers [0, K)), detached copies."""
    return snapshot(split.client_parameters())


def copy_into(params: dict[str, torch.nn.Parameter], state: State) -> None:
    """Write ``state`` into the parameters of the same names."""
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def moments(tensors: State, prefix: str) -> dict[int, State]:
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
        self.global_server_half = snapshot(split.server_parameters())
        self.optimizer = make_optimizer(list(split.server_parameters().values()), schedule)  # --optimizer
        self.versions = VersionHistory(secrets.token_hex(6))  # what each node keeps of the global client half

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
        optimizer["state"] = moments(tensors, "opt/")
        self.optimizer.load_state_dict(optimizer)
        self.versions = VersionHistory(secrets.token_hex(6))  # the nodes may keep versions the checkpoint lost

    def load_global(self) -> None:
        """Put the global model (merged client half, server half) into the model, e.g. to evaluate it."""
        copy_into(self.split.client_parameters(), self.global_client_half)
        copy_into(self.split.server_parameters(), self.global_server_half)

    def run_round(self, rnd: int, clients: list[int],
                  on_client_done: Callable[[int], None] | None = None) -> SplitRoundResult:
        """Train the server half on each client's batches in turn, then merge the client halves.

        Clients on their own machines (a Flower runtime) work while the server serves another one: the next client's
        split_begin goes out when the server starts on a client, and a client's trained half, the reply to its last
        batch's backward, is collected only after the server has served the others. In one process (embedded) every
        message is handled when it is sent, one client after another, since the clients share one model there."""
        result = SplitRoundResult(round=rnd, clients=clients)
        for group in self.optimizer.param_groups:  # the server half follows the run's rate schedule, as the clients do
            group["lr"] = self.schedule.lr_at_round(rnd)
        copy_into(self.split.server_parameters(), self.global_server_half)
        updates, losses, uploads = [], [], []
        remote, begins = self.runtime.local_handler is None, {}
        for index, node in enumerate(clients):
            begin = begins.pop(node, None) or self._post(node, self._begin(rnd, node), result)
            if remote and index + 1 < len(clients):  # it loads its half and computes a batch while `node` is served
                following = clients[index + 1]
                begins[following] = self._post(following, self._begin(rnd, following), result)
            try:
                uploads.append((node, self._train_client(rnd, node, result, losses, begin)))
            except (PayloadError, UpdateRejected) as exc:
                self._reject(rnd, node, exc, result)
            if on_client_done:
                on_client_done(node)
        for node, upload in uploads:
            try:
                updates.append(self._client_update(node, upload(), result))
            except (PayloadError, UpdateRejected) as exc:
                self._reject(rnd, node, exc, result)
        self.global_server_half = snapshot(self.split.server_parameters())
        if updates:
            merged = self.strategy.aggregate(self.global_client_half, updates)
            self.versions.advance(merged, self.global_client_half)
            self.global_client_half = merged
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

    @staticmethod
    def _reject(rnd: int, node: int, exc: Exception, result: SplitRoundResult) -> None:
        log.warning("round %d: rejected client %d: %s", rnd, node, exc)
        result.rejected[node] = str(exc)

    def _post(self, node: int, message: Message, result: SplitRoundResult) -> Callable[[], Reply]:
        """Send ``message`` now; the returned call waits for its reply (both directions' bytes counted)."""
        posted = self.runtime.post({node: message})
        result.bytes_down[node] = result.bytes_down.get(node, 0) + len(message.payload)

        def reply() -> Reply:
            received = self.runtime.collect(posted)[node]
            result.bytes_up[node] = result.bytes_up.get(node, 0) + len(received.payload)
            if received.error:
                raise UpdateRejected(f"client reported an error: {received.error}")
            return received

        return reply

    def _exchange(self, node: int, message: Message, result: SplitRoundResult) -> Reply:
        return self._post(node, message, result)()

    def _train_client(self, rnd: int, node: int, result: SplitRoundResult, losses: list[float],
                      begin: Callable[[], Reply]) -> Callable[[], Reply]:
        """Serve ``node``'s batches, from the reply to its split_begin; returns the call that waits for its trained
        client half."""
        reply = begin()  # the first batch's activations
        if reply.metrics.get(BASE_MISSING):
            self.versions.kept(node, None)
            reply = self._exchange(node, self._begin(rnd, node), result)
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
            backward = Message(BACKWARD, rnd, self.codec.encode({"grad": grad_at_cut}))
            if reply.metrics.get(LAST) == 1.0:  # its reply is the trained half: collected after the other clients
                return self._post(node, backward, result)
            reply = self._exchange(node, backward, result)
        return lambda: reply  # done before any batch, or a client that did not say which batch was its last

    def _client_update(self, node: int, end: Reply, result: SplitRoundResult) -> ClientUpdate:
        """The trained client half in ``end`` (the client's done reply), whole again and checked."""
        if end.metrics.get("done") != 1.0:
            raise UpdateRejected(f"expected activations (done = 0) or the trained client half (done = 1), got done = "
                                 f"{end.metrics.get('done')!r}")
        state = self.codec.decode(end.payload)
        if end.metrics.get(ROWS_ONLY):
            state = decode_rows(self.global_client_half, state)
        validate_update(state, self.global_client_half)
        self.versions.kept(node, self.versions.number if end.metrics.get(KEEPS_BASE) else None)
        result.client_flops[node] = int(end.metrics.get("flops", 0))
        return ClientUpdate(node, state, end.num_examples)

    def _begin(self, rnd: int, node: int) -> Message:
        """split_begin for ``node``: the global client half whole, or only its rows changed since the version the
        node keeps (:mod:`.rows`)."""
        config = {**schedule_to_config(self.schedule, self.seed, rnd), VERSION: self.versions.current}
        since = self.versions.rows_since(node)
        if since is None:
            return Message(BEGIN, rnd, self.codec.encode(self.global_client_half), config)
        base, rows = since
        return Message(BEGIN, rnd, self.codec.encode(encode_rows(self.global_client_half, rows)), {**config, BASE: base})
