"""The round kit every protocol shares: what a round measured, what the runner drives, how a round picks its
clients and checks a reply. Below every protocol (protocols/sharing, split, distill) and above the runtime."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedcustom.errors import UpdateRejected
from fedcustom.runtime import Reply, Runtime
from fedcustom.training import derive_seed

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
SAMPLING_STREAM = 1  # separates the client-sampling seed from the clients' training seeds


@dataclass
class RoundResult:
    """Everything measured in one round (round 0 is the evaluation of the initial state)."""

    round: int
    eval: dict[str, float]
    clients: list[int] = field(default_factory=list)
    train_loss: float | None = None
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_flops: dict[int, int] = field(default_factory=dict)
    server_flops: dict[int, int] = field(default_factory=dict)  # per client served (split learning only)
    examples_seen: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    epsilon: float | None = None  # DP: the privacy spent so far, at the configured delta
    privacy: dict[str, float] = field(default_factory=dict)  # DP: clipping and noise statistics of the round
    memory: dict[str, float] = field(default_factory=dict)  # peak RSS (and GPU) MB of this process so far
    client_eval: dict[int, float] = field(default_factory=dict)  # each client's headline metric on its held-out rows
    client_eval_personal: dict[int, float] = field(default_factory=dict)  # --personalize: each client's own model's
    simulated_seconds: float | None = None  # --client-profiles: the slowest client's simulated device time
    # per-client evaluation: each node's evaluate message (the raw global tensors) and its reply, in bytes; not in
    # bytes_up/down, which are the training exchange's (the embedded runtime counts what a deployment sends)
    bytes_eval: dict[int, int] = field(default_factory=dict)


class RoundDriver(Protocol):
    """What the runner drives: FederatedServer here, SplitFederatedServer (split learning), DistillServer (KD)."""

    runtime: Runtime
    clients_per_round: int

    @property
    def global_state(self) -> State: ...

    def evaluate_initial(self) -> RoundResult: ...

    def run_round(self, rnd: int, on_reply: Callable[[int], None] | None = None) -> RoundResult: ...

    def state_dict(self) -> tuple[State, dict]:
        """What a checkpoint keeps of the server (tensors, JSON)."""
        ...

    def load_state_dict(self, tensors: State, meta: dict) -> None: ...


def check_reply(reply: Reply) -> None:
    """UpdateRejected unless the client answered without an error and with a positive example count."""
    if reply.error:
        raise UpdateRejected(f"client reported an error: {reply.error}")
    if reply.num_examples <= 0:
        raise UpdateRejected(f"num_examples must be positive, got {reply.num_examples}")


def sample_clients(nodes: list[int], count: int, seed: int, rnd: int) -> list[int]:
    """``count`` distinct nodes for round ``rnd``, reproducible from the seed alone."""
    rng = np.random.default_rng(derive_seed(seed, rnd, SAMPLING_STREAM))
    if count > len(nodes):
        log.warning("round %d: %d clients per round asked, %d reachable; sampling all of them", rnd, count, len(nodes))
    return sorted(int(n) for n in rng.choice(nodes, size=min(count, len(nodes)), replace=False))
