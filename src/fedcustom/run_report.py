"""`fedcustom report RUN_DIR`: one run's report.md and PNG plots (and, with --html, one self-contained page) from
its summary.json and round_log.jsonl: the headline metric and the loss per round against the centralized baselines,
cumulative megabytes on the wire, and each client's data."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fedcustom.errors import FedCustomError

MB = 1e6
PLOTS = {"metric": "report_metric.png", "loss": "report_loss.png", "bytes": "report_bytes.png",
         "clients": "report_clients.png"}


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished run's summary and round log; a clear error for a folder that is not one."""
    summary_path, log_path = run_dir / "summary.json", run_dir / "round_log.jsonl"
    if not summary_path.is_file() or not log_path.is_file():
        raise FedCustomError(f"report {run_dir}: expected a finished run's folder with summary.json and "
                             f"round_log.jsonl (what `fedcustom run --output DIR` writes)")
    try:
        summary = json.loads(summary_path.read_text())
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise FedCustomError(f"report {run_dir}: unreadable JSON ({exc})") from None
    return summary, records


def headline(summary: dict[str, Any]) -> tuple[str, str]:
    """(metric key, title) of the run's task."""
    from fedcustom.tasks import get_task

    return get_task(summary.get("task", "classification")).metrics[0]


def _cumulative_mb(records: list[dict[str, Any]], key: str) -> list[float]:
    total, out = 0.0, []
    for record in records:
        total += sum(record.get(key, {}).values()) / MB
        out.append(total)
    return out


def write_plots(run_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Path]:
    """The four PNGs; returns their paths by name."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    key, title = headline(summary)
    rounds = [r["round"] for r in records]
    paths = {name: run_dir / file for name, file in PLOTS.items()}

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.get(f"eval_{key}") for r in records], marker="o", label=f"federated ({summary['method']})")
    for field, label in (("client_eval_mean", "clients' held-out rows (mean)"),
                         ("client_eval_personal_mean", "clients' own models (mean)")):
        if any(field in r for r in records):
            ax.plot(rounds, [r.get(field) for r in records], marker=".", linestyle="--", label=label)
    for baseline, style in (("centralized", "--"), ("centralized_converged", ":")):
        value = summary.get(f"{baseline}_{key}")
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray", label=baseline.replace("_", ", ") + " baseline")
    ax.set(xlabel="round", ylabel=title, title=f"{title} per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["metric"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.get("eval_loss") for r in records], marker="o", label="eval loss (global model)")
    trained = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if trained:
        ax.plot(*zip(*trained), marker="s", label="train loss (clients, weighted)")
    ax.set(xlabel="round", ylabel="loss", title="loss per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["loss"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, _cumulative_mb(records, "bytes_up"), marker="o", label="up (clients to server)")
    ax.plot(rounds, _cumulative_mb(records, "bytes_down"), marker="s", label="down (server to clients)")
    ax.set(xlabel="round", ylabel="MB, all clients, cumulative", title="communication")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["bytes"], dpi=120)
    plt.close(fig)

    clients = summary.get("client_data", [])
    names = summary.get("label_names", [])
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0] * len(clients)
    for index, name in enumerate(names):
        counts = [c["label_histogram"][index] if index < len(c["label_histogram"]) else 0 for c in clients]
        ax.bar([str(c["client"]) for c in clients], counts, bottom=bottom, label=str(name))
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set(xlabel="client", ylabel="training rows", title="each client's data by label")
    if len(clients) > 30:  # a thousand tick labels are ink, not information
        ax.set_xticks([])
    if 0 < len(names) <= 12:
        ax.legend(fontsize=7, title="label", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(paths["clients"], dpi=120)
    plt.close(fig)
    return paths


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def overview_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline facts of a run, as (what, value)."""
    key, title = headline(summary)
    config = summary.get("config", {})
    return [
        ("method", str(summary.get("method"))), ("model", str(summary.get("model"))),
        ("dataset", str(summary.get("dataset"))), ("partition", str(summary.get("partition"))),
        ("clients (per round)", f"{summary.get('clients')} ({summary.get('clients_per_round')})"),
        ("rounds", str(summary.get("rounds"))), (f"initial {title}", _fmt(summary.get(f"initial_{key}"))),
        (f"final {title}", _fmt(summary.get(f"final_{key}"))),
        (f"centralized {title} (same passes)", _fmt(summary.get(f"centralized_{key}"))),
        (f"centralized {title} (converged)", _fmt(summary.get(f"centralized_converged_{key}"))),
        ("MB up / down per client per round", f"{_fmt(_scaled(summary.get('bytes_up_per_round'), MB), 2)} / "
                                              f"{_fmt(_scaled(summary.get('bytes_down_per_round'), MB), 2)}"),
        ("client GFLOPs per round", _fmt(_scaled(summary.get("client_flops_per_round"), 1e9), 1)),
        ("codec up / down", f"{summary.get('codec_up')} / {summary.get('codec_down')}"),
        ("strategy", str(summary.get("strategy"))), ("DP / SecAgg", f"{summary.get('dp')} / {summary.get('secagg')}"),
        ("device", str(summary.get("device", config.get("train", {}).get("device", "-")))),
        ("wall time (s)", _fmt(summary.get("wall_seconds"), 1) + _resumed_note(summary.get("resumed_after_rounds"))),
        *_per_client_rows(summary, key),
    ]


def _resumed_note(rounds: list[int] | None) -> str:
    """For a run cut off and resumed: where, and that the cut-off part of a round is not in its wall time."""
    if not rounds:
        return ""
    return (f" (resumed after round {', '.join(map(str, rounds))}; the cut-off part of the next round is not "
            f"counted)")


def _per_client_rows(summary: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """Per-client evaluation, personalization, simulated device time and time to target, where a run has them."""
    rows = []
    personalize = summary.get("config", {}).get("federation", {}).get("personalize", "none")
    for suffix, what in (("", "global model"), ("_personal", f"own models ({personalize})")):
        if f"client_{key}{suffix}_mean" in summary:
            rows.append((f"clients' held-out {key}, {what}: mean / worst 10%",
                         f"{_fmt(summary[f'client_{key}{suffix}_mean'])} / "
                         f"{_fmt(summary[f'client_{key}{suffix}_worst10'])}"))
    if "simulated_seconds_total" in summary:
        rows.append(("simulated device time (s)", _fmt(summary["simulated_seconds_total"], 1)))
    target = summary.get("time_to_target")
    if target:
        reached = "not reached" if target["round"] is None else \
            f"round {target['round']}, {_fmt(target['wall_seconds'], 1)} s wall" + \
            ("" if target["simulated_seconds"] is None else f", {_fmt(target['simulated_seconds'], 1)} s simulated")
        rows.append((f"{target['metric']} >= {target['target']}", reached))
    return rows


def _scaled(value: float | None, unit: float) -> float | None:
    """``value`` in ``unit``s; None (nothing measured: shown as "-", not as 0) stays None."""
    return None if value is None else value / unit


def round_rows(summary: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The per-round table: header and rows."""
    key, title = headline(summary)
    header = ["round", title, "eval loss", "train loss", "clients", "rejected", "MB up (all clients)",
              "MB down (all clients)", "s"]
    rows = [[str(r["round"]), _fmt(r.get(f"eval_{key}")), _fmt(r.get("eval_loss")), _fmt(r.get("train_loss")),
             str(len(r.get("clients", []))), str(len(r.get("rejected", {}))),
             _fmt(sum(r.get("bytes_up", {}).values()) / MB, 2), _fmt(sum(r.get("bytes_down", {}).values()) / MB, 2),
             _fmt(r.get("wall_seconds"), 1)] for r in records]
    return header, rows


def write_markdown(run_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]],
                   plots: dict[str, Path]) -> Path:
    lines = [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in overview_rows(summary)]
    header, rows = round_rows(summary, records)
    lines += ["", "## Rounds", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(run_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]], plots: dict[str, Path]) -> Path:
    """One page with the plots inlined (base64), so it can be mailed or attached as a single file."""
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    images = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
                     for name, path in plots.items())
    header, rows = round_rows(summary, records)
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>fedcustom run {html.escape(run_dir.name)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "img{max-width:48%;margin:4px}</style></head><body>"
            f"<h1>Run report: {html.escape(run_dir.name)}</h1>"
            + table(["", ""], [list(r) for r in overview_rows(summary)])
            + "<h2>Rounds</h2>" + table(header, rows) + "<h2>Plots</h2>" + images + "</body></html>")
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def write_report(run_dir: Path, as_html: bool = False) -> list[Path]:
    """report.md and the plots (and report.html) in ``run_dir``; returns what was written."""
    summary, records = load_run(run_dir)
    plots = write_plots(run_dir, summary, records)
    written = [write_markdown(run_dir, summary, records, plots), *plots.values()]
    if as_html:
        written.append(write_html(run_dir, summary, records, plots))
    return written
