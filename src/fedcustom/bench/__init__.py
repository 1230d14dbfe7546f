"""`fedcustom bench`: run a preset (a declarative sweep, fedcustom/bench/sweeps/*.toml, or a sweep file) and write
report.md, results.json and the plots its report module makes."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcustom.assemble import prepare_output
from fedcustom.bench.report import machine
from fedcustom.bench.sweep import Sweep, as_json, load_sweep, merge, parse_only, run_sweep, sweep_names
from fedcustom.report import write_json
from fedcustom.summary import versions

__all__ = ["run_bench", "run_sweep_bench", "sweep_names"]


def run_bench(preset_name: str, data_dir: str, output: str, command: str, console: Console | None = None,
              stages: list[str] | None = None, jobs: int = 1, model: str | None = None,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run a shipped sweep (by name) or a sweep file (a .toml path), then write results.json, report.md and the PNG
    plots into ``output``. ``model`` replaces the backbone of the sweep's base config; ``only`` (``AXIS=LABELS``
    strings) limits which missing runs run."""
    sweep = load_sweep(preset_name)
    if model is not None:
        sweep = dataclasses.replace(sweep, base=merge(sweep.base, {"model": {"name": model}}))
    selection = parse_only(sweep, only)  # checked before the output folder is made
    return run_sweep_bench(sweep, data_dir, prepare_output(output), command, console or Console(), stages, jobs,
                           selection)


def run_sweep_bench(sweep: Sweep, data_dir: str, out: Path, command: str, console: Console,
                    stages: list[str] | None = None, jobs: int = 1,
                    only: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """A declarative sweep (fedcustom/bench/sweeps/*.toml): its stages' runs, then results.json and the report its
    ``report`` module writes (with its plots)."""
    start = time.perf_counter()
    records, planned = run_sweep(sweep, Path(data_dir).expanduser(), out, console, stages, jobs, only)
    with report_lock(out):  # another invocation on this folder may be writing its report, and may have finished runs
        if stages != ["none"]:
            records = every_finished_run(sweep, Path(data_dir).expanduser(), out, records)
        return write_reports(sweep, out, command, console, records, planned, start)


@contextlib.contextmanager
def report_lock(out: Path) -> Iterator[None]:
    """Held while an invocation writes the folder's reports: two invocations of one sweep running side by side (on
    parts of it) wrote report.md, results.json and the plots over each other, through the same temporary files."""
    with (out / ".report.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def every_finished_run(sweep: Sweep, data_dir: Path, out: Path,
                       ran: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Every stage's finished runs as the folder holds them now (those another invocation finished while this one
    ran included), the runs this invocation ran marked as not reused."""
    own = {r["run_dir"] for stage in ran.values() for r in stage if not r["reused"]}
    records, _ = run_sweep(sweep, data_dir, out, Console(quiet=True), ["none"])
    for stage in records.values():
        for r in stage:
            r["reused"] = r["run_dir"] not in own
    return records


def write_reports(sweep: Sweep, out: Path, command: str, console: Console, records: dict[str, list[dict[str, Any]]],
                  planned: dict[str, int], start: float) -> dict[str, Any]:
    """results.json, report.md and the report module's plots for ``records``."""
    from fedcustom.checkpoint import CHECKPOINT  # torch loads only when runs start

    runs = [r for stage in records.values() for r in stage]
    writer = importlib.import_module(f"fedcustom.bench.{sweep.report}")
    result = {"preset": sweep.name, "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": time.perf_counter() - start, "runs": len(runs), "planned": sum(planned.values()),
              "reused": sum(r["reused"] for r in runs),
              "part_way": sum(1 for _ in (out / "runs").rglob(CHECKPOINT)),  # finished runs delete theirs
              "cells_wall_seconds": sum(r["summary"].get("wall_seconds") or 0.0 for r in runs),
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "sweep": as_json(sweep), "targets": writer.targets(records.get("report", runs)), "stages": records}
    text = writer.report(sweep, records, result, out)  # a report may add its tables to the result
    write_json(out / "results.json", result)
    (out / "report.md.tmp").write_text(text)
    (out / "report.md.tmp").replace(out / "report.md")
    console.print(f"report: {out / 'report.md'}")
    return result
