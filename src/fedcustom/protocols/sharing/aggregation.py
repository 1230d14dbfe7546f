"""How a parameter-sharing round's replies become the aggregate the server optimizer applies.

The server runs the same round whatever the aggregation is (sample, collect, check min_available, merge, step the
server optimizer, account, evaluate); privacy composes around that round here, as Flower's DP strategy wrappers and
its SecAgg+ workflow compose around its strategies, instead of branching inside ``FederatedServer``:

- :class:`StrategyAggregation` (default): broadcast the global state, decode and validate each reply as it arrives,
  merge with the server's strategy (one update at a time when the strategy can, then the update is dropped).
- :class:`CentralDPAggregation`: the same collection, merged as DP-FedAvg's clipped, noised mean; the noise comes
  from the run seed and the round, so a resumed run draws the same noise.
- :class:`SecureAggregation`: secure aggregation's four stages; the server sees example counts and metrics, never
  a client's tensors, and gets the FedAvg state from the masked sum.

The assembler picks one (``fedcustom.trust.aggregation_for``); adding another is one class here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedcustom.privacy.dp import CentralDP, dp_noise_generator
from fedcustom.privacy.secure_round import SecureRound
from fedcustom.rounds import RoundResult
from fedcustom.runtime import Message, Reply, Runtime
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.strategies.base import Accumulator

State = dict[str, torch.Tensor]
OnReply = Callable[[int], None] | None


@dataclass
class Collected:
    """A round's valid updates (states empty when merged already), SCAFFOLD's control changes per client, and the
    merge when it was made while the replies arrived (None: merge the updates' states)."""

    updates: list[ClientUpdate]
    controls: dict[int, State] = field(default_factory=dict)
    merged: State | None = None


class RoundServer(Protocol):
    """What an aggregation uses of the server (``FederatedServer``)."""

    runtime: Runtime
    strategy: Strategy
    global_state: State
    seed: int

    def broadcast(self, rnd: int, chosen: list[int], config: dict) -> dict[int, Message]: ...

    def accept(self, replies: Iterator[tuple[int, Reply]], result: RoundResult, messages: dict[int, Message],
               running: Accumulator | None) -> Collected: ...


class Aggregation(Protocol):
    """Collects one round's updates and merges them."""

    def collect(self, server: RoundServer, rnd: int, chosen: list[int], config: dict, result: RoundResult,
                on_reply: OnReply) -> Collected:
        """Send round ``rnd``'s messages to ``chosen``, record bytes and rejections in ``result``."""
        ...

    def merge(self, server: RoundServer, rnd: int, collected: Collected, result: RoundResult) -> State:
        """The aggregate state (called only when enough updates are valid); may record stats in ``result``."""
        ...


def collect_replies(server: RoundServer, rnd: int, chosen: list[int], config: dict, result: RoundResult,
                    on_reply: OnReply, running: Accumulator | None) -> Collected:
    """One training message per client, each reply decoded and validated as it arrives (fed to ``running``)."""
    messages = server.broadcast(rnd, chosen, config)
    collected = server.accept(server.runtime.stream(messages, on_reply), result, messages, running)
    result.bytes_down = {node: len(messages[node].payload) + len(messages[node].attachment) for node in chosen}
    return collected


class StrategyAggregation:
    """The server's strategy merges the updates (the server's ``strategy`` attribute, read each round)."""

    def collect(self, server: RoundServer, rnd: int, chosen: list[int], config: dict, result: RoundResult,
                on_reply: OnReply) -> Collected:
        return collect_replies(server, rnd, chosen, config, result, on_reply,
                               server.strategy.accumulator(server.global_state))

    def merge(self, server: RoundServer, rnd: int, collected: Collected, result: RoundResult) -> State:
        if collected.merged is not None:
            return collected.merged
        return server.strategy.aggregate(server.global_state, collected.updates)


@dataclass
class CentralDPAggregation:
    """DP-FedAvg (client-level central DP): the noised mean of the clipped updates replaces the strategy's merge
    (config checks allow only fedavg with it); its clipping and noise statistics go to ``result.privacy``."""

    dp: CentralDP
    reproducible_noise: bool = False  # --dp-reproducible-noise: noise from the run seed (experiments only)

    def collect(self, server: RoundServer, rnd: int, chosen: list[int], config: dict, result: RoundResult,
                on_reply: OnReply) -> Collected:
        return collect_replies(server, rnd, chosen, config, result, on_reply, running=None)  # clipping needs each

    def merge(self, server: RoundServer, rnd: int, collected: Collected, result: RoundResult) -> State:
        state, stats = self.dp.aggregate(server.global_state, [u.state for u in collected.updates],
                                         dp_noise_generator(self.reproducible_noise, server.seed, rnd))
        result.privacy = {k: float(v) for k, v in stats.items()}
        return state


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation: per-element bound on a client's weighted update, the share that must survive, and the
    round that runs it (this process's SecureRound; on Flower, Flower's SecAgg+, chosen by the assembler)."""

    clip: float
    threshold: float
    protocol: type = SecureRound


@dataclass
class SecureAggregation:
    """A FedAvg round under secure aggregation: the masked sum is the merge."""

    settings: SecAggSettings

    def collect(self, server: RoundServer, rnd: int, chosen: list[int], config: dict, result: RoundResult,
                on_reply: OnReply) -> Collected:
        settings = self.settings
        secure = settings.protocol(server.runtime, rnd, chosen, server.global_state, settings.clip, settings.threshold)
        outcome = secure.run(lambda nodes: server.broadcast(rnd, nodes, config), on_reply)
        result.bytes_up, result.bytes_down, result.rejected = outcome.bytes_up, outcome.bytes_down, outcome.rejected
        updates = [ClientUpdate(node, {}, reply.num_examples, dict(reply.metrics))
                   for node, reply in sorted(outcome.replies.items())]
        for update in updates:
            result.client_flops[update.node_id] = int(update.metrics.get("flops", 0))
        if outcome.mean_update is None:  # aborted: the clients computed, but their passes never reached the model
            return Collected([])
        result.examples_seen += sum(int(u.metrics.get("examples_seen", 0)) for u in updates)
        merged = {k: (v.double() + outcome.mean_update[k].double()).to(v.dtype) for k, v in server.global_state.items()}
        return Collected(updates, merged=merged)

    def merge(self, server: RoundServer, rnd: int, collected: Collected, result: RoundResult) -> State:
        assert collected.merged is not None  # collect returns no updates when the round aborted
        return collected.merged
