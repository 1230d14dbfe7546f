"""SplitFed behind the server interface the runner drives (``evaluate_initial``, ``run_round``,
``global_state``), so `fedcustom run --method split` logs, summarizes and saves like every method."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fedcustom.methods.base import trainable_state
from fedcustom.protocols.split.protocol import SplitServer
from fedcustom.rounds import RoundResult, sample_clients


class SplitFederatedServer:
    """Samples clients, runs a SplitFed round, puts the merged client half in the model and evaluates."""

    def __init__(self, inner: SplitServer, clients_per_round: int, seed: int,
                 evaluate: Callable[[], dict[str, float]]) -> None:
        self.inner = inner
        self.runtime = inner.runtime
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.evaluate = evaluate

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The server's state for checkpoints (the clients keep none between rounds)."""
        return self.inner.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.inner.load_state_dict(tensors, meta)

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The whole global model: the merged client half plus the server half."""
        self.inner.load_global()
        return trainable_state(self.inner.split.model)

    def evaluate_initial(self) -> RoundResult:
        self.inner.load_global()
        return RoundResult(round=0, eval=self.evaluate())

    def run_round(self, rnd: int, on_reply: Callable[[int], None] | None = None) -> RoundResult:
        start = time.perf_counter()
        chosen = sample_clients(self.runtime.nodes(), self.clients_per_round, self.seed, rnd)
        split = self.inner.run_round(rnd, chosen, on_reply)
        self.inner.load_global()
        return RoundResult(
            round=rnd, eval=self.evaluate(), clients=chosen, train_loss=split.train_loss, bytes_up=split.bytes_up,
            bytes_down=split.bytes_down, client_flops=split.client_flops, server_flops=split.server_flops,
            examples_seen=split.examples_seen, rejected=split.rejected, wall_seconds=time.perf_counter() - start,
        )
