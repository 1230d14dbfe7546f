"""fedcustom as a Flower app: a ServerApp that drives our rounds through the Grid, and a ClientApp that
hands each message to our client handler.

The run's resolved fedcustom config travels as JSON in Flower's run config (key ``fedcustom-config``),
so the ServerApp and every ClientApp build the same model, method and codecs. Each SuperNode says in
its node config which client it is (``partition-id``) and where its own data lies (``data-path``: a
CSV/TSV/JSONL/Parquet file in any form ``--dataset`` accepts). Without ``data-path`` the node takes
partition ``partition-id`` of the run's dataset, partitioned as in the embedded runtime (Flower's
simulation engine, and tests that compare runtimes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message as FlowerMessage, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedcustom.config import RunConfig, build_config
from fedcustom.errors import FedCustomError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.runtime.flower.records import bytes_record, content_to_message, record_bytes, reply_to_content
from fedcustom.runtime.flower.runtime import FlowerRuntime
from fedcustom.runtime.messages import Handler

log = logging.getLogger(__name__)

CONFIG_KEY = "fedcustom-config"  # run config: the resolved RunConfig as JSON
LABELS_KEY = "fedcustom.labels"  # message config: the server's label names as JSON (clients need the same order)


def config_to_run_config(cfg: RunConfig) -> dict[str, str]:
    """Flower run config carrying ``cfg``."""
    return {CONFIG_KEY: json.dumps(cfg.to_dict())}


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    if CONFIG_KEY not in run_config:
        raise FedCustomError(f"Flower run config has no {CONFIG_KEY!r} key (keys: {', '.join(run_config) or 'none'}); "
                             f"submit fedcustom runs with `fedcustom submit`")
    return build_config(json.loads(str(run_config[CONFIG_KEY])))


# ---------------------------------------------------------------------------------------------- server side
def run_on_grid(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Build the job with a Flower runtime on ``grid`` and run every round; returns the summary."""
    from fedcustom.runner import build_job, execute  # torch and transformers load with the job, not with the app

    def runtime(_handler: Handler, label_names: list[str]) -> FlowerRuntime:
        return FlowerRuntime(grid, cfg.federation.clients, cfg.federation.round_timeout,
                             extra_config={LABELS_KEY: json.dumps(label_names)})

    return execute(build_job(cfg, runtime))


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg``, or (deployment) for the config in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_on_grid(grid, cfg or config_from_run_config(context.run_config))

    return app


# ---------------------------------------------------------------------------------------------- client side
@dataclass
class _NodeClient:
    handler: Handler
    partition: int
    fresh: bool = True  # built in this process and not yet given the state the run kept for this node


STATE_TENSORS, STATE_META = "fedcustom.client-tensors", "fedcustom.client-meta"  # keys in context.state


def restore_client_state(node: _NodeClient, context: Context) -> None:
    """Give a freshly built client what this node kept from earlier messages of the run (codec link
    references and residuals, DP-SGD accountants): a deployed SuperNode runs every message in a new
    process, and Flower keeps ``context.state`` for the node across them."""
    if not node.fresh:
        return
    node.fresh = False
    if STATE_META in context.state and hasattr(node.handler, "load_state_dict"):
        tensors = st_load(record_bytes(context.state[STATE_TENSORS]))
        node.handler.load_state_dict(tensors, json.loads(str(context.state[STATE_META]["meta"])))


def keep_client_state(node: _NodeClient, context: Context) -> None:
    """Store the client's state in ``context.state`` for the next message of this run."""
    if hasattr(node.handler, "state_dict"):
        tensors, meta = node.handler.state_dict()
        context.state[STATE_TENSORS] = bytes_record(st_save({k: v.contiguous() for k, v in tensors.items()}))
        context.state[STATE_META] = ConfigRecord({"meta": json.dumps(meta)})


_CLIENTS: dict[tuple[int, int], _NodeClient] = {}  # (run id, partition) -> handler: built once per process


def partition_of(context: Context) -> int:
    """This SuperNode's client id, from its node config."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise FedCustomError("this SuperNode's node config has no partition-id; start it with "
                             "--node-config \"partition-id=0 data-path='/path/to/own/data.csv'\"")
    return int(value)


def describe_own_data(cfg: RunConfig, label_names: list[str], data_path: str) -> dict[str, Any]:
    """How many rows this node holds and how its labels are spread (for the server's client table and
    summary; the rows themselves stay here)."""
    from fedcustom.data import load_labeled
    from fedcustom.data.partition import label_histogram

    rows = load_labeled(data_path, cfg.data.text_column, cfg.data.label_column, label_names).dataset
    return {"examples": len(rows), "label-histogram": json.dumps(label_histogram(rows["label"], len(label_names)))}


def build_node_client(cfg: RunConfig, label_names: list[str], partition: int, data_path: str | None) -> _NodeClient:
    """The handler one data owner runs: the run's model and method, trained on this node's own rows."""
    from fedcustom.client import TrainingClient
    from fedcustom.data import load_labeled, prepare_data
    from fedcustom.data.features import tokenize
    from fedcustom.methods import get_method
    from fedcustom.models import load_model, load_tokenizer
    from fedcustom.runner import codecs_for

    method = get_method(cfg.method.name)
    codec, codec_down = codecs_for(cfg, method)
    tokenizer = load_tokenizer(cfg.model.name)
    if data_path:
        rows = load_labeled(data_path, cfg.data.text_column, cfg.data.label_column, label_names).dataset
        table = tokenize(rows, tokenizer, cfg.model.max_length)
    else:
        data = prepare_data(cfg.data, cfg.federation.clients, cfg.train.seed, tokenizer, cfg.model.max_length)
        if data.label_names != label_names:
            raise FedCustomError(f"the server's labels {label_names} differ from this node's {data.label_names}")
        table = data.client_table(partition)
    backbone = load_model(cfg.model.name, cfg.model.task, label_names, tokenizer, cfg.train.seed)
    model = method.build(backbone, cfg.method, cfg.model.task)
    log.info("partition %d: %d local rows from %s", partition, len(table), data_path or "the run's dataset")
    return _NodeClient(TrainingClient(model, tokenizer, codec, {partition: table}, codec_down), partition)


def node_client(context: Context, cfg: RunConfig, label_names: list[str]) -> _NodeClient:
    """This node's handler, built on its first message and kept for the life of the process: a Ray actor
    in simulation keeps its model loaded; a deployed SuperNode starts a fresh process per message.

    A module-level function on purpose: the ClientApp's nested functions are pickled by value for each
    simulated message, and a cache they referenced directly would be copied along instead of kept."""
    key = (context.run_id, partition_of(context))
    if key not in _CLIENTS:
        _CLIENTS[key] = build_node_client(cfg, label_names, key[1], context.node_config.get("data-path"))
    return _CLIENTS[key]


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg``, or (deployment) for the config in the run config."""
    app = ClientApp()

    @app.query("fedcustom_hello")
    def hello(message: FlowerMessage, context: Context) -> FlowerMessage:
        answer: dict[str, Any] = {"partition-id": partition_of(context)}
        labels = message.content["hello"].get(LABELS_KEY) if "hello" in message.content else None
        data_path = context.node_config.get("data-path")
        if labels is not None and data_path:
            answer.update(describe_own_data(cfg or config_from_run_config(context.run_config), json.loads(str(labels)),
                                            str(data_path)))
        return FlowerMessage(RecordDict({"hello": ConfigRecord(answer)}), reply_to=message)

    @app.train()
    def train(message: FlowerMessage, context: Context) -> FlowerMessage:
        ours = content_to_message(message.content)
        config = dict(ours.config)
        label_names = json.loads(str(config.pop(LABELS_KEY, "null")))
        if label_names is None:
            raise FedCustomError(f"message config has no {LABELS_KEY!r}: was it sent by a fedcustom ServerApp?")
        node = node_client(context, cfg or config_from_run_config(context.run_config), label_names)
        restore_client_state(node, context)
        reply = node.handler(node.partition, dataclasses.replace(ours, config=config))
        keep_client_state(node, context)
        return FlowerMessage(reply_to_content(reply), reply_to=message)

    return app


# What `flwr run` loads (pyproject [tool.flwr.app.components]): the config comes with the run.
server_app = make_server_app()
client_app = make_client_app()
