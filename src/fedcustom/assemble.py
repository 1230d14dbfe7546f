"""The job assembler: from a RunConfig to the parts of a federated job (tokenizer, data, model, codecs, the
protocol's server and clients). `fedcustom run` (:mod:`fedcustom.runner`) and a Flower node
(:mod:`fedcustom.deploy.flower.node`) both build through here; which server and client a method gets is the
protocol plug-in's business (:mod:`fedcustom.protocols`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel
from torch import nn

from fedcustom.checkpoint import Checkpointable
from fedcustom.codecs import Codec, get_codec
from fedcustom.config import RunConfig
from fedcustom.convergence import check_convergence_support, local_schedule
from fedcustom.data import EvalRows, FederatedData, PublicSpec
from fedcustom.device import place_model, resolve_device
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.methods import Method, get_method, load_trainable_state, trainable_state
from fedcustom.methods.lora_capacity import check_ranks, parse_ranks
from fedcustom.methods.lora_stack import stacks
from fedcustom.methods.prompt_capacity import PROMPT_METHODS, lengths_for
from fedcustom.models import load_model
from fedcustom.personalize import (
    DEFAULT_CLIENT_EVAL_FRACTION, Personalization, add_personal_lora, parse_personalize,
)
from fedcustom.profiles import load_profiles, profile_ranks
from fedcustom.protocols import protocol_of
from fedcustom.protocols.parts import ClientParts, ServerParts
from fedcustom.rounds import RoundDriver
from fedcustom.runtime import ClientSetup, EmbeddedRuntime, Handler, Runtime, SimulatedFaults
from fedcustom.strategies import Strategy, get_strategy
from fedcustom.strategies.lora_stack import LoraStack
from fedcustom.strategies.lora_svd import LoraSvd
from fedcustom.strategies.positions import PositionFedAvg
from fedcustom.tasks import get_task
from fedcustom.training import LocalSchedule
from fedcustom.trust import check_trust_support, client_tables


def prepare_output(path: str) -> Path:
    """Create the output folder and prove it is writable before any training starts."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FedCustomError(f"output directory {path}: not writable ({exc.strerror or exc})") from None
    return out


@dataclass
class Job:
    """A built federated job: the shared model, the data, and the server that drives it."""

    cfg: RunConfig
    method: Method
    model: nn.Module
    tokenizer: Any
    data: FederatedData
    initial: dict[str, torch.Tensor]
    schedule: LocalSchedule
    server: RoundDriver  # FederatedServer, or SplitFederatedServer for --method split
    out: Path
    evaluate_model: Callable[[], dict[str, Any]]  # the task's metrics of ``model`` as it is now
    personalization: Personalization = field(default_factory=Personalization)

    def load_model(self, client: int | None = None) -> None:
        """Put the global model in ``model`` (``client``: that client's own, with its private tensors
        (--personalize) and its LoRA rank (--lora-ranks))."""
        clients = self.in_process_client()
        if hasattr(clients, "load"):
            clients.load(client, self.server.global_state)
        else:
            load_trainable_state(self.model, self.server.global_state)

    def in_process_client(self) -> Any:
        """The client handler in this process that loads states into ``model``: the one the embedded runtime
        calls, or (clients on Flower nodes) the server's own, holding only pretrained private tensors."""
        return getattr(self.server, "in_process", None) or self.server.runtime.local_handler

    def load_pretrained(self) -> None:
        """Put the pretrained model back (the initial trainable tensors and, with --lora-aggregation stack, the
        pretrained backbone weights the rounds merged their updates into): where a centralized baseline starts."""
        stacked = getattr(self.in_process_client(), "stacked", None)
        if stacked is not None:
            stacked.apply(stacked.initial)
        load_trainable_state(self.model, self.initial)

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint must hold: the server, and the state of clients that live in this process."""
        parts: dict[str, Any] = {"server": self.server}
        clients = self.server.runtime.local_handler
        if isinstance(clients, Checkpointable):
            parts["clients"] = clients
        return parts

    @property
    def eval_batch(self) -> int:
        return 2 * self.cfg.train.batch_size

    def client_stats(self) -> list[dict]:
        """Each client's rows and label histogram: as the SuperNodes describe their own files in a deployment,
        else from the partition of the run's dataset."""
        reported = getattr(getattr(self.server, "runtime", None), "node_stats", None)
        if reported:
            return [reported[p] for p in sorted(reported)]
        return self.data.client_stats()

    @property
    def model_dir(self) -> Path:
        """Where the final global adapter (PEFT methods) or whole model (full, split, LoRA merged by stack) is
        saved."""
        whole = self.method.saves_whole_model or not isinstance(self.model, PeftModel) or stacks(self.cfg)
        return self.out / ("model" if whole else "adapter")


def codecs_for(cfg: RunConfig, method: Method) -> tuple[Codec, Codec]:
    """(client-to-server, server-to-client) codecs; chains apply to parameter-sharing methods only."""
    up, down = cfg.codec.up, cfg.codec.down or cfg.codec.up
    if not protocol_of(method).codec_chains and (up, down) != ("raw", "raw"):
        raise FedCustomError(f"--codec {up} / --codec-down {down}: codec chains apply to parameter-sharing methods "
                             f"(full, lora, prompt, prefix); {method.name} sends activations or logits raw")
    return get_codec(up, "codec.up (--codec)"), get_codec(down, "codec.down (--codec-down)")


RuntimeFactory = Callable[[Handler, ClientSetup], Runtime]  # (the in-process client handler, what clients must know)


def embedded_runtime(cfg: RunConfig) -> RuntimeFactory:
    """The default: every client is called in this process (with simulated failures and latency if asked)."""
    fed = cfg.federation
    faults = None
    if fed.client_failure_rate or fed.client_latency or fed.client_profiles:
        faults = SimulatedFaults(fed.client_failure_rate, fed.client_latency, fed.round_timeout, cfg.train.seed,
                                 load_profiles(fed.client_profiles) if fed.client_profiles else ())
    return lambda handler, _labels: EmbeddedRuntime(handler, fed.clients, faults)


def check_runtime_support(cfg: RunConfig) -> None:
    """A clear error, before any Flower process starts, for what a run cannot do (trust features that are
    simulated in this process only; codec chains, server optimizers and drift correction on methods that send
    activations or logits)."""
    method = get_method(cfg.method.name)
    if cfg.federation.client_eval_fraction and protocol_of(method).name != "parameter_sharing":
        raise ConfigError(f"--client-eval-fraction with --method {method.name}: per-client evaluation scores the "
                          f"global model of a parameter-sharing method; {method.name} has no single one per round")
    if parse_personalize(cfg.federation.personalize).enabled and protocol_of(method).name != "parameter_sharing":
        raise ConfigError(f"--personalize with --method {method.name}: personalization keeps part of a "
                          f"parameter-sharing method's tensors with each client; {method.name} sends "
                          f"{protocol_of(method).payload_note}")
    check_lora_capacity(cfg, method)
    check_prompt_capacity(cfg, method)
    check_trust_support(cfg, method)
    check_convergence_support(cfg, method)
    codecs_for(cfg, method)


def check_lora_capacity(cfg: RunConfig, method: Method) -> None:
    """--lora-ranks and --lora-aggregation: LoRA only; svd merges plain client factors (no robust strategy, central
    DP noise or secure aggregation in between)."""
    m, priv = cfg.method, cfg.privacy
    if (m.lora_ranks or m.lora_aggregation != "fedavg") and method.name != "lora":
        raise ConfigError(f"--lora-ranks / --lora-aggregation with --method {method.name}: they shape LoRA adapters; "
                          f"use --method lora")
    parse_ranks(m.lora_ranks, m.lora_r)
    from_profiles = profile_ranks(cfg.federation.client_profiles)
    if from_profiles and method.name != "lora":
        raise ConfigError(f"--client-profiles with lora_rank and --method {method.name}: lora_rank needs --method lora")
    if from_profiles and m.lora_ranks:
        raise ConfigError("--client-profiles with lora_rank and --lora-ranks: both set each client's rank; keep one")
    check_ranks(from_profiles, m.lora_r, f"--client-profiles {cfg.federation.client_profiles}: lora_rank "
                f"{from_profiles}")
    personal = parse_personalize(cfg.federation.personalize).mode
    if m.lora_aggregation == "ffa" and personal == "dual-lora":
        raise ConfigError("--lora-aggregation ffa with --personalize dual-lora: switching both adapters on makes the "
                          "global adapter's A trainable again, so FFA's frozen A would be trained and averaged; use "
                          "--lora-aggregation fedavg or another --personalize mode")
    if m.lora_aggregation != "fedavg" and personal == "lora-b-local":
        raise ConfigError(f"--lora-aggregation {m.lora_aggregation} with --personalize lora-b-local: B stays with "
                          f"each client, so only A is merged (there is no product to average, and ffa would "
                          f"freeze it); use --lora-aggregation fedavg")
    if m.lora_aggregation == "svd":
        clash = [name for name, on in [(f"--strategy {cfg.federation.strategy}", cfg.federation.strategy != "fedavg"),
                                       ("--dp central", priv.dp == "central"), ("--secagg", priv.secagg)] if on]
        if clash:
            raise ConfigError(f"--lora-aggregation svd with {', '.join(clash)}: svd merges the clients' own factors "
                              f"by their products; use --lora-aggregation fedavg or ffa with it")
    if m.lora_aggregation == "stack":
        check_stack_support(cfg)


def check_stack_support(cfg: RunConfig) -> None:
    """--lora-aggregation stack merges the clients' own products into the backbone, which every broadcast then
    carries: plain client factors (no robust strategy, central DP noise or secure aggregation in between), no
    control variate over the backbone (SCAFFOLD) and a full-precision backbone."""
    fed, priv = cfg.federation, cfg.privacy
    personal = parse_personalize(fed.personalize).mode
    clash = [name for name, on in [
        (f"--strategy {fed.strategy}", fed.strategy != "fedavg"), ("--dp central", priv.dp == "central"),
        ("--secagg", priv.secagg), ("--scaffold", fed.scaffold),
        (f"--load-in {cfg.model.load_in}", bool(cfg.model.load_in)),
        (f"--personalize {fed.personalize}", personal in ("dual-lora", "local"))] if on]
    if clash:
        raise ConfigError(f"--lora-aggregation stack with {', '.join(clash)}: stack merges the average of the clients' "
                          f"own B A products into the full-precision backbone each round (FedAvg; --personalize head "
                          f"and finetune:K work); use --lora-aggregation svd or fedavg with it")


def check_prompt_capacity(cfg: RunConfig, method: Method) -> None:
    """--prefix-lengths (or a profile's prefix_length): prompt and prefix tuning, each token averaged over its
    holders (so plain FedAvg of plain client updates)."""
    explicit = bool(cfg.method.prefix_lengths.strip())
    lengths = lengths_for(cfg)
    if not (explicit or lengths):
        return
    where = "--prefix-lengths" if explicit else f"--client-profiles {cfg.federation.client_profiles} (prefix_length)"
    if method.name not in PROMPT_METHODS:
        raise ConfigError(f"{where} with --method {method.name}: lengths are numbers of virtual tokens; use --method "
                          f"{' or '.join(PROMPT_METHODS)}")
    fed, priv = cfg.federation, cfg.privacy
    clash = [name for name, on in [
        (f"--strategy {fed.strategy}", fed.strategy != "fedavg"), ("--dp central", priv.dp == "central"),
        ("--secagg", priv.secagg),
        (f"--personalize {fed.personalize}", parse_personalize(fed.personalize).keeps_private)] if on]
    if clash:
        raise ConfigError(f"{where} with {', '.join(clash)}: each virtual token is averaged over the clients that "
                          f"hold it, from each client's own update (FedAvg, no private tensors; --personalize "
                          f"finetune:K works)")


def strategy_for(cfg: RunConfig) -> Strategy:
    """The configured strategy (``--lora-aggregation svd``: FedAvg of the LoRA products; ``stack``: the same, merged
    into the backbone; per-client prompt lengths:
    FedAvg per virtual token over its holders)."""
    if cfg.method.name == "lora" and cfg.method.lora_aggregation == "svd":
        return LoraSvd()
    if stacks(cfg):
        return LoraStack(cfg.method.lora_alpha / cfg.method.lora_r)
    if cfg.method.name in PROMPT_METHODS:
        lengths, full = lengths_for(cfg), cfg.method.num_virtual_tokens
        if lengths:
            return PositionFedAvg(lambda node: lengths[node % len(lengths)], full)
    return get_strategy(cfg.federation.strategy)


def build_job(cfg: RunConfig, runtime: RuntimeFactory | None = None) -> Job:
    """Load tokenizer, data and model; wire clients, runtime and server. No training yet.

    ``runtime`` carries the messages (default: embedded); a runtime whose clients live elsewhere (Flower)
    ignores the in-process handler it is given."""
    check_runtime_support(cfg)
    method, strategy = get_method(cfg.method.name), strategy_for(cfg)
    runtime = runtime or embedded_runtime(cfg)
    codec, codec_down = codecs_for(cfg, method)
    out = prepare_output(cfg.output.dir)
    tokenizer = get_task(cfg.model.task).load_processor(cfg.model.name, cfg)
    data = prepare_task_data(cfg, method, tokenizer)
    model = build_model(cfg, method, cfg.model.name, data.label_names, tokenizer)
    initial = trainable_state(model)
    personalization = parse_personalize(cfg.federation.personalize)
    personalization.check(initial, method.name)
    schedule = local_schedule(cfg, method)

    evaluate_model = task_evaluator(cfg, model, data, tokenizer)
    tables, adversary = client_tables(cfg, data)
    setup = ClientSetup(data.label_names, data.public)
    parts = ServerParts(cfg, method, model, tokenizer, codec, codec_down, tables, setup, adversary, data=data,
                        initial=initial, schedule=schedule, strategy=strategy, evaluate_model=evaluate_model,
                        runtime=lambda handler: runtime(handler, setup), eval_tables=held_out_rows(data))
    server = protocol_of(method).plugin().build_server(parts)
    carrier = getattr(server, "runtime", None)
    if hasattr(carrier, "partition_examples"):  # a Flower runtime: the partition sizes the server's split gives
        carrier.partition_examples = {c: len(rows) for c, rows in enumerate(data.client_indices)}
    return Job(cfg, method, model, tokenizer, data, initial, schedule, server, out, evaluate_model, personalization)


Tables = dict[int, datasets.Dataset]


def build_client(cfg: RunConfig, setup: ClientSetup, tables: Callable[[Any], tuple[Tables, Tables]]) -> Any:
    """A client handler outside the server's process (a Flower node): the protocol's client for the backbone its
    clients train, over the rows ``tables(tokenizer)`` gives (this node's own: its training rows and the rows it
    holds out for its own evaluation)."""
    method = get_method(cfg.method.name)
    protocol = protocol_of(method).plugin()
    codec, codec_down = codecs_for(cfg, method)
    name = protocol.client_model(cfg)
    tokenizer = get_task(cfg.model.task).load_processor(name, cfg)
    rows, held_out = tables(tokenizer)
    model = build_model(cfg, method, name, setup.label_names, tokenizer)
    return protocol.build_client(ClientParts(cfg, method, model, tokenizer, codec, codec_down, rows, setup,
                                             eval_tables=held_out))


def build_model(cfg: RunConfig, method: Method, name: str, label_names: list[str], tokenizer: Any) -> nn.Module:
    """The backbone ``name`` with its task head (quantized if asked), the method applied, on this process's
    device."""
    device = resolve_device(cfg.train.device)  # before loading: a missing GPU is a one-line error
    backbone = load_model(name, cfg.model.task, label_names, tokenizer, cfg.train.seed, cfg.model.load_in)
    check_positions(cfg, name, backbone, tokenizer)
    model = method.build(backbone, cfg.method, cfg.model.task, tokenizer)
    if parse_personalize(cfg.federation.personalize).mode == "dual-lora":
        model = add_personal_lora(model)
    return place_model(model, device, cfg.train.precision, cfg.train.gradient_checkpointing)


def check_positions(cfg: RunConfig, name: str, backbone: nn.Module, tokenizer: Any) -> None:
    """A model with a learned table of absolute positions (BERT and its kin, GPT-2) cannot take longer inputs than
    the table has rows: torch would fail mid-run on the first long enough batch. Prompt tuning's virtual tokens sit
    in the input too. (Rotary or relative positions have no such table, so no check.)"""
    tables = [module.num_embeddings for name, module in backbone.named_modules()
              if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe")]
    if cfg.model.max_length is None or not tables:
        return
    rows = min(tables)
    limit = min(rows, getattr(tokenizer, "model_max_length", rows) or rows)  # RoBERTa: 514 rows, 512 positions
    virtual = cfg.method.num_virtual_tokens if cfg.method.name == "prompt" else 0
    if cfg.model.max_length + virtual > limit:
        extra = f" plus the {virtual} virtual tokens of prompt tuning" if virtual else ""
        raise ConfigError(f"model.max_length (--max-length) {cfg.model.max_length}{extra} exceeds the {limit} "
                          f"positions model {name!r} can take; use --max-length {limit - virtual} or less")


def prepare_task_data(cfg: RunConfig, method: Method, tokenizer: Any) -> FederatedData:
    """Labelled texts (classification) or instruction rows (causal LM), split over the clients."""
    public = PublicSpec(cfg.method.public_size, cfg.method.public_dataset) if protocol_of(method).public_set else None
    data = get_task(cfg.model.task).prepare_data(cfg, tokenizer, public)
    fraction = held_out_fraction(cfg)
    return data.holding_out(fraction, cfg.train.seed) if fraction else data


def held_out_fraction(cfg: RunConfig) -> float:
    """The share of each client's rows it holds out for its own evaluation (0: none)."""
    fraction = cfg.federation.client_eval_fraction
    if not fraction and parse_personalize(cfg.federation.personalize).enabled:
        fraction = DEFAULT_CLIENT_EVAL_FRACTION  # a personalized model is judged on its own client's rows
    return fraction


def held_out_rows(data: FederatedData) -> dict[int, EvalRows]:
    """Per client with any: the rows it holds out for its own evaluation (none when per-client evaluation is off)."""
    if data.client_eval_indices is None:
        return {}
    return {c: data.client_held_out(c) for c, rows in enumerate(data.client_eval_indices) if rows}


def task_evaluator(cfg: RunConfig, model: nn.Module, data: FederatedData, tokenizer: Any) -> Callable[[], dict]:
    """The task's metrics of ``model`` on the global test set as it is when called (accuracy and macro-F1;
    perplexity, exact match and ROUGE-L of generations)."""
    return get_task(cfg.model.task).evaluator(cfg, model, data.test, tokenizer)
