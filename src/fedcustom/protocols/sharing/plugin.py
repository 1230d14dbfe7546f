"""Build the parameter-sharing server and client from a run's parts (see :mod:`fedcustom.protocols`)."""

from __future__ import annotations

import torch

from fedcustom.config import RunConfig
from fedcustom.convergence import convergence_for
from fedcustom.methods import load_trainable_state
from fedcustom.protocols.parts import ClientParts, ServerParts
from fedcustom.protocols.sharing.client import TrainingClient
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.trust import clients_per_round, safeguards_for


def client_model(cfg: RunConfig) -> str:
    """Every client trains the run's own backbone."""
    return cfg.model.name


def build_client(parts: ClientParts) -> TrainingClient:
    return TrainingClient(parts.model, parts.tokenizer, parts.codec, parts.tables, parts.codec_down, parts.adversary)


def build_server(parts: ServerParts) -> FederatedServer:
    cfg, model, evaluate_model = parts.cfg, parts.model, parts.evaluate_model

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable_state(model, state)
        return evaluate_model()

    return FederatedServer(
        parts.runtime(build_client(parts)), parts.strategy, parts.codec, parts.initial, evaluate_state,
        parts.schedule, clients_per_round(cfg), cfg.train.seed, parts.codec_down, cfg.federation.min_available,
        safeguards_for(cfg), convergence_for(cfg, parts.method, parts.schedule),
    )
