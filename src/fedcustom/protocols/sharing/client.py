"""Client side of a round: decode the global state, train on private data, send back the update.

One ``TrainingClient`` serves every simulated client: they share one backbone in memory, and
what differs per client is only its data (and, for one round, the trainable tensors it loads).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom import scaffold
from fedcustom.attacks import MODEL_POISONING, poison_update
from fedcustom.codecs import Codec, Link, RawCodec, SharedReferences, links_from_state, links_state
from fedcustom.data import EvalRows
from fedcustom.methods import load_trainable_state, trainable_state
from fedcustom.methods.lora_capacity import ClientRanks
from fedcustom.methods.lora_stack import StackedBase
from fedcustom.methods.prompt_capacity import ClientLengths
from fedcustom.personalize import Personalization
from fedcustom.privacy.dp import PrivacyAccountant, dp_noise_generator, privatize_locally
from fedcustom.privacy.dp_sgd import DPSGDSettings
from fedcustom.privacy.secagg import ADVERTISE, SHARE, UNMASK
from fedcustom.privacy.secure_round import TRAIN_MASKED, SecureClientSide
from fedcustom.privacy.secure_round import unpack as unpack_secure
from fedcustom.runtime import Message, Reply
from fedcustom.tensorstate import SEP, group
from fedcustom.training import DriftControl, derive_seed, train_local
from fedcustom.wire import EVALUATE, FINETUNE_STREAM, SAVE, TRAIN, schedule_from_config

SECAGG_KINDS = (ADVERTISE, SHARE, UNMASK)
State = dict[str, torch.Tensor]
ATTACK_STREAM = 5  # separates a simulated attacker's noise from its training seed


@dataclass(frozen=True)
class Adversary:
    """Simulated model poisoning: which nodes send a poisoned update, and how (fedcustom.attacks)."""

    kind: str
    scale: float
    nodes: frozenset[int] = field(default_factory=frozenset)


class CodecOutOfSync(Exception):
    """The server's difference is against a state this client does not hold; the server resets the link."""


@dataclass(frozen=True)
class LocalOutcome:
    """One local session: where the client started, what it sends, its metrics and (SCAFFOLD) the change of
    its control variate, encoded."""

    received: State
    state: State
    metrics: dict[str, float]
    control_change: bytes = b""


class TrainingClient:
    """Handles ``train`` messages for any node id, using that node's own rows."""

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, codec: Codec,
        client_tables: dict[int, datasets.Dataset], codec_down: Codec | None = None,
        adversary: Adversary | None = None, personalization: Personalization | None = None,
        capacity: ClientRanks | ClientLengths | None = None, stacked: StackedBase | None = None,
        eval_tables: dict[int, EvalRows] | None = None,
        score: Callable[[EvalRows], float] | None = None, save_model: Callable[[Path], None] | None = None,
        reproducible_noise: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec  # client to server
        self.codec_down = codec_down or codec  # server to client
        self.client_tables = client_tables
        self.adversary = adversary
        self.sgd_accountants: dict[int, PrivacyAccountant] = {}  # per node: DP-SGD privacy spent on its rows
        self.secure = SecureClientSide()  # secure aggregation sessions, one per node for the round in progress
        # Each node's own ends of its links (in a deployment a client holds just its own two).
        self.links_down: dict[int, Link] = {}
        self.links_up: dict[int, Link] = {}
        self.shared = SharedReferences()  # nodes that rebuilt the same global share one copy of it (embedded)
        self.controls: dict[int, State] = {}  # SCAFFOLD: each node's own control variate c_i
        # SCAFFOLD: each node's last new c_i, kept until the server says it applied that round's change (a rejected
        # or dropped update's change never reached c, so the c_i it came with must not stand either)
        self.pending: dict[int, tuple[int, State]] = {}
        # --personalize: the tensors that never leave a client; each node starts from the pretrained model's and keeps
        # its own between rounds (only the private tensors, so memory grows with them, not with the model)
        self.personalization = personalization or Personalization()
        self.private_initial: State = self.personalization.split(trainable_state(model))[1] \
            if self.personalization.keeps_private else {}  # (no copy of every trainable tensor when there is none)
        self.private: dict[int, State] = {}
        # --lora-ranks / --prefix-lengths: each client's rank on the full-rank adapter, or its prompt's length
        self.capacity = capacity
        # --lora-aggregation stack: the adapted backbone weights arrive with every broadcast and are never sent back
        self.stacked = stacked
        # per-client evaluation on a Flower node: the rows each client holds out, and the task's headline metric of
        # the model as loaded on such rows (the embedded runtime scores in the server's process instead)
        self.eval_tables = eval_tables or {}
        self.score = score
        self.save_model = save_model  # writes the model as loaded to a folder (each client's own, at the end)
        # the client's own setting, never the server's: local DP and DP-SGD noise from the OS's entropy unless this
        # client's config asks for noise from the (server-known) run seed, for experiments
        self.reproducible_noise = reproducible_noise

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every node's ends of its codec links and control variate (for checkpoints of an embedded run)."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {"links_down": links_state("down", self.links_down, tensors),
                "links_up": links_state("up", self.links_up, tensors),
                "sgd_accountants": {str(n): a.state_dict() for n, a in self.sgd_accountants.items()},
                "controls": sorted(self.controls), "private": sorted(self.private),
                "pending": {str(node): rnd for node, (rnd, _) in self.pending.items()}}
        for node, control in self.controls.items():
            tensors.update({f"control.{node}{SEP}{k}": v for k, v in control.items()})
        for node, (_, control) in self.pending.items():
            tensors.update({f"pending.{node}{SEP}{k}": v for k, v in control.items()})
        for node, private in self.private.items():
            tensors.update({f"private.{node}{SEP}{k}": v for k, v in private.items()})
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.links_down = links_from_state("down", meta["links_down"], tensors)
        self.links_up = links_from_state("up", meta["links_up"], tensors)
        self.shared.adopt(self.links_down)
        self.controls = {int(node): group(tensors, f"control.{node}") for node in meta.get("controls", [])}
        self.pending = {int(node): (int(rnd), group(tensors, f"pending.{node}"))
                        for node, rnd in meta.get("pending", {}).items()}
        self.private = {int(node): group(tensors, f"private.{node}") for node in meta.get("private", [])}
        self.sgd_accountants = {}
        for node, state in meta.get("sgd_accountants", {}).items():
            self.sgd_accountants[int(node)] = PrivacyAccountant()
            self.sgd_accountants[int(node)].load_state_dict(state)

    def model_for(self, node_id: int | None, shared: State) -> State:
        """Every trainable tensor of node ``node_id``'s own model: the ``shared`` (global) ones and its private ones
        (None, or a node that has not trained yet: the pretrained model's)."""
        private = self.private.get(node_id, self.private_initial) if node_id is not None else self.private_initial
        return self.personalization.merge(shared, private)

    def load(self, node_id: int | None, shared: State) -> None:
        """Put node ``node_id``'s own model (None: the global one) in place: the shared tensors, its private ones,
        and its LoRA rank or prompt length (--lora-aggregation stack: the broadcast's backbone weights too)."""
        if self.stacked is not None:
            shared, base = self.stacked.split(shared)
            self.stacked.apply(base)
        load_trainable_state(self.model, self.model_for(node_id, shared))
        if self.capacity is not None:
            self.capacity.apply(node_id)

    def __call__(self, node_id: int, message: Message) -> Reply:
        if message.kind == TRAIN:
            return self.train(node_id, message)
        if message.kind == TRAIN_MASKED:
            return self.train_masked(node_id, message)
        if message.kind in SECAGG_KINDS:
            return self.secure.handle(node_id, message, len(self.client_tables[node_id]))
        if message.kind == EVALUATE:
            return self.evaluate(node_id, message)
        if message.kind == SAVE:
            return self.save(node_id, message)
        return Reply(error=f"unknown message kind {message.kind!r}; this client handles {TRAIN!r}, {TRAIN_MASKED!r}, "
                           f"{EVALUATE!r}, {SAVE!r} and {', '.join(SECAGG_KINDS)}")

    def save(self, node_id: int, message: Message) -> Reply:
        """The end of a run with private tensors: this client's own model (the message's global tensors with its
        private ones) written on its own machine, under ``<folder>/clients/<id>/<model_dir>``; replies with the path."""
        if self.save_model is None or not self.personalization.keeps_private:
            return Reply(error="this client keeps no private tensors to save (--personalize head, lora-b-local, "
                               "dual-lora, local-prefix or local)")
        self.load(node_id, RawCodec().decode(message.payload))
        folder = Path(str(message.config["folder"])) / "clients" / str(node_id) / str(message.config["model_dir"])
        self.save_model(folder)
        return Reply(str(folder).encode(), round=message.round)

    def evaluate(self, node_id: int, message: Message) -> Reply:
        """Per-client evaluation: the global model of the message (raw safetensors, off the codec links) and, with
        --personalize, this client's own model, scored on the rows it holds out; metrics only, nothing uploaded. A
        client without held-out rows replies with no metrics."""
        rows = self.eval_tables.get(node_id)
        if self.score is None or rows is None or len(rows) == 0:
            return Reply(b"", 0, {}, round=message.round)
        shared = RawCodec().decode(message.payload)
        self.load(None, shared)
        metrics = {"client_eval": self.score(rows)}
        if self.personalization.enabled:
            self.load(node_id, shared)
            self.finetune(node_id, message.config, message.round)
            metrics["client_eval_personal"] = self.score(rows)
        return Reply(b"", len(rows), metrics, round=message.round)

    def finetune(self, node_id: int, config: dict, rnd: int) -> None:
        """``--personalize finetune:K``: K local steps of the loaded model on this client's training rows, as
        ``config`` (wire.client_eval_config) says; nothing when K is 0."""
        steps = int(config.get("finetune_steps", 0))
        if steps:
            seed = derive_seed(int(config["seed"]), rnd, node_id, FINETUNE_STREAM)
            train_local(self.model, self.client_tables[node_id], self.tokenizer, schedule_from_config(config), seed)

    def _receive(self, node_id: int, message: Message) -> dict:
        """Decode the global state; a difference is applied to this node's last reconstruction."""
        if not self.codec_down.delta:
            return self.codec_down.decode(message.payload)
        base = int(message.config.get("codec_base", 0))
        link = self.links_down.get(node_id) if base else None
        if base and (link is None or link.round != base):
            raise CodecOutOfSync(f"the server sent a difference against round {base}, this client holds round "
                                 f"{link.round if link else 0}")
        link = self.links_down[node_id] = link or Link()
        state = self.codec_down.decode(message.payload, link)
        link.round = message.round
        self.shared.share(link, self.links_down)
        return state

    def train(self, node_id: int, message: Message) -> Reply:
        """Load the global tensors, run the local schedule, reply with the trained tensors."""
        outcome = self._train(node_id, message)
        up = self.links_up.setdefault(node_id, Link())
        up.reference = outcome.received if self.codec.delta else None  # the difference starts where we started
        payload = self.codec.encode(outcome.state, up)
        up.reference = None  # reset to where the next update starts; only the residual (topk) carries over
        return Reply(payload, len(self.client_tables[node_id]), outcome.metrics, round=message.round,
                     attachment=outcome.control_change)

    def plain_update(self, node_id: int, message: Message) -> tuple[State, int, dict[str, float]]:
        """Train as usual and return the update itself (trained minus received tensors), its example count and the
        metrics, for a secure-aggregation protocol that masks it (Flower's SecAgg+)."""
        outcome = self._train(node_id, message)
        update = {name: outcome.state[name].double() - outcome.received[name].double() for name in outcome.state}
        return update, len(self.client_tables[node_id]), outcome.metrics

    def train_masked(self, node_id: int, message: Message) -> Reply:
        """Secure aggregation's third stage: train as usual, upload only the masked update."""
        train_payload, routed = unpack_secure(message.payload)
        outcome = self._train(node_id, dataclasses.replace(message, payload=train_payload))
        num_examples = len(self.client_tables[node_id])
        payload = self.secure.masked_update(node_id, message, routed, outcome.received, outcome.state, num_examples)
        return Reply(payload, num_examples, outcome.metrics, round=message.round)

    def _train(self, node_id: int, message: Message) -> LocalOutcome:
        """Decode, train on this node's rows (with any drift correction the server asked for), and say what
        leaves the client."""
        start = time.perf_counter()
        received = self._receive(node_id, message)
        self.load(node_id, received)
        if self.stacked is not None:  # the backbone weights are in place; the update starts from the adapter
            received = self.stacked.split(received)[0]
        schedule = schedule_from_config(message.config)
        seed = derive_seed(int(message.config["seed"]), message.round, node_id)
        table = self.client_tables[node_id]
        dp_sgd = None
        if "dp_sgd_noise" in message.config:
            dp_sgd = DPSGDSettings(float(message.config["dp_sgd_noise"]), float(message.config["dp_sgd_clip"]),
                                   self.reproducible_noise)
        server_control = scaffold.decode(message.attachment, received, "the server's control variate") \
            if message.config.get("scaffold") else None
        if server_control is not None:
            self._settle(node_id, int(message.config.get("scaffold_settled", 0)))
        own_control = self.controls.get(node_id) or scaffold.zeros_like(received) if server_control else None
        drift = self._drift(message.config, received, server_control, own_control)
        result = train_local(self.model, table, self.tokenizer, schedule, seed, dp_sgd, drift)
        metrics = {
            "train_loss": result.mean_loss, "examples_seen": float(result.examples_seen),
            "steps": float(result.steps), "flops": float(result.flops), "train_seconds": time.perf_counter() - start,
        }
        if dp_sgd:
            metrics["dp_sgd_epsilon"] = self._spend(node_id, dp_sgd, result.steps, schedule.batch_size / len(table),
                                                    float(message.config["dp_sgd_delta"]))
        trained, private = self.personalization.split(trainable_state(self.model))
        if isinstance(self.capacity, ClientLengths):  # the tokens this client does not hold leave as they came
            trained = self.capacity.outgoing(node_id, trained, received)
        if self.personalization.keeps_private:
            self.private[node_id] = private
        change = b""
        if server_control is not None and own_control is not None:
            taken = result.steps - result.skipped_steps  # K: the optimizer steps taken
            new = scaffold.client_update(own_control, server_control, received, trained, taken, schedule.lr)
            change = scaffold.encode({k: new[k] - own_control[k] for k in new})
            if all(torch.isfinite(v).all() for v in new.values()):  # a diverged session's is never kept
                self.pending[node_id] = (message.round, new)
        return LocalOutcome(received, self._outgoing(node_id, message, received, trained), metrics, change)

    def _settle(self, node_id: int, settled: int) -> None:
        """SCAFFOLD: keep this node's pending c_i if the server applied the change it came with (``settled``: the
        last round whose change from this node reached the server's c), else drop it and keep the c_i before."""
        if node_id in self.pending:
            rnd, control = self.pending.pop(node_id)
            if rnd == settled:
                self.controls[node_id] = control

    @staticmethod
    def _drift(config: dict, received: State, server_control: State | None,
               own_control: State | None) -> DriftControl | None:
        """FedProx's anchor and SCAFFOLD's correction c - c_i, when the server asked for them."""
        prox = float(config["prox_mu"]) if "prox_mu" in config else None
        if prox is None and server_control is None:
            return None
        correction = None
        if server_control is not None and own_control is not None:
            correction = {k: server_control[k] - own_control[k] for k in server_control}
        return DriftControl(anchor=received if prox is not None else None, prox_mu=prox, correction=correction)

    def _spend(self, node_id: int, settings: DPSGDSettings, steps: int, sample_rate: float, delta: float) -> float:
        """Account this round's DP-SGD steps on this node's rows; epsilon spent so far."""
        accountant = self.sgd_accountants.setdefault(node_id, PrivacyAccountant())
        for _ in range(steps):
            accountant.step(settings.noise_multiplier, min(1.0, sample_rate))
        return accountant.epsilon(delta)

    def _outgoing(self, node_id: int, message: Message, received: State, state: State) -> State:
        """The trained shared tensors as they leave this client: poisoned if it is a simulated attacker, then
        clipped and noised under local DP (an honest client's privacy does not depend on the server)."""
        seed = int(message.config["seed"])
        adversary = self.adversary
        if adversary and node_id in adversary.nodes and adversary.kind in MODEL_POISONING:
            generator = torch.Generator().manual_seed(derive_seed(seed, message.round, node_id, ATTACK_STREAM))
            state = poison_update(adversary.kind, received, state, adversary.scale, generator)
        if "dp_clip" in message.config:
            generator = dp_noise_generator(self.reproducible_noise, seed, message.round, node_id)
            state = privatize_locally(received, state, float(message.config["dp_clip"]),
                                      float(message.config["dp_noise"]), generator)
        return state
