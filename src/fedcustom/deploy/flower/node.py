"""One data owner's side of a Flower run: the client handler a SuperNode builds from the run's config and its
own data, and the state it keeps in Flower's ``context.state`` between messages.

A deployed SuperNode runs every message in a new ClientApp process; a simulated one (Ray actor) keeps the
process. The handler is built once per process and cached; whatever it must remember across messages
(codec link references, DP-SGD accountants, a split session, a distillation client's own model) travels
through ``context.state``, which Flower keeps for the node across the run. The simulation's nodes all run in
one actor, and share one handler there, as the embedded runtime's clients do (:func:`simulated_node_client`;
split learning keeps one per node).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError
from fedcustom.runtime.flower.records import bytes_record, record_bytes
from fedcustom.runtime.messages import ClientSetup, Handler

log = logging.getLogger(__name__)

STATE_TENSORS, STATE_META = "fedcustom.client-tensors", "fedcustom.client-meta"  # keys in context.state


@dataclass
class NodeClient:
    handler: Handler
    partition: int
    fresh: bool = True  # built in this process and not yet given the state the run kept for this node


_CLIENTS: dict[tuple[int, int], NodeClient] = {}  # (run id, partition) -> handler: built once per process


def restore_client_state(node: NodeClient, context: Context) -> None:
    """Give a freshly built client what this node kept from earlier messages of the run."""
    if not node.fresh:
        return
    node.fresh = False
    if STATE_META in context.state and hasattr(node.handler, "load_state_dict"):
        tensors = st_load(record_bytes(context.state[STATE_TENSORS]))
        node.handler.load_state_dict(tensors, json.loads(str(context.state[STATE_META]["meta"])))


_PERSISTENT = False  # this process serves one node for the whole run (fedcustom worker): see keep_client_state


def serve_persistently() -> None:
    """Mark this process as a node's persistent worker: its clients stay in memory from message to message."""
    global _PERSISTENT
    _PERSISTENT = True


def keep_client_state(node: NodeClient, context: Context) -> None:
    """Store the client's state in ``context.state`` for the next message of this run.

    In a persistent worker the client in memory is what the next message uses; the context copy only lets a
    restarted worker continue. So while a round is in flight (split learning's session: the client half, its
    optimizer moments and the pending batch, about 200 MB for MiniLM at cut layer 3, three times per batch) the
    context keeps the state from before the round: a worker killed mid-round loses that round, as a killed node
    does, and continues from the next one."""
    if _PERSISTENT and getattr(node.handler, "in_round", lambda: False)():
        return
    if hasattr(node.handler, "state_dict"):
        tensors, meta = node.handler.state_dict()
        context.state[STATE_TENSORS] = bytes_record(st_save({k: v.contiguous() for k, v in tensors.items()}))
        context.state[STATE_META] = ConfigRecord({"meta": json.dumps(meta)})


def partition_of(context: Context) -> int:
    """This SuperNode's client id, from its node config."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedCustomError("this SuperNode's node config has no partition-id; start it with "
                             "--node-config \"partition-id=0 data-path='/path/to/own/data.csv'\"")
    return int(value)


def describe_own_data(cfg: RunConfig, label_names: list[str], data_path: str, partition: int) -> dict[str, Any]:
    """How many rows this node trains on and how their labels (causal LM: topics) are spread, for the server's
    client table and summary; the rows themselves stay here. With per-client evaluation the rows it holds out
    (the same draw as :func:`_own_tables`) are not counted."""
    from fedcustom.data.partition import label_histogram
    from fedcustom.tasks import get_task

    labels = get_task(cfg.model.task).own_labels(cfg, label_names, data_path)
    split = _own_hold_out(cfg, len(labels), partition)
    if split is not None:
        labels = [labels[i] for i in split[0]]
    histogram = label_histogram([label for label in labels if label is not None], len(label_names))
    return {"examples": len(labels), "label-histogram": json.dumps(histogram)}


def _own_hold_out(cfg: RunConfig, count: int, partition: int) -> tuple[list[int], list[int]] | None:
    """Which of a node's ``count`` own rows it trains on and which it holds out for its own evaluation (sorted
    positions; the simulation's draw for this partition), or None when per-client evaluation is off."""
    from fedcustom.assemble import held_out_fraction
    from fedcustom.data import hold_out

    fraction = held_out_fraction(cfg)
    if not fraction:
        return None
    keep, held = hold_out(count, fraction, cfg.train.seed, partition)
    return sorted(keep), sorted(held)


def _own_tables(cfg: RunConfig, setup: ClientSetup, partition: int, data_path: str | None,
                tokenizer: Any) -> tuple[Any, Any]:
    """This node's tokenized rows for training, and the rows it holds out for its own evaluation (with their
    prompts and answers for a causal LM; None when per-client evaluation is off): its own file (held out as the
    simulation would draw it for this partition), or (simulation) its partition of the run's dataset, prepared as
    the server prepares it."""
    if data_path:
        from fedcustom.tasks import get_task

        rows = get_task(cfg.model.task).own_rows(cfg, setup.label_names, data_path, tokenizer)
        split = _own_hold_out(cfg, len(rows), partition)
        if split is None:
            return rows.table, None
        return rows.table.select(split[0]), rows.select(split[1])
    data = _run_data(cfg, setup, tokenizer)
    held = data.client_held_out(partition) if data.client_eval_indices is not None else None
    return data.client_table(partition), held


def _run_data(cfg: RunConfig, setup: ClientSetup, tokenizer: Any) -> Any:
    """The run's dataset, partitioned and tokenized as the server prepares it (a node without its own data file),
    checked to have the server's labels in the server's order."""
    from fedcustom.assemble import prepare_task_data
    from fedcustom.methods import get_method

    data = prepare_task_data(cfg, get_method(cfg.method.name), tokenizer)
    if data.label_names != setup.label_names:
        raise FedCustomError(f"the server's labels {setup.label_names} differ from this node's {data.label_names}")
    return data


def build_node_client(cfg: RunConfig, setup: ClientSetup, partition: int, data_path: str | None) -> NodeClient:
    """The handler one data owner runs (the job assembler's client for this run's protocol), trained on this
    node's own rows (and scoring itself on the rows it holds out)."""
    from fedcustom.assemble import build_client

    def own_rows(tokenizer: Any) -> tuple[dict[int, Any], dict[int, Any]]:
        table, held = _own_tables(cfg, setup, partition, data_path, tokenizer)
        log.info("partition %d: %d local rows from %s%s", partition, len(table), data_path or "the run's dataset",
                 f", {len(held)} held out for its own evaluation" if held is not None else "")
        return {partition: table}, ({partition: held} if held is not None else {})

    return NodeClient(build_client(cfg, setup, own_rows), partition)


def own_device(cfg: RunConfig, context: Context) -> RunConfig:
    """The run's config with this node's own ``device`` from its node config, if it names one (else the run's
    --device, ``auto`` by default, resolved on this machine)."""
    device = context.node_config.get("device")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=str(device))) if device else cfg


_SIMULATED: dict[int, Handler] = {}  # run id -> the one handler every simulated node of the run shares


def simulated_node_client(context: Context, cfg: RunConfig, setup: ClientSetup) -> NodeClient:
    """A simulated node's client: one handler per run serves every partition in the simulation's actor, over
    the partitions of the run's dataset, as the embedded runtime's one handler does; a handler per node held a
    backbone and a tokenized copy of the whole dataset per client (ten clients: ten models in one process). It
    lives as long as the actor, so no node copies it into its context (each copy would hold every node's state):
    an actor Ray replaces starts every node from zero, as the embedded clients would in a new process."""
    if context.run_id not in _SIMULATED:
        _SIMULATED.clear()  # an actor that ran an earlier simulation: its handler is done
        _SIMULATED[context.run_id] = build_simulated_handler(cfg, setup)
    return NodeClient(_SIMULATED[context.run_id], partition_of(context), fresh=False)


def build_simulated_handler(cfg: RunConfig, setup: ClientSetup) -> Handler:
    """The handler of every simulated node: the job assembler's client over each partition's rows (and the rows it
    holds out for its own evaluation), prepared as the server prepares them."""
    from fedcustom.assemble import build_client, held_out_rows

    def every_partition(tokenizer: Any) -> tuple[dict[int, Any], dict[int, Any]]:
        data = _run_data(cfg, setup, tokenizer)
        return {p: data.client_table(p) for p in range(cfg.federation.clients)}, held_out_rows(data)

    return build_client(cfg, setup, every_partition)


def node_client(context: Context, cfg: RunConfig, setup: ClientSetup) -> NodeClient:
    """This node's handler, built on its first message and kept for the life of the process: a Ray actor
    in simulation keeps its model loaded; a deployed SuperNode starts a fresh process per message.

    A module-level function on purpose: the ClientApp's nested functions are pickled by value for each
    simulated message, and a cache they referenced directly would be copied along instead of kept."""
    key = (context.run_id, partition_of(context))
    if key not in _CLIENTS:
        _CLIENTS[key] = build_node_client(own_device(cfg, context), setup, key[1], context.node_config.get("data-path"))
    return _CLIENTS[key]
