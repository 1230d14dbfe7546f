"""Experiment tracking: each round's global and per-client figures, the config and the final adapter, sent to
TensorBoard and/or MLflow as the run goes (``--tracker tensorboard --tracker mlflow``).

Both write inside the run's output folder by default (``DIR/tensorboard``; for MLflow a SQLite store ``DIR/mlflow.db``
with artifacts in ``DIR/mlartifacts``), so nothing needs a server; ``--tracker-uri`` points MLflow at a tracking server or another store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from fedcustom.errors import ConfigError, FedCustomError

TRACKERS = ("tensorboard", "mlflow")
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # what a tracker imports
# the summary's figures a tracker records at the end: headline metrics, baselines, gaps, per-client statistics (mean,
# std, worst 10% of the global and of each client's own model) and client compute
SUMMARY_METRICS = ("final_", "centralized", "gap_", "client_")
EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic"}  # what `pip install` a tracker needs


class Tracker(Protocol):
    def log_round(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool = False) -> None: ...


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one round-log record, as flat metric names (global first, then per client)."""
    metrics = {key: float(value) for key, value in record.items()
               if (key.startswith(("eval_", "client_eval_"))
                   or key in ("train_loss", "wall_seconds", "epsilon", "examples_seen"))
               and isinstance(value, (int, float)) and not isinstance(value, bool)}
    for name in ("client_eval", "client_eval_personal"):  # each client's held-out metric (global / own model)
        metrics.update({f"client_{client}/{name}": float(value) for client, value in (record.get(name) or {}).items()
                        if isinstance(value, (int, float))})
    for name in ("bytes_up", "bytes_down", "client_flops"):
        per_client = record.get(name) or {}
        metrics[f"{name}_total"] = float(sum(per_client.values()))
        metrics.update({f"client_{client}/{name}": float(value) for client, value in per_client.items()})
    metrics["clients"] = float(len(record.get("clients", [])))
    metrics["rejected"] = float(len(record.get("rejected", {})))
    if isinstance(record.get("memory"), dict):
        metrics.update({f"memory/{k}": float(v) for k, v in record["memory"].items() if isinstance(v, (int, float))})
    return metrics


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """``section.key`` -> value as text (MLflow parameters are strings)."""
    return {f"{section}.{key}": json.dumps(value) if not isinstance(value, str) else value
            for section, values in config.items() for key, value in values.items()}


class TensorBoardTracker:
    """Scalars per round (global, and per client under ``client_N/``), the config as text."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedCustomError(f"--tracker tensorboard needs the tensorboard package: pip install "
                                 f"{EXTRA['tensorboard']}") from None
        # purge_step=0: a resumed run logs its whole history again, replacing what the interrupted process wrote
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=0)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log_round(self, record: dict[str, Any]) -> None:
        for name, value in round_metrics(record).items():
            self.writer.add_scalar(name, value, record["round"])
        self.writer.flush()

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool = False) -> None:
        for key, value in summary.items():
            if key.startswith(SUMMARY_METRICS) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"summary/{key}", float(value), int(summary.get("rounds", 0)))
        self.writer.close()


EXPERIMENT = "fedcustom"


def local_store(out: Path) -> str:
    """The MLflow tracking URI of a run folder's own store (``mlflow ui --backend-store-uri`` takes it)."""
    return f"sqlite:///{(out.resolve() / 'mlflow.db').as_posix()}"


class MLflowTracker:
    """One MLflow run per process: the config as parameters, metrics per round (step = round), the summary's final
    figures, and the adapter folder, summary and report as artifacts."""

    def __init__(self, out: Path, config: dict[str, Any], uri: str | None) -> None:
        try:
            import mlflow
        except ImportError:
            raise FedCustomError(f"--tracker mlflow needs MLflow: pip install {EXTRA['mlflow']}") from None
        self.mlflow = mlflow
        if uri is None:  # a SQLite store in the run folder (MLflow 3 refuses new file stores), artifacts beside it
            mlflow.set_tracking_uri(local_store(out))
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                mlflow.create_experiment(EXPERIMENT, artifact_location=(out.resolve() / "mlartifacts").as_uri())
        else:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)
        self.run = mlflow.start_run(run_name=out.name)
        mlflow.log_params(flat_params(config))

    def log_round(self, record: dict[str, Any]) -> None:
        metrics = {name.replace("/", "."): value for name, value in round_metrics(record).items()}
        self.mlflow.log_metrics(metrics, step=int(record["round"]))

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool = False) -> None:
        final = {key: float(value) for key, value in summary.items()
                 if key.startswith(SUMMARY_METRICS) and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if final:
            self.mlflow.log_metrics(final)
        for path in artifacts:
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def check_installed(names: tuple[str, ...]) -> None:
    """Fail before the job is built when a tracker's package is missing (not minutes into the run)."""
    import importlib.util

    for name in names:
        if name in MODULES and importlib.util.find_spec(MODULES[name]) is None:
            raise ConfigError(f"--tracker {name} needs the {MODULES[name]} package: pip install {EXTRA[name]}")


class Trackers:
    """The trackers a config asks for, fed together."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict[str, Any], uri: str | None = None) -> None:
        self.trackers: list[Tracker] = []
        try:
            for name in dict.fromkeys(n for n in names if n != "none"):
                if name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(out, config))
                elif name == "mlflow":
                    self.trackers.append(MLflowTracker(out, config, uri))
                else:
                    raise FedCustomError(f"--tracker {name!r}: expected one of {', '.join(TRACKERS)} or none")
        except BaseException:  # the ones already started are closed, not left open
            self.finish({}, [], failed=True)
            raise

    def log_round(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_round(record)

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(summary, artifacts, failed)
