"""`--runtime flower-sim`: the same ServerApp and ClientApp on Flower's simulation engine (Ray).

The ServerApp runs in a thread of this process and writes the round log, summary and model as the
embedded runtime does; each simulated SuperNode's ClientApp runs in a Ray actor, which keeps the
model it built between messages. Simulated nodes get ``partition-id`` from Flower and take that
partition of the run's dataset.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedcustom.config import RunConfig
from fedcustom.deploy.flower.apps import make_client_app, make_server_app
from fedcustom.errors import FedCustomError

log = logging.getLogger(__name__)


def run_flower_simulation(cfg: RunConfig, actor_cpus: float | None = None) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine; returns the summary the ServerApp wrote."""
    from flwr.simulation import run_simulation

    summary_path = Path(cfg.output.dir).expanduser() / "summary.json"
    summary_path.unlink(missing_ok=True)
    cpus = actor_cpus or float(os.cpu_count() or 1)  # one actor with every core: clients run one after another
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}, "init_args": {"num_cpus": int(cpus)}}
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                   num_supernodes=cfg.federation.clients, backend_config=backend)
    if not summary_path.is_file():
        raise FedCustomError(f"the Flower simulation ended without writing {summary_path}; see the log above for "
                             f"the ServerApp's error")
    return json.loads(summary_path.read_text())
