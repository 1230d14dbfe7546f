"""Build the SplitFed server and client from a run's parts (see :mod:`fedcustom.protocols`)."""

from __future__ import annotations

from fedcustom.config import RunConfig
from fedcustom.methods.split import SplitModel, cut_model
from fedcustom.protocols.parts import ClientParts, ServerParts
from fedcustom.protocols.split.client import SplitClient
from fedcustom.protocols.split.driver import SplitFederatedServer
from fedcustom.protocols.split.protocol import SplitServer
from fedcustom.trust import clients_per_round


def client_model(cfg: RunConfig) -> str:
    """Both halves are cut from the run's backbone."""
    return cfg.model.name


def _cut(parts: ClientParts) -> SplitModel:
    method = parts.cfg.method
    return cut_model(parts.model, method.cut_layer, head_on_client=method.split_head == "client")


def build_client(parts: ClientParts, split: SplitModel | None = None) -> SplitClient:
    return SplitClient(split or _cut(parts), parts.tokenizer, parts.codec, parts.tables)


def build_server(parts: ServerParts) -> SplitFederatedServer:
    """One cut shared by the server half and the in-process client half (embedded: one model in memory)."""
    cfg, split = parts.cfg, _cut(parts)
    inner = SplitServer(parts.runtime(build_client(parts, split)), split, parts.strategy, parts.codec, parts.schedule,
                        cfg.train.seed)
    return SplitFederatedServer(inner, clients_per_round(cfg), cfg.train.seed, parts.evaluate_model)
