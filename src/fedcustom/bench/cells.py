"""Run a sweep's cells, or reuse the finished ones: the one run-or-reuse loop every sweep goes through.

A cell's run folder holds the run's summary.json; a later invocation reuses it when the recorded config equals
the cell's (keys added to RunConfig since count as equal when left at their defaults). A sweep's report module may
measure more than a run records: its ``instrument(job, folder)`` hooks into the built job before it runs and
returns what to do with the summary afterwards (add to it, or write a file beside it), and its
``complete(folder, summary)`` says whether a finished run has that measurement (a run without it is run again). Cells can run in
``jobs`` worker processes, each with its share of the CPU threads: two single-threaded MiniLM runs get through
more examples per second on 2 cores than one run on two threads.

A run checkpoints after every round (unless its report module instruments it), so a run cut off by a killed
bench continues from its last round in the next invocation instead of starting again: a cell whose folder holds
a checkpoint of its own config and no summary is resumed (bit for bit as if uninterrupted; fedcustom.checkpoint).
The checkpoint is deleted once the run's summary is written.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedcustom.bench.reuse import same_config, same_settings
from fedcustom.bench.sweep import Cell
from fedcustom.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint
from fedcustom.config import RunConfig, build_config
from fedcustom.errors import FedCustomError

DROPPED = ("config", "versions")  # summary keys a record leaves out (they are in each run's summary.json)


def cell_values(cell: Cell, out: Path, report: str | None = None) -> dict[str, Any]:
    """The cell's config values with its own run folder and the settings every benchmark run shares: checkpoints
    to resume from, unless the report module instruments the run (its measurement would miss the rounds before an
    interruption, so such a run starts again)."""
    values = {section: dict(table) for section, table in cell.values.items()}
    output = values.setdefault("output", {})
    output.update({"dir": str(out / cell.name), "quiet": True})
    output.setdefault("save_model", False)
    output.setdefault("checkpoint", _hook(report, "instrument") is None)
    return values


def add_to_summary(folder: Path, summary: dict[str, Any], values: dict[str, Any]) -> None:
    """A report module's own measurements added to a finished run's summary (and its summary.json), so that the
    sweep's records carry them."""
    from fedcustom.report import write_json

    summary.update(values)
    write_json(folder / "summary.json", summary)


def _hook(report: str | None, name: str) -> Any:
    """The report module's ``name`` hook (instrument, complete), or None."""
    return getattr(importlib.import_module(f"fedcustom.bench.{report}"), name, None) if report else None


def finished(values: dict[str, Any], report: str | None = None) -> dict[str, Any] | None:
    """The summary of an earlier run with the same config (and, where the report module asks, its extra
    measurement), if its folder holds one."""
    folder = Path(values["output"]["dir"])
    path, complete = folder / "summary.json", _hook(report, "complete")
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if complete and not complete(folder, summary):
        return None
    cfg = build_config(values)
    return summary if same_config(summary.get("config"), cfg) and same_settings(summary.get("settings"), cfg) else None


def interrupted(folder: Path, cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint an interrupted run of ``cfg`` left in ``folder``, or None: there is none, it cannot be read,
    or it belongs to another config or to settings ``cfg`` no longer resolves to (a default that moved since: that
    run starts again and overwrites it, as a finished one is not reused)."""
    if not cfg.output.checkpoint or not (folder / CHECKPOINT).is_file():
        return None
    try:
        checkpoint = load_checkpoint(folder)
    except FedCustomError:
        return None
    return checkpoint if same_config(checkpoint.config, cfg) and same_settings(checkpoint.settings, cfg) else None


def run_one(values: dict[str, Any], threads: int | None, report: str | None = None) -> dict[str, Any]:
    """One federated run (in this process or a worker), instrumented by the report module if it asks, or resumed
    from an interrupted run's checkpoint; returns its summary. ``threads``: the worker process's torch threads;
    None (a run in the caller's process) leaves the caller's setting alone, which would otherwise hold for
    everything the caller runs after the bench."""
    import torch

    from fedcustom.runner import build_job, execute, resumed_job

    if threads is not None:
        torch.set_num_threads(threads)
    cfg, folder = build_config(values), Path(values["output"]["dir"])
    checkpoint = interrupted(folder, cfg)
    if checkpoint is not None:
        job, _ = resumed_job(folder, checkpoint=checkpoint)
        summary = execute(job, Console(quiet=True), resumed=checkpoint)
    else:
        job, instrument = build_job(cfg), _hook(report, "instrument")
        finish = instrument(job, folder) if instrument else None
        summary = execute(job, Console(quiet=True))
        if finish:
            finish(summary)
    (folder / CHECKPOINT).unlink(missing_ok=True)  # finished: a later invocation reuses its summary
    return summary


def record(cell: Cell, out: Path, summary: dict[str, Any] | None, reused: bool) -> dict[str, Any]:
    """A run's record for results.json: its summary without the config and library versions, but with the source
    commit (a report counts its runs per commit)."""
    kept = {k: v for k, v in (summary or {}).items() if k not in DROPPED}
    commit = (summary or {}).get("versions", {}).get("fedcustom_commit")
    if commit:
        kept["versions"] = {"fedcustom_commit": commit}
    return {"stage": cell.stage, "labels": cell.labels, "tags": cell.tags, "run_dir": str(out.name + "/" + cell.name),
            "reused": reused, "summary": kept}


def headline(summary: dict[str, Any]) -> str:
    """A finished run's headline metric for a progress line: its task's first (accuracy, ROUGE-L, recall@5)."""
    from fedcustom.report import TASK_METRICS

    key = TASK_METRICS.get(summary.get("task", "classification"), (("accuracy", ""),))[0][0]
    value = summary.get(f"final_{key}")
    return f"{key} {value:.4f}" if isinstance(value, (int, float)) else f"{key} n/a"


def run_cells(todo: list[Cell], out: Path, console: Console, run_now: list[bool] | None = None,
              jobs: int = 1, report: str | None = None) -> list[dict[str, Any]]:
    """Records for ``todo`` in order (each keeps its run's whole summary but the config and versions): reused
    where finished, else run (a missing cell whose ``run_now`` entry is False is left out; default: run every
    missing cell). ``report`` names the sweep's report module, whose instrument/complete hooks apply."""
    values = [cell_values(cell, out, report) for cell in todo]
    done = [finished(v, report) for v in values]
    run_now = [True] * len(todo) if run_now is None else run_now
    pending = [i for i, d in enumerate(done) if d is None and run_now[i]]
    fresh = _run_pending(todo, values, pending, console, jobs, report)
    records = []
    for i, cell in enumerate(todo):
        summary = fresh.get(i, done[i])
        if summary is not None:
            records.append(record(cell, out, summary, reused=i not in fresh))
    return records


def _run_pending(todo: list[Cell], values: list[dict], pending: list[int], console: Console,
                 jobs: int, report: str | None = None) -> dict[int, dict[str, Any]]:
    """Run the pending cells, ``jobs`` at a time, with a progress bar (a line per run when not on a terminal)."""
    if not pending:
        return {}
    results: dict[int, dict[str, Any]] = {}
    columns = (TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"))
    start = time.perf_counter()
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(pending))

        def done(i: int, summary: dict[str, Any]) -> None:
            results[i] = summary
            progress.advance(task)
            progress.update(task, description=todo[i].name)
            if not console.is_terminal:
                console.print(f"[{len(results)}/{len(pending)}] {todo[i].stage}/{todo[i].name}: {headline(summary)} "
                              f"({summary['wall_seconds']:.0f} s; {(time.perf_counter() - start) / 60:.0f} min so far)")

        if jobs <= 1:
            for i in pending:
                done(i, run_one(values[i], None, report))
            return results
        threads = max(1, (os.cpu_count() or 1) // jobs)  # each worker process's share of the cores
        with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            futures = {i: pool.apply_async(run_one, (values[i], threads, report)) for i in pending}
            for i, future in futures.items():
                done(i, future.get())
    return results
