"""`--runtime flower-sim`: the same ServerApp and ClientApp on Flower's simulation engine (Ray).

The ServerApp runs in a thread of this process and writes the round log, summary and model as the
embedded runtime does; every simulated SuperNode's ClientApp runs in one Ray actor, where the nodes share one
client handler (one model, one tokenized dataset) as the embedded runtime's clients do (split learning keeps one
per node: a pending batch's graph lives in its model). Simulated nodes get
``partition-id`` from Flower and take that partition of the run's dataset.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fedcustom.config import RunConfig
from fedcustom.deploy.flower.apps import make_client_app, make_server_app
from fedcustom.errors import FedCustomError

log = logging.getLogger(__name__)


def backend_config(device: str, cpus: float) -> dict[str, Any]:
    """Ray's resources for the one actor that runs the clients: every core, and every GPU when ``device`` (the run's
    --device) resolves to CUDA. Ray hides the GPUs from an actor that asks for none (it empties
    CUDA_VISIBLE_DEVICES), so asking for 0 made a GPU run's clients train on the CPU (--device auto) or fail every
    message (--device cuda). All GPUs, not one, so that a --device cuda:N names the same card inside the actor."""
    from fedcustom.device import resolve_device

    gpus = float(torch.cuda.device_count()) if resolve_device(device).type == "cuda" else 0.0
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus},
            "init_args": {"num_cpus": int(cpus), "num_gpus": int(gpus)}}


def run_flower_simulation(cfg: RunConfig, actor_cpus: float | None = None) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine; returns the summary the ServerApp wrote."""
    from flwr.simulation import run_simulation

    summary_path = Path(cfg.output.dir).expanduser() / "summary.json"
    summary_path.unlink(missing_ok=True)
    cpus = actor_cpus or float(os.cpu_count() or 1)  # one actor with every core: clients run one after another
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg, simulated=True),
                   num_supernodes=cfg.federation.clients, backend_config=backend_config(cfg.train.device, cpus))
    if not summary_path.is_file():
        raise FedCustomError(f"the Flower simulation ended without writing {summary_path}; see the log above for "
                             f"the ServerApp's error")
    return json.loads(summary_path.read_text())
