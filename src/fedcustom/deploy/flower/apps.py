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
from typing import Any

from flwr.app import ConfigRecord, Context, Message as FlowerMessage, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid, ServerApp

from fedcustom.config import RunConfig, build_config
from fedcustom.deploy.flower import ping
from fedcustom.deploy.flower.pulls import quicker_object_pulls
from fedcustom.deploy.flower.rag import RAG_KINDS, RagJob, handle_rag, job_from_run_config, run_rag_on_grid
from fedcustom.deploy.flower.node import (describe_own_data, keep_client_state, node_client, partition_of,
                                         restore_client_state, simulated_node_client)
from fedcustom.errors import FedCustomError
from fedcustom.protocols import message_kinds
from fedcustom.runtime.flower.records import (DEFAULT_KIND, SETUP_DIGEST, SETUP_MISSING, content_to_message,
                                              reply_to_content, setup_digest)
from fedcustom.runtime.flower.runtime import FlowerRuntime
from fedcustom.runtime.messages import LABELS_KEY, PUBLIC_KEY, ClientSetup, Handler

log = logging.getLogger(__name__)

CONFIG_KEY = "fedcustom-config"  # run config: the resolved RunConfig as JSON
RESUME_KEY = "fedcustom-resume"  # run config: the output folder of an interrupted run to continue (submit --resume)
SETUP_STATE = "fedcustom.setup"  # node context state: the client setup the hello brought (see node_setup)
SAVE_KIND = "save"  # fedcustom.wire.SAVE (not imported here: wire imports the training loop, and torch with it)


def config_to_run_config(cfg: RunConfig) -> dict[str, str]:
    """Flower run config carrying ``cfg``."""
    return {CONFIG_KEY: json.dumps(cfg.to_dict())}


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    if CONFIG_KEY not in run_config:
        raise FedCustomError(f"Flower run config has no {CONFIG_KEY!r} key (keys: {', '.join(run_config) or 'none'}); "
                             f"submit fedcustom runs with `fedcustom submit`")
    return build_config(json.loads(str(run_config[CONFIG_KEY])))


def node_run_config(context: Context) -> RunConfig:
    """A deployed node's config: the submitted run's, except what is the data owner's alone to decide. Whether its
    DP and DP-SGD noise may come from the run seed, which the server knows, is read from the node config's
    ``reproducible-noise`` (default false), never from the run: a server that submitted with
    --dp-reproducible-noise could otherwise regenerate every node's noise and subtract it."""
    cfg = config_from_run_config(context.run_config)
    own = str(context.node_config.get("reproducible-noise", "false")).lower() == "true"
    if cfg.privacy.reproducible_noise and not own:
        log.warning("the run asks for DP noise from the run seed (--dp-reproducible-noise); this node draws it from "
                    "the OS's entropy: only its own node config (reproducible-noise=true) can ask for that")
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, reproducible_noise=own))


# ---------------------------------------------------------------------------------------------- server side
def keep_setup(hello: Any, context: Context) -> None:
    """Keep the client setup a hello brings (label names; distillation's public texts) in this node's context for
    the rest of the run: the server sends it once, and each later message names it by its digest."""
    if LABELS_KEY in hello:
        context.state[SETUP_STATE] = ConfigRecord({k: str(hello[k]) for k in (LABELS_KEY, PUBLIC_KEY) if k in hello})


def node_setup(config: dict[str, Any], context: Context) -> ClientSetup:
    """The client setup a message belongs to (its setup keys taken out of ``config``): the one this node kept from
    the run's hello, or the one the message carries (to a node that said it lost it), which it keeps from then on.
    A node without it (its SuperNode restarted) cannot build its client: a clear error, which the server counts as
    that node failing the round, and answers by sending the setup with the node's next message."""
    digest = config.pop(SETUP_DIGEST, None)
    if digest is None:
        raise FedCustomError(f"message config has no {SETUP_DIGEST!r}: was it sent by a fedcustom ServerApp?")
    if LABELS_KEY in config:
        keep_setup({k: config.pop(k) for k in (LABELS_KEY, PUBLIC_KEY) if k in config}, context)
    kept = dict(context.state[SETUP_STATE]) if SETUP_STATE in context.state else None
    if kept is None or setup_digest(kept) != digest:
        raise FedCustomError(f"this SuperNode {SETUP_MISSING} for this run (label names, public texts: "
                             f"{'none kept' if kept is None else 'it kept another one'}); it was probably restarted "
                             "during the run: the server sends it with the next message")
    return ClientSetup.from_config(kept)


def _grid_runtime(grid: Grid, cfg: RunConfig) -> Any:
    def runtime(_handler: Handler, setup: ClientSetup) -> FlowerRuntime:
        return FlowerRuntime(grid, cfg.federation.clients, cfg.federation.round_timeout, setup=setup)

    return runtime


def run_on_grid(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Build the job with a Flower runtime on ``grid`` and run every round; returns the summary."""
    from fedcustom.runner import build_job, execute  # torch and transformers load with the job, not with the app

    return execute(build_job(cfg, _grid_runtime(grid, cfg)))


def resume_on_grid(grid: Grid, folder: str) -> dict[str, Any]:
    """Continue the run whose last checkpoint is in ``folder`` (on this machine) with the nodes on ``grid``."""
    from fedcustom.runner import resume

    return resume(folder, runtime_for=lambda cfg: _grid_runtime(grid, cfg))


def make_server_app(cfg: RunConfig | None = None, rag: RagJob | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` (training) or ``rag`` (retrieval), or (deployment) for what the run config holds:
    a training run, a retrieval job, a resumed run, or ``fedcustom ping``'s round trips."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        pings = None if cfg or rag else ping.job_from_run_config(context.run_config)
        if pings is not None:
            ping.run_ping_on_grid(grid, pings)
            return
        job = rag or (None if cfg else job_from_run_config(context.run_config))
        if job is not None:
            run_rag_on_grid(grid, job)
            return
        if not cfg and context.run_config.get(RESUME_KEY):
            resume_on_grid(grid, str(context.run_config[RESUME_KEY]))
            return
        run_on_grid(grid, cfg or config_from_run_config(context.run_config))

    return app


# ---------------------------------------------------------------------------------------------- client side
def handle(message: FlowerMessage, context: Context, cfg: RunConfig | None, simulated: bool = False) -> FlowerMessage:
    """Any of our message kinds: hand it to this node's client, with the state the node kept (``simulated``: the
    simulation's nodes share one handler in its actor, which keeps their state as the embedded runtime's does).
    SecAgg+'s training message (our message inside a legacy FitIns) is answered with the client's update as FitRes
    parameters, which Flower's mod masks before the reply leaves the node."""
    secure = "fitins.config" in message.content.config_records
    if secure:
        from fedcustom.runtime.flower.secaggplus import fitins_to_message, update_to_fitres

        ours = fitins_to_message(message.content)
    else:
        ours = content_to_message(message.content)
    config = dict(ours.config)
    if ours.kind == SAVE_KIND and context.node_config.get("output-dir"):  # where this owner keeps its own model
        config["folder"] = str(context.node_config["output-dir"])
    setup = node_setup(config, context)
    run_cfg = cfg or node_run_config(context)
    simulated = simulated and shares_handler(run_cfg)
    node = simulated_node_client(context, run_cfg, setup) if simulated else node_client(context, run_cfg, setup)
    restore_client_state(node, context)
    ours = dataclasses.replace(ours, config=config)
    if secure:
        update, num_examples, metrics = node.handler.plain_update(node.partition, ours)
        content = update_to_fitres(update, num_examples, metrics)
    else:
        content = reply_to_content(node.handler(node.partition, ours))
    if not simulated:
        keep_client_state(node, context)
    return FlowerMessage(content, reply_to=message)


def shares_handler(cfg: RunConfig) -> bool:
    """Whether the run's protocol lets one client handler serve every simulated node (not split learning)."""
    from fedcustom.methods import get_method
    from fedcustom.protocols import protocol_of

    return protocol_of(get_method(cfg.method.name)).shared_handler


def secaggplus_when_asked(message: FlowerMessage, context: Context, call_next: Any) -> FlowerMessage:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (``--secagg``); every other message goes straight on."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def make_client_app(cfg: RunConfig | None = None, rag: RagJob | None = None, simulated: bool = False) -> ClientApp:
    """A ClientApp for ``cfg`` and ``rag``, or (deployment) for what the run config holds; ``simulated``: the
    nodes of Flower's simulation engine, which all run in one actor and share one handler there."""
    app = ClientApp()

    @app.query("fedcustom_hello")
    def hello(message: FlowerMessage, context: Context) -> FlowerMessage:
        answer: dict[str, Any] = {"partition-id": partition_of(context)}
        greeting = message.content["hello"] if "hello" in message.content else {}
        keep_setup(greeting, context)
        labels = greeting.get(LABELS_KEY)
        data_path = context.node_config.get("data-path")
        if labels is not None and data_path:
            answer.update(describe_own_data(cfg or node_run_config(context), json.loads(str(labels)),
                                            str(data_path), answer["partition-id"]))
        return FlowerMessage(RecordDict({"hello": ConfigRecord(answer)}), reply_to=message)

    @app.train(mods=[secaggplus_when_asked])
    def train(message: FlowerMessage, context: Context) -> FlowerMessage:
        return handle(message, context, cfg, simulated)

    # every protocol's kinds besides the default (the registry names them without importing torch); Flower
    # routes message type "train.<kind>" to the function registered as <kind>
    for kind in [k for k in message_kinds() if k != DEFAULT_KIND]:
        app.train(kind)(lambda message, context: handle(message, context, cfg, simulated))
    for kind in RAG_KINDS:  # retrieval: the node answers from its own index (fedcustom.deploy.flower.rag)
        app.train(kind)(lambda message, context: handle_rag(message, context, rag))
    return app


# Every process that loads these apps (a ServerApp, a ClientApp process, a worker) pulls message objects with
# shorter waits than Flower's (:mod:`.pulls`).
quicker_object_pulls()
# What `flwr run` loads (pyproject [tool.flwr.app.components]): the config comes with the run.
server_app = make_server_app()
client_app = make_client_app()
