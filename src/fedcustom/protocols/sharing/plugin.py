"""Build the parameter-sharing server and client from a run's parts (see :mod:`fedcustom.protocols`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedcustom.config import RunConfig
from fedcustom.convergence import convergence_for
from fedcustom.data import EvalRows
from fedcustom.methods.lora_capacity import ClientRanks, parse_ranks
from fedcustom.methods.lora_stack import StackedBase, stacks
from fedcustom.methods.prompt_capacity import PROMPT_METHODS, ClientLengths, lengths_for
from fedcustom.personalize import parse_personalize
from fedcustom.saving import write_model_folder
from fedcustom.profiles import profile_ranks
from fedcustom.protocols.parts import ClientParts, ServerParts
from fedcustom.protocols.sharing.client import TrainingClient
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.tasks import get_task
from fedcustom.trust import aggregation_for, clients_per_round, safeguards_for


def client_model(cfg: RunConfig) -> str:
    """Every client trains the run's own backbone."""
    return cfg.model.name


def build_client(parts: ClientParts) -> TrainingClient:
    cfg = parts.cfg
    ranks = parse_ranks(cfg.method.lora_ranks, cfg.method.lora_r) or profile_ranks(cfg.federation.client_profiles)
    lengths = lengths_for(cfg) if cfg.method.name in PROMPT_METHODS else []
    capacity = ClientRanks(parts.model, ranks) if ranks else ClientLengths(parts.model, lengths) if lengths else None
    stacked = StackedBase(parts.model, cfg.method.lora_alpha / cfg.method.lora_r) if stacks(cfg) else None
    score = held_out_score(cfg, parts.model, parts.tokenizer) if parts.eval_tables else None
    return TrainingClient(parts.model, parts.tokenizer, parts.codec, parts.tables, parts.codec_down, parts.adversary,
                          parse_personalize(cfg.federation.personalize), capacity, stacked, parts.eval_tables, score,
                          model_saver(cfg, parts.method, parts.model, parts.tokenizer), cfg.privacy.reproducible_noise)


def model_saver(cfg: RunConfig, method: Any, model: torch.nn.Module, tokenizer: Any) -> Callable[[Path], None]:
    """Writes ``model`` as it is when called to a folder, as the global model's folder is written
    (:func:`fedcustom.saving.write_model_folder`)."""

    def save(folder: Path) -> None:
        write_model_folder(cfg, method, model, tokenizer, folder)

    return save


def held_out_score(cfg: RunConfig, model: torch.nn.Module, tokenizer: Any) -> Callable[[EvalRows], float]:
    """The task's headline metric of ``model`` (as it is when called) on a client's held-out rows."""
    task = get_task(cfg.model.task)
    return lambda rows: float(task.evaluator(cfg, model, rows, tokenizer)()[task.headline_metric])



def build_server(parts: ServerParts) -> FederatedServer:
    """The server holds (and clients exchange) only the shared tensors; the global model is evaluated with the
    pretrained values of the private ones (--personalize)."""
    cfg, evaluate_model = parts.cfg, parts.evaluate_model
    client = build_client(parts)

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        client.load(None, state)
        return evaluate_model()

    shared = client.personalization.split(parts.initial)[0]
    base = client.stacked.base_state() if client.stacked is not None else {}
    return FederatedServer(
        parts.runtime(client), parts.strategy, parts.codec, {**shared, **base}, evaluate_state,
        parts.schedule, clients_per_round(cfg), cfg.train.seed, parts.codec_down, cfg.federation.min_available,
        safeguards_for(cfg), convergence_for(cfg, parts.method, parts.schedule), aggregation_for(cfg),
        frozenset(base), client,
    )
