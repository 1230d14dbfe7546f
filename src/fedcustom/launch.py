"""Run a config on the runtime it names: embedded (:mod:`fedcustom.runner`, in this process) or Flower's
simulation engine (:mod:`fedcustom.deploy.flower.sim`). Sits above both, so that neither imports the other;
a real SuperLink run is submitted instead (`fedcustom submit`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the federated job (and the centralized baseline when asked) on ``cfg.federation.runtime``; return the
    summary."""
    if cfg.federation.runtime == "flower-sim":
        from fedcustom.assemble import check_runtime_support
        from fedcustom.deploy.flower.sim import run_flower_simulation  # flwr loads only for Flower runs

        check_runtime_support(cfg)
        return run_flower_simulation(cfg)
    if cfg.federation.runtime == "flower":
        raise FedCustomError("--runtime flower runs as a ServerApp on a SuperLink: submit it with "
                             "`fedcustom submit --superlink HOST:8000 --config FILE` (see README, Deploy across machines)")
    from fedcustom.runner import run as run_embedded  # torch and transformers load once the config is valid

    return run_embedded(cfg, console)
