"""What a run shows and writes: progress bar, tables, the JSONL round log and summary.json."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcustom.rounds import RoundResult
from fedcustom.tasks import get_task, task_names


# What each task's evaluation reports (key, column title); the first is the headline number.
TASK_METRICS: dict[str, tuple[tuple[str, str], ...]] = {name: get_task(name).metrics for name in task_names()}


def round_record(result: RoundResult) -> dict[str, Any]:
    """One JSON-ready line of the round log (per-client dicts keyed by client id as text)."""
    per_client = lambda d: {str(k): v for k, v in sorted(d.items())}  # noqa: E731
    return {
        "round": result.round,
        **{f"eval_{k}": v for k, v in result.eval.items()},
        "train_loss": result.train_loss,
        "clients": result.clients,
        "bytes_up": per_client(result.bytes_up),
        "bytes_down": per_client(result.bytes_down),
        "client_flops": per_client(result.client_flops),
        "server_flops": per_client(result.server_flops),
        "examples_seen": result.examples_seen,
        "rejected": per_client(result.rejected),
        "wall_seconds": result.wall_seconds,
        **({"simulated_seconds": result.simulated_seconds} if result.simulated_seconds is not None else {}),
        "memory": result.memory,
        "epsilon": result.epsilon,
        "privacy": result.privacy,
        **({"client_eval": per_client(result.client_eval), **client_eval_stats(result.client_eval)}
           if result.client_eval else {}),
        **({"client_eval_personal": per_client(result.client_eval_personal),
            **client_eval_stats(result.client_eval_personal, "client_eval_personal")}
           if result.client_eval_personal else {}),
        **({"bytes_eval": per_client(result.bytes_eval)} if result.bytes_eval else {}),
    }


def client_eval_stats(values: dict[int, float], prefix: str = "client_eval") -> dict[str, float]:
    """Mean, standard deviation and the worst 10% (the mean of the lowest tenth of clients, at least one) of the
    clients' held-out metric: how evenly the global (or each client's own) model serves them."""
    ordered = sorted(values.values())
    worst = ordered[: max(1, len(ordered) // 10)]
    return {f"{prefix}_mean": statistics.fmean(ordered), f"{prefix}_std": statistics.pstdev(ordered),
            f"{prefix}_worst10": statistics.fmean(worst)}


def result_from_record(record: dict[str, Any]) -> RoundResult:
    """Inverse of :func:`round_record` (for a resumed run's earlier rounds)."""
    per_client = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    return RoundResult(
        round=record["round"], eval={k[5:]: v for k, v in record.items() if k.startswith("eval_")},
        clients=list(record["clients"]), train_loss=record["train_loss"],
        bytes_up=per_client(record["bytes_up"]), bytes_down=per_client(record["bytes_down"]),
        client_flops=per_client(record["client_flops"]), server_flops=per_client(record["server_flops"]),
        examples_seen=record["examples_seen"], rejected=per_client(record["rejected"]),
        wall_seconds=record["wall_seconds"], epsilon=record.get("epsilon"), privacy=record.get("privacy", {}),
        memory=record.get("memory", {}), client_eval=per_client(record.get("client_eval", {})),
        client_eval_personal=per_client(record.get("client_eval_personal", {})),
        simulated_seconds=record.get("simulated_seconds"), bytes_eval=per_client(record.get("bytes_eval", {})),
    )


class RoundLog:
    """Appends one JSON object per round to ``round_log.jsonl``, flushed as each round ends."""

    def __init__(self, path: Path, earlier: list[RoundResult] = ()) -> None:
        """A fresh log, or (on resume) one that starts with the rounds already done."""
        self.path = path
        path.write_text("".join(json.dumps(_strict(round_record(r))) + "\n" for r in earlier))

    def write(self, result: RoundResult) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_strict(round_record(result))) + "\n")


def _strict(value: Any) -> Any:
    """NaN and infinities become null, so the file is valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Pretty JSON, written to a temporary file then renamed so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_strict(value), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def mean(values: list[float]) -> float:
    """Mean of a list, NaN when empty."""
    return sum(values) / len(values) if values else math.nan


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as papers report MB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def round_line(result: RoundResult, rounds: int, task: str = "classification") -> str:
    """One plain line per round for logs, where a live progress bar cannot render."""
    loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"
    rejected = f", {len(result.rejected)} rejected" if result.rejected else ""
    epsilon = f", epsilon {result.epsilon:.3g}" if result.epsilon is not None else ""
    key, title = TASK_METRICS[task][0]
    return (f"round {result.round}/{rounds}: {title} {result.eval[key]:.4f}, train loss {loss}, "
            f"{len(result.clients)} clients{rejected}{epsilon}{_client_columns(result, ', ')}, "
            f"{result.wall_seconds:.1f} s")


def _client_columns(result: RoundResult, sep: str) -> str:
    """Per-client evaluation (global; each client's own model) and simulated device time, where a run has them."""
    parts = []
    for name, values in (("clients", result.client_eval), ("own models", result.client_eval_personal)):
        if values:
            stats = client_eval_stats(values)
            parts.append(f"{name} {stats['client_eval_mean']:.4f} (worst 10% {stats['client_eval_worst10']:.4f})")
    if result.simulated_seconds is not None:
        parts.append(f"simulated {result.simulated_seconds:.1f} s")
    return "".join(sep + part for part in parts)


def clients_table(stats: list[dict], label_names: list[str]) -> Table:
    """Per-client example counts and label histograms."""
    table = Table(title="Client data (training rows per label)")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    for name in label_names:
        table.add_column(name, justify="right")
    for row in stats:
        table.add_row(str(row["client"]), str(row["examples"]), *(str(c) for c in row["label_histogram"]))
    return table


BASELINE_TITLES = {"same_passes": "centralized (same passes)", "converged": "centralized (converged)"}


def rounds_table(results: list[RoundResult], baselines: dict[str, dict[str, Any]] | None,
                 task: str = "classification") -> Table:
    """The global model's metrics per round with bytes and FLOPs per client, plus the centralized baselines."""
    table = Table(title="Federated rounds (bytes and FLOPs are per participating client)")
    server_side = any(r.server_flops for r in results)  # split learning: the server trains too
    metrics = TASK_METRICS[task]
    columns = ["round", *(title for _, title in metrics), "train loss", "up / client", "down / client", "client FLOPs"]
    per_client = any(r.client_eval or r.simulated_seconds is not None for r in results)
    for column in [*columns, *(["server FLOPs / client"] if server_side else []), "wall s",
                   *(["per client"] if per_client else [])]:
        table.add_column(column, justify="right")
    flops = lambda d: f"{mean(list(d.values())):.3e}" if d else "-"  # noqa: E731
    for r in results:
        table.add_row(
            str(r.round), *(f"{r.eval[key]:.4f}" for key, _ in metrics),
            "-" if r.train_loss is None else f"{r.train_loss:.4f}",
            human_bytes(mean(list(r.bytes_up.values()))) if r.bytes_up else "-",
            human_bytes(mean(list(r.bytes_down.values()))) if r.bytes_down else "-",
            flops(r.client_flops), *([flops(r.server_flops)] if server_side else []), f"{r.wall_seconds:.1f}",
            *([_client_columns(r, "; ").removeprefix("; ") or "-"] if per_client else []),
        )
    for name, base in (baselines or {}).items():
        loss = base.get("train_loss")
        table.add_row(
            BASELINE_TITLES[name], *(f"{base[key]:.4f}" for key, _ in metrics),
            "-" if loss is None else f"{loss:.4f}", "-", "-", f"{base['flops']:.3e}",
            *(["-"] if server_side else []), f"{base['wall_seconds']:.1f}", *(["-"] if per_client else []),
            style="bold",
        )
    return table


@contextlib.contextmanager
def round_progress(console: Console, rounds: int, clients_per_round: int, enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar with one row for rounds and one for clients in the current round."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        progress.add_task("rounds", total=rounds)
        progress.add_task("clients", total=clients_per_round)
        yield progress
