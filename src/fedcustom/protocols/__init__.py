"""Federated protocols as plug-ins: how the server and the clients of a run talk.

A method (``fedcustom.methods``) is a model transform that names the protocol it speaks; a protocol is a folder
here with a ``plugin`` module that builds its server and its client from a run's parts (:mod:`.parts`). The three:

- ``parameter_sharing`` (``protocols/sharing``): FedLLM; trainable tensors down, updates up, a strategy merges.
- ``split`` (``protocols/split``): Split-FedLLM; activations up and gradients down for every batch.
- ``distill`` (``protocols/distill``): KD-FedLLM; logits on a public set up, soft labels or an adapter down.

This module is the registry, and deliberately imports neither torch nor the plug-ins: the Flower app reads the
message kinds from it when it loads, and a plug-in is imported only when a run needs it (as PEFT maps a method
name to its tuner). Adding a protocol is one folder with a ``plugin`` module plus one ``register`` call below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fedcustom.errors import FedCustomError
from fedcustom.registry import Registry


@dataclass(frozen=True)
class ProtocolSpec:
    """What the runner, the Flower apps, the config checks and the summary need to know about a protocol.

    The plug-in module (``module``) provides ``build_server(parts: ServerParts) -> RoundDriver``,
    ``build_client(parts: ClientParts) -> Handler`` and ``client_model(cfg) -> str`` (the backbone a client
    loads)."""

    name: str
    module: str
    message_kinds: tuple[str, ...]  # every kind its server sends (besides secure aggregation's)
    payload_note: str  # what the byte counts in the round log are, for summary.json
    codec_chains: bool = False  # whether --codec chains apply to its payloads (else raw only)
    server_features: bool = False  # DP, SecAgg, attacks, faults, server optimizers and drift correction apply
    public_set: bool = False  # whether the data preparation carves a public set for it
    # whether one client handler may serve nodes whose messages interleave (Flower's simulation shares one in its
    # actor); split learning keeps a pending batch's autograd graph in its model between messages: one per node
    shared_handler: bool = True

    def plugin(self) -> ModuleType:
        """The module that builds this protocol's server and client (imported on first use)."""
        return importlib.import_module(self.module)


_REGISTRY: Registry[ProtocolSpec] = Registry("protocol")


def register(spec: ProtocolSpec) -> ProtocolSpec:
    return _REGISTRY.register(spec.name, spec)


def get_protocol(name: str) -> ProtocolSpec:
    """The registered protocol ``name`` (a method's ``protocol``)."""
    return _REGISTRY.get(name)


def protocol_of(method: Any) -> ProtocolSpec:
    """The protocol a method (``fedcustom.methods.Method``) speaks."""
    return get_protocol(method.protocol)


def protocol_names() -> list[str]:
    return _REGISTRY.names()


def message_kinds() -> tuple[str, ...]:
    """Every message kind of every protocol, for a client app that must accept them all."""
    return tuple(kind for spec in _REGISTRY for kind in spec.message_kinds)


def require_server_features(asked: list[str], method: Any) -> None:
    """A clear error when features that need the parameter-sharing round are asked of a method whose protocol
    exchanges activations or logits instead."""
    if asked and not protocol_of(method).server_features:
        from fedcustom.methods import method_names  # the method registry imports torch: only on this error path

        sharing = ", ".join(method_names("parameter_sharing"))
        raise FedCustomError(f"{', '.join(asked)}: apply to the parameter-sharing methods ({sharing}); "
                             f"--method {method.name} exchanges activations or logits")


register(ProtocolSpec(
    "parameter_sharing", "fedcustom.protocols.sharing.plugin", ("train", "evaluate", "save"),
    "bytes are the encoded safetensors payload of the method's trainable tensors, task head included",
    codec_chains=True, server_features=True,
))
register(ProtocolSpec(
    "split", "fedcustom.protocols.split.plugin",
    ("split_begin", "split_head", "split_backward"),
    "bytes are every per-batch message (activations, masks and labels up; gradients down) plus the client "
    "half's weights at the start and end of a round; server FLOPs are per client served",
    shared_handler=False,
))
register(ProtocolSpec(
    "distill", "fedcustom.protocols.distill.plugin", ("distill_round",),
    "bytes up are the encoded logits (or top-k soft labels) on the public set; bytes down the broadcast "
    "(global soft labels, or the global adapter); server FLOPs (distillation) are split evenly over the "
    "clients whose knowledge was used",
    public_set=True,
))
