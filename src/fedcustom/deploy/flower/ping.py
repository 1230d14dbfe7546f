"""``fedcustom ping``: what one message costs on a deployment, apart from any work it carries.

The ServerApp sends a no-op query (the hello our ClientApp answers with the node's partition id, without touching
its model or data) to every SuperNode, ``messages`` times, and times each round trip from the push to the reply:
SuperLink, SuperNode, the node's task process (a ``flwr-clientapp`` process per message, or a persistent
``fedcustom worker``) and back. It writes ``ping.json`` (every sample, per node) to the job's output folder on the
SuperLink's machine, as a training run writes its results there.

The job travels in Flower's run config as JSON (key ``fedcustom-ping``), as a retrieval job does.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PING_KEY = "fedcustom-ping"  # run config: the PingJob as JSON


@dataclass(frozen=True)
class PingJob:
    clients: int  # SuperNodes to wait for and ping
    messages: int = 20  # round trips per node (the first includes a worker's or process's start-up)
    output: str = "runs/ping"
    timeout: float = 120.0  # seconds to wait for one round's replies

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PingJob:
        return cls(**json.loads(text))


def job_from_run_config(run_config: dict[str, Any]) -> PingJob | None:
    text = str(run_config.get(PING_KEY) or "")
    return PingJob.from_json(text) if text else None


def summarize(samples: list[dict[int, float]]) -> dict[str, Any]:
    """Per-message seconds over every node and sample after the first round (which pays start-up costs)."""
    steady = [s for row in samples[1:] for s in row.values()] or [s for row in samples for s in row.values()]
    ordered = sorted(steady)
    return {"messages": len(steady), "median_s": statistics.median(ordered), "mean_s": statistics.fmean(ordered),
            "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max_s": ordered[-1],
            "first_round_s": max(samples[0].values()) if samples and samples[0] else None}


def run_ping_on_grid(grid: Any, job: PingJob) -> dict[str, Any]:
    """Ping every node ``job.messages`` times; write and return the samples and their summary."""
    from fedcustom.runtime.flower.runtime import FlowerRuntime

    runtime = FlowerRuntime(grid, job.clients, job.timeout)
    samples = [runtime.round_trip() for _ in range(job.messages)]
    result = {"job": asdict(job), "summary": summarize(samples),
              "samples": [{str(node): s for node, s in row.items()} for row in samples]}
    out = Path(job.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ping.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
