"""What a protocol plug-in is given to build its server and its clients: the parts the job assembler
(:mod:`fedcustom.assemble`) has already loaded, so that no protocol loads a model or reads data itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from torch import nn

from fedcustom.codecs import Codec
from fedcustom.config import RunConfig
from fedcustom.data import EvalRows
from fedcustom.runtime import ClientSetup, Handler, Runtime


@dataclass
class ClientParts:
    """One process's client side: the model it trains, the rows of the clients it serves (a Flower node: its
    own), the codecs of its links and the labels (and public set) the server announced."""

    cfg: RunConfig
    method: Any  # fedcustom.methods.Method
    model: nn.Module
    tokenizer: Any
    codec: Codec
    codec_down: Codec
    tables: dict[int, datasets.Dataset]
    setup: ClientSetup
    adversary: Any = None  # fedcustom.protocols.sharing.client.Adversary: simulated poisoning (embedded only)
    # the rows each client holds out for its own evaluation (it scores itself on them when asked: an evaluate message)
    eval_tables: dict[int, EvalRows] = field(default_factory=dict)


@dataclass
class ServerParts(ClientParts):
    """The server's side on top of the in-process client parts: the initial global state, how to evaluate the
    model, the schedule clients follow, the strategy, the data, and the runtime that carries messages to a
    handler (embedded: the in-process client; Flower: ignored, the clients live on the nodes)."""

    data: Any = None  # fedcustom.data.FederatedData
    initial: dict[str, torch.Tensor] | None = None
    schedule: Any = None  # fedcustom.training.LocalSchedule
    strategy: Any = None  # fedcustom.strategies.Strategy
    evaluate_model: Callable[[], dict[str, float]] | None = None
    runtime: Callable[[Handler], Runtime] | None = None
