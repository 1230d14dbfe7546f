"""Server side: drive rounds through the runtime, validate and merge updates, evaluate.

    global_state --encode--> Message("train") --runtime--> clients --Reply--> check envelope -> decode
    -> validate -> aggregation.merge -> server optimizer step -> new global_state -> evaluate

How replies are collected and merged is the round's aggregation (:mod:`.aggregation`: the strategy's merge,
central DP's clipped and noised mean, or secure aggregation's masked sum); the round itself does not branch on
privacy. The server never touches a client's data or a method's internals: it sees named tensors, example
counts and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcustom import scaffold
from fedcustom.codecs import Codec, Link, SharedReferences, links_from_state, links_state
from fedcustom.errors import FedCustomError, PayloadError, UpdateRejected
from fedcustom.privacy.dp import PrivacyAccountant
from fedcustom.protocols.sharing.aggregation import Aggregation, Collected, StrategyAggregation
from fedcustom.rounds import RoundResult, State, sample_clients
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.strategies.base import Accumulator
from fedcustom.strategies.server_opt import ServerOptimizer, ServerOptSettings
from fedcustom.tensorstate import SEP, group
from fedcustom.training import LocalSchedule
from fedcustom.validation import check_envelope, default_max_bytes, validate_update
from fedcustom.wire import TRAIN, drift_config, schedule_to_config

log = logging.getLogger(__name__)

Evaluator = Callable[[State], dict[str, float]]


@dataclass
class Safeguards:
    """What the server enforces besides the aggregation: update limits, the DP settings clients get, and the
    privacy accountant (central and local DP)."""

    max_update_bytes: int | None = None  # None: validation.default_max_bytes of the global state
    client_config: dict[str, float] = field(default_factory=dict)  # in every train message (--dp local, --dp-sgd)
    accountant: PrivacyAccountant | None = None
    noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    sample_rate: float = 1.0  # share of clients sampled per round, for privacy amplification


@dataclass
class Convergence:
    """How the server steers convergence besides the strategy: the server optimizer that applies each round's
    aggregate, SCAFFOLD's control variates and FedProx's proximal weight (sent to clients)."""

    optimizer: ServerOptimizer = field(default_factory=lambda: ServerOptimizer(ServerOptSettings()))
    scaffold: bool = False
    prox_mu: float = 0.0
    # SCAFFOLD's N, the federation's clients: c moves by 1/N of the clients' changes. None: the runtime's nodes now
    # (on Flower a node that died leaves that list, which would make c's steps larger than the paper's)
    clients: int | None = None
    scaffold_weights: str = "uniform"  # or "examples": c's update weighted as the model's merge (scaffold.ServerControl)


class FederatedServer:
    """Holds the global state and runs one round at a time."""

    def __init__(
        self, runtime: Runtime, strategy: Strategy, codec: Codec, initial_state: State,
        evaluate: Evaluator, schedule: LocalSchedule, clients_per_round: int, seed: int,
        codec_down: Codec | None = None, min_available: int = 1, safeguards: Safeguards | None = None,
        convergence: Convergence | None = None, aggregation: Aggregation | None = None,
        broadcast_only: frozenset[str] = frozenset(), in_process: Any = None,
    ) -> None:
        self.runtime = runtime
        self.min_available = min_available  # fewest valid updates that change the global state
        self.strategy = strategy
        self.aggregation = aggregation or StrategyAggregation()  # how replies are collected and merged
        self.codec = codec  # client to server
        self.codec_down = codec_down or codec  # server to client
        self.links_down: dict[int, Link] = {}  # per client: what it last reconstructed (delta), our residual (topk)
        self.shared = SharedReferences()  # clients that rebuilt the same global share one copy of it
        self.global_state = {k: v.clone() for k, v in initial_state.items()}
        # tensors clients receive but never send back (--lora-aggregation stack: the backbone weights LoRA adapts)
        self.broadcast_only = broadcast_only
        # the client handler in this process (embedded: the one the runtime calls; Flower: the one the global model
        # is evaluated with), which puts a state into the shared model
        self.in_process = in_process
        self.evaluate = evaluate
        self.schedule = schedule
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.safeguards = safeguards or Safeguards()
        self.convergence = convergence or Convergence()
        self.control = scaffold.ServerControl(self.global_state) if self.convergence.scaffold else None
        self.settled: dict[int, int] = {}  # SCAFFOLD: per node, the last round whose control change went into c
        self.max_update_bytes = self.safeguards.max_update_bytes or default_max_bytes(self.global_state)
        self.dp_sgd_max = 0.0  # DP-SGD: the largest epsilon any client has reported so far (a client's only grows)
        codec.limit_decoded(default_max_bytes(self.global_state))  # a zstd frame may claim any size

    def evaluate_initial(self) -> RoundResult:
        """Round 0: how the untrained global state scores."""
        return RoundResult(round=0, eval=self.evaluate(self.global_state))

    def state_dict(self) -> tuple[State, dict]:
        """Global tensors, both codec links per client and the accountant (for checkpoints)."""
        tensors = {f"global{SEP}{k}": v for k, v in self.global_state.items()}
        accountant = self.safeguards.accountant
        opt_tensors, opt_meta = self.convergence.optimizer.state_dict()
        tensors.update({f"server_opt{SEP}{k}": v for k, v in opt_tensors.items()})
        if self.control is not None:
            tensors.update({f"control{SEP}{k}": v for k, v in self.control.c.items()})
        meta = {"links_down": links_state("down", self.links_down, tensors),
                "accountant": accountant.state_dict() if accountant else None, "server_opt": opt_meta,
                "dp_sgd_max": self.dp_sgd_max, "scaffold_settled": {str(n): r for n, r in self.settled.items()}}
        return tensors, meta

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.global_state = group(tensors, "global")
        self.links_down = links_from_state("down", meta["links_down"], tensors)
        self.shared.adopt(self.links_down)
        if self.safeguards.accountant and meta["accountant"] is not None:
            self.safeguards.accountant.load_state_dict(meta["accountant"])
        self.convergence.optimizer.load_state_dict(group(tensors, "server_opt"), meta["server_opt"])
        self.dp_sgd_max = float(meta.get("dp_sgd_max", 0.0))  # (older checkpoints: from this round on)
        if self.control is not None:
            self.control.c = group(tensors, "control")
            self.settled = {int(n): int(r) for n, r in meta.get("scaffold_settled", {}).items()}

    def run_round(self, rnd: int, on_reply: Callable[[int], None] | None = None) -> RoundResult:
        """Send the global state to sampled clients, merge valid replies, evaluate the result."""
        start = time.perf_counter()
        chosen = sample_clients(self.runtime.nodes(), self.clients_per_round, self.seed, rnd)
        steer = self.convergence
        config = self._round_config(rnd)
        result = RoundResult(round=rnd, eval={}, clients=chosen)
        collected = self.aggregation.collect(self, rnd, chosen, config, result, on_reply)
        updates = collected.updates
        for node in result.rejected:
            self.links_down.pop(node, None)  # its state is unknown now: the next broadcast starts from zero
        if 0 < len(updates) < self.min_available:
            log.warning("round %d: %d valid updates, fewer than min_available = %d; the global state is unchanged",
                        rnd, len(updates), self.min_available)
            result.examples_seen = 0  # passes that never reached the model (the same-passes baseline's budget)
        elif updates:
            aggregate = self.aggregation.merge(self, rnd, collected, result)
            self.global_state = steer.optimizer.step(self.global_state, aggregate)
            if self.control is not None:
                total = self.convergence.clients or len(self.runtime.nodes())
                examples = [u.num_examples for u in updates] if self.convergence.scaffold_weights == "examples" \
                    else None
                self.control.apply([collected.controls[u.node_id] for u in updates], total, examples)
                self.settled.update({u.node_id: rnd for u in updates})
            result.train_loss = _mean_train_loss(updates)
        else:
            log.warning("round %d: no valid updates; the global state is unchanged", rnd)
        if self.safeguards.accountant is not None:
            result.epsilon = self._account(updates, result)
        sgd = [u.metrics["dp_sgd_epsilon"] for u in updates if "dp_sgd_epsilon" in u.metrics]
        if sgd:  # the most exposed client's rows so far, whether or not it took part in this round
            self.dp_sgd_max = max(self.dp_sgd_max, *sgd)
            result.privacy["dp_sgd_epsilon_max"] = self.dp_sgd_max
        result.eval = self.evaluate(self.global_state)
        result.wall_seconds = time.perf_counter() - start
        return result

    def _round_config(self, rnd: int) -> dict:
        """What every training message of round ``rnd`` says besides the tensors (schedule, drift, safeguards)."""
        steer = self.convergence
        return {**schedule_to_config(self.schedule, self.seed, rnd), **drift_config(steer.prox_mu, steer.scaffold),
                **self.safeguards.client_config}

    def observed_update(self, node: int, rnd: int) -> State:
        """What an honest-but-curious server without secure aggregation sees of one client: the trained state
        ``node`` uploads when sent the current global state as round ``rnd`` (decoded; noised if the client applies
        local DP). Nothing is merged; for membership-inference measurements (fedcustom.bench.leakage)."""
        message = self.broadcast(rnd, [node], self._round_config(rnd))[node]
        reply = dict(self.runtime.stream({node: message}))[node]
        if reply.error:
            raise FedCustomError(f"client {node} gave no update to observe: {reply.error}")
        return self._decode(node, reply, message)

    def _account(self, updates: list[ClientUpdate], result: RoundResult) -> float:
        """One accountant step per round whose updates were released (central DP), or whose noised uploads the
        server received at all (local DP: it saw them, merged or not); epsilon spent so far."""
        guards = self.safeguards
        assert guards.accountant is not None
        local = "dp_clip" in guards.client_config
        if (local and any(b > 0 for b in result.bytes_up.values())) or len(updates) >= self.min_available:
            guards.accountant.step(guards.noise_multiplier, guards.sample_rate)
        return guards.accountant.epsilon(guards.dp_delta)

    def _settled(self, node: int) -> dict[str, int]:
        """SCAFFOLD: which of the node's control changes the server applied last (the client keeps its c_i only
        from that round's training; 0: none yet)."""
        return {"scaffold_settled": self.settled.get(node, 0)} if self.control is not None else {}

    def broadcast(self, rnd: int, chosen: list[int], config: dict) -> dict[int, Message]:
        """One train message per client: the global state, encoded along that client's link."""
        attachment = scaffold.encode(self.control.c) if self.control is not None else b""
        if self.codec_down.stateless:
            payload = self.codec_down.encode(self.global_state)
            return {node: Message(TRAIN, rnd, payload, {**config, **self._settled(node)}, attachment) for node in chosen}
        messages: dict[int, Message] = {}
        # A down link keeps no residual (error_feedback off), so its payload and new reference depend only on its
        # old reference and the global state: clients holding the same reference get the same bytes and share the
        # new reference, encoded once (100 full-size first messages would otherwise be 100 copies in memory).
        encoded: dict[int, tuple[State | None, bytes, State | None]] = {}  # id(old reference): old (kept alive so
        # its id is not reused), payload, new reference
        for node in chosen:
            link = self.links_down.setdefault(node, Link(error_feedback=False))  # the reference carries the rest
            base = link.round  # the round the client's reference dates from (0: none)
            if id(link.reference) in encoded:
                _, payload, link.reference = encoded[id(link.reference)]
            else:
                old = link.reference
                payload = self.codec_down.encode(self.global_state, link)
                encoded[id(old)] = old, payload, link.reference
            link.round = rnd
            self.shared.share(link, self.links_down)
            messages[node] = Message(TRAIN, rnd, payload, {**config, "codec_base": base, **self._settled(node)},
                                     attachment)
        return messages

    def upload_reference(self) -> State:
        """The tensors a client's update must hold: the global state less what is only broadcast."""
        return self._uploaded_part(self.global_state)

    def _uploaded_part(self, state: State) -> State:
        """``state`` less the tensors that are only broadcast (itself when there are none)."""
        if not self.broadcast_only:
            return state
        return {k: v for k, v in state.items() if k not in self.broadcast_only}

    def _client_start(self, node: int, message: Message) -> State:
        """The state the client reconstructed from ``message`` (less what is only broadcast): where its uploaded
        difference starts."""
        start = self.links_down[node].reference if self.codec_down.delta else self.codec_down.decode(message.payload)
        return self._uploaded_part(start)

    def _decode(self, node: int, reply: Reply, message: Message) -> State:
        """The client's trained state, as an update applied to the current global state.

        With a lossy broadcast the client started from an approximation of the global; averaging its
        state would drag the global back toward that approximation, so its update (trained minus
        where it started) is applied to the exact global instead (FedAvg of updates)."""
        if self.codec_down.lossless and not self.codec.delta:
            return self.codec.decode(reply.payload)
        start = self._client_start(node, message)
        # The upload link's reference is where this round's update started, so nothing of it outlives the round.
        state = self.codec.decode(reply.payload, Link(reference=start if self.codec.delta else None))
        if self.codec_down.lossless:
            return state  # the client started from the exact global: nothing to re-base (and bit-exact)
        return {k: self.global_state[k] + (state[k] - start[k]) for k in state}

    def accept(self, replies: Iterator[tuple[int, Reply]], result: RoundResult, messages: dict[int, Message],
               running: Accumulator | None = None) -> Collected:
        """Decode and validate each reply as it arrives (and, with SCAFFOLD, its control-variate change); record
        byte counts, FLOPs and rejections. Given a ``running`` merge (FedAvg's, without central DP), each state is
        fed to it at once and dropped: the round holds one client's payload and state, not all of them."""
        updates, controls, rejected, answered = [], {}, {}, set()
        for node, reply in replies:
            answered.add(node)
            result.bytes_up[node] = len(reply.payload) + len(reply.attachment)
            if "simulated_seconds" in reply.metrics:  # device profiles: the round lasts as long as its slowest client
                slowest = max(result.simulated_seconds or 0.0, float(reply.metrics["simulated_seconds"]))
                result.simulated_seconds = slowest
            try:
                check_envelope(reply, result.round, self.max_update_bytes)
                state = self._decode(node, reply, messages[node])
                validate_update(state, self.upload_reference())
                if self.control is not None:
                    controls[node] = scaffold.decode(reply.attachment, self.global_state, "control variate change")
            except (PayloadError, UpdateRejected) as exc:
                log.warning("round %d: rejected update from client %d: %s", result.round, node, exc)
                rejected[node] = str(exc)
                continue
            if running is not None:
                running.add(state, reply.num_examples, node)
                state = {}
            updates.append(ClientUpdate(node, state, reply.num_examples, dict(reply.metrics)))
            result.client_flops[node] = int(reply.metrics.get("flops", 0))
            result.examples_seen += int(reply.metrics.get("examples_seen", 0))
        for node in sorted(set(result.clients) - answered):
            log.warning("round %d: no reply from client %d", result.round, node)
            result.rejected[node] = "no reply"
        result.rejected.update(rejected)
        return Collected(updates, controls, running.result() if running is not None and updates else None)


def _mean_train_loss(updates: list[ClientUpdate]) -> float | None:
    """The example-weighted mean of the ``train_loss`` the clients reported; a reply without one (a client of
    another version, or a malicious one) is left out of the mean rather than stopping the round, whose global
    state has already moved. None when no client reported a loss."""
    reported = [(float(u.metrics["train_loss"]), u.num_examples) for u in updates if "train_loss" in u.metrics]
    if not reported:
        return None
    losses, weights = zip(*reported)
    return float(np.average(losses, weights=np.asarray(weights, dtype=np.float64)))
