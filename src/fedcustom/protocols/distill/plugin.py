"""Build the KD-FedLLM server and client from a run's parts (see :mod:`fedcustom.protocols`): the clients' models
(possibly another backbone) and the settings both sides share."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedcustom.config import RunConfig
from fedcustom.data import FederatedData
from fedcustom.device import model_device, place_model
from fedcustom.errors import ConfigError
from fedcustom.methods.base import get_method
from fedcustom.models import load_model, load_tokenizer
from fedcustom.protocols.distill.protocol import DistillClient, DistillServer, KDSettings
from fedcustom.protocols.parts import ClientParts, ServerParts
from fedcustom.tasks import get_task
from fedcustom.trust import clients_per_round


def kd_temperature(cfg: RunConfig) -> float:
    """--kd-temperature, else the task's (2 for classification, 1 for next-token distributions: see
    :mod:`fedcustom.tasks.causal_lm`)."""
    if cfg.method.kd_temperature is not None:
        return cfg.method.kd_temperature
    return get_task(cfg.model.task).kd_temperature


def kd_settings(cfg: RunConfig, public: list[str] | None, label_names: list[str]) -> KDSettings:
    """The settings both sides share, checked: a public set with rows, a supported broadcast."""
    m = cfg.method
    if not public:
        raise ConfigError("method.public_size / --public-dataset: the public set has no rows; KD-FedLLM needs texts "
                          "every party can label")
    heterogeneous = m.client_model is not None and m.client_model != cfg.model.name
    if m.broadcast == "adapter" and heterogeneous:
        raise ConfigError(f"method.broadcast = 'adapter' sends the global tensors, which only fit clients running "
                          f"--model; the clients run {m.client_model!r}: use --broadcast logits")
    return KDSettings(public=public, label_names=label_names, max_length=cfg.model.max_length,
                      temperature=kd_temperature(cfg), topk=m.topk, broadcast=m.broadcast, weighting=m.kd_weighting,
                      distill_epochs=m.distill_epochs, task=cfg.model.task)


def client_side(cfg: RunConfig, model: nn.Module, tokenizer: Any, data: FederatedData) -> tuple[nn.Module, Any, FederatedData]:
    """The model, tokenizer and tokenized rows the clients use: the server's, or those of ``client_model``."""
    name = cfg.method.client_model
    if name is None or name == cfg.model.name:
        return model, tokenizer, data  # one module in memory; each side loads its own state before use
    client_tokenizer = load_tokenizer(name)
    over_vocabulary = get_task(cfg.model.task).knowledge_over_vocabulary
    if over_vocabulary and client_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"method.client_model {name!r}: token-level distillation of a causal LM needs the clients "
                          f"to share the server's tokenizer, and {name!r} tokenizes differently from {cfg.model.name!r}")
    backbone = load_model(name, cfg.model.task, data.label_names, client_tokenizer, cfg.train.seed, cfg.model.load_in)
    client_model = get_method(cfg.method.local_method).build(backbone, cfg.method, cfg.model.task, client_tokenizer)
    client_model = place_model(client_model, model_device(model), cfg.train.precision, cfg.train.gradient_checkpointing)
    if over_vocabulary:
        client_tokenizer.padding_side = "right"
        return client_model, client_tokenizer, data  # the same tokenizer: the same token ids
    return client_model, client_tokenizer, data.retokenized(client_tokenizer, cfg.model.max_length)


def client_model(cfg: RunConfig) -> str:
    """The clients' backbone: ``method.client_model`` (possibly smaller than the server's), else the run's."""
    return cfg.method.client_model or cfg.model.name


def build_client(parts: ClientParts) -> DistillClient:
    """A client on its own node: its model is already the clients' backbone (``client_model``)."""
    settings = kd_settings(parts.cfg, parts.setup.public, parts.setup.label_names)
    return DistillClient(parts.model, parts.tokenizer, parts.codec, parts.tables, settings)


def build_server(parts: ServerParts) -> DistillServer:
    """The global model on the server; the in-process clients train the clients' backbone."""
    cfg, data = parts.cfg, parts.data
    settings = kd_settings(cfg, data.public, data.label_names)
    client_model_, client_tokenizer, client_data = client_side(cfg, parts.model, parts.tokenizer, data)
    tables = {i: client_data.client_table(i) for i in range(cfg.federation.clients)}
    client = DistillClient(client_model_, client_tokenizer, parts.codec, tables, settings)
    return DistillServer(parts.runtime(client), parts.model, parts.tokenizer, parts.codec, settings, parts.schedule,
                         clients_per_round(cfg), cfg.train.seed, parts.evaluate_model)
