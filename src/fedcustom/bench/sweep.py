"""Declarative benchmark sweeps: a TOML file (a base config plus axes) run by one runner that owns the reuse cache.

A sweep file::

    name = "converge"
    description = "..."
    report = "converge"                  # the report module (fedcustom.bench.<report>) that writes report.md

    [base.model]                         # any RunConfig sections: what every run shares
    name = "minilm"

    [[axis.method]]                      # an axis: its values in order; the grid is the product of the axes
    label = "prefix"                     # names the value in run folders and records
    group = "peft"                       # any other plain key is a tag, copied into the records
    [axis.method.set]                    # config keys this value sets ("{data_dir}", "{sweep_dir}" are replaced)
    method.name = "prefix"

    [stages.tune]                        # stages run in order; each may restrict an axis to some of its labels
    axis.seed = ["tune"]
    [stages.tune.set]                    # and set config keys for all of its runs
    train.centralized_converged = false

    [stages.report]
    axis.seed = ["0", "1", "2"]
    [stages.report.pick]                 # an axis not iterated but picked from an earlier stage's results:
    axis = "variant"                     # per group of ``by`` tags, the label with the best mean ``metric``
    from = "tune"
    by = ["method", "dataset"]
    metric = "final_accuracy"

A run whose folder already holds a summary.json with the same config is reused, so a sweep can be stopped and
continued, or run in parts (``--stage``).
"""

from __future__ import annotations

import collections
import copy
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcustom.config import read_toml
from fedcustom.errors import ConfigError, FedCustomError

SWEEPS_DIR = Path(__file__).parent / "sweeps"
RESERVED = {"label", "set"}


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: its label, tags and the config keys it sets."""

    label: str
    tags: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class Pick:
    """An axis whose value a stage takes from an earlier stage's best result per group."""

    axis: str
    source: str
    by: tuple[str, ...]
    metric: str


@dataclass(frozen=True)
class Stage:
    name: str
    only: dict[str, tuple[str, ...]]  # axis -> the labels this stage iterates (default: all)
    settings: dict[str, Any]
    pick: Pick | None = None


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    name: str
    description: str
    report: str
    base: dict[str, Any]
    axes: dict[str, tuple[AxisValue, ...]]
    stages: tuple[Stage, ...]
    source: str = ""


@dataclass
class Cell:
    """One run of a stage: the label of each axis, the tags those values carry and the full config values."""

    stage: str
    labels: dict[str, str]
    tags: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "/".join(label.replace(":", "") for label in self.labels.values())


def sweep_names() -> list[str]:
    """The sweeps shipped with fedcustom (``fedcustom bench --preset NAME``)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.toml"))


def load_sweep(name_or_path: str) -> Sweep:
    """A shipped sweep by name, or a sweep file by path; clear errors for what is malformed."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEPS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"sweep {name_or_path!r}: no such file; shipped sweeps: {', '.join(sweep_names())}")
    return parse_sweep(read_toml(path, "sweep"), str(path))


def parse_sweep(raw: dict[str, Any], source: str = "<sweep>") -> Sweep:
    """A Sweep from a TOML document (see the module docstring)."""
    try:
        axes = {name: tuple(_axis_value(v) for v in values) for name, values in raw["axis"].items()}
        stages = tuple(_stage(name, spec, axes) for name, spec in raw.get("stages", {"all": {}}).items())
        return Sweep(str(raw["name"]), str(raw.get("description", "")), str(raw["report"]), raw.get("base", {}),
                     axes, stages, source)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"sweep {source}: malformed ({type(exc).__name__}: {exc}); see fedcustom.bench.sweep") from None


def _axis_value(value: dict[str, Any]) -> AxisValue:
    tags = {k: v for k, v in value.items() if k not in RESERVED}
    return AxisValue(str(value["label"]), tags, value.get("set", {}))


def _stage(name: str, spec: dict[str, Any], axes: dict[str, tuple[AxisValue, ...]]) -> Stage:
    only = {axis: tuple(labels) for axis, labels in spec.get("axis", {}).items()}
    for axis, labels in only.items():
        known = {v.label for v in axes[axis]}
        if set(labels) - known:
            raise ConfigError(f"stage {name!r}: axis {axis!r} has no value {sorted(set(labels) - known)}")
    pick = spec.get("pick")
    if pick:
        pick = Pick(pick["axis"], pick["from"], tuple(pick["by"]), pick["metric"])
    return Stage(name, only, spec.get("set", {}), pick)


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay``'s keys set, section by section (neither is changed)."""
    out = copy.deepcopy(base)
    for section, values in overlay.items():
        out.setdefault(section, {}).update(copy.deepcopy(values))
    return out


def substitute(values: Any, data_dir: Path, sweep_dir: Path | None = None) -> Any:
    """Every ``{data_dir}`` in string values replaced by the benchmark data folder, and ``{sweep_dir}`` by the
    sweep file's folder (for files that ship beside it, such as device profiles)."""
    if isinstance(values, dict):
        return {k: substitute(v, data_dir, sweep_dir) for k, v in values.items()}
    if isinstance(values, str):
        values = values.replace("{data_dir}", str(data_dir))
        return values.replace("{sweep_dir}", str(sweep_dir)) if sweep_dir is not None else values
    return values


def check_data(values: dict[str, Any], data_dir: Path) -> None:
    """Fail before any training when a data file the sweep takes from the benchmark data folder is missing."""
    for key in ("dataset", "eval_dataset"):
        value = values.get("data", {}).get(key)
        if isinstance(value, str) and "{data_dir}" in value:
            path = Path(substitute(value, data_dir))
            if not path.is_file():
                raise FedCustomError(f"benchmark data {path}: not found; expected the shared data folder (sst2/, "
                                     f"ag_news/) at --data-dir {data_dir}")


def _choices(sweep: Sweep, stage: Stage) -> tuple[list[str], list[list[AxisValue]]]:
    """The axes a stage iterates (all but a picked one) and each one's values that the stage runs."""
    iterated = [a for a in sweep.axes if not (stage.pick and a == stage.pick.axis)]
    return iterated, [[v for v in sweep.axes[a] if a not in stage.only or v.label in stage.only[a]] for a in iterated]


def stage_size(sweep: Sweep, stage: Stage) -> int:
    """How many runs ``stage`` has once every group's pick is known (a picked axis adds one value per cell)."""
    return math.prod(len(values) for values in _choices(sweep, stage)[1])


def cells(sweep: Sweep, stage: Stage, picked: dict[tuple, AxisValue] | None = None) -> list[Cell]:
    """The runs of one stage, in axis order; a picked axis takes the value chosen for the cell's group."""
    iterated, choices = _choices(sweep, stage)
    out = []
    for combo in itertools.product(*choices):
        chosen = dict(zip(iterated, combo))
        tags = {k: v for value in combo for k, v in value.tags.items()} | {a: v.label for a, v in chosen.items()}
        if stage.pick:
            value = (picked or {}).get(tuple(tags.get(k) for k in stage.pick.by))
            if value is None:
                continue  # no tuning result for this group
            chosen[stage.pick.axis] = value
            tags |= value.tags | {stage.pick.axis: value.label}
        values = copy.deepcopy(sweep.base)
        for value in chosen.values():
            values = merge(values, value.settings)
        values = merge(values, stage.settings)
        labels = {a: chosen[a].label for a in sweep.axes if a in chosen}
        out.append(Cell(stage.name, labels, tags, values))
    return out


def best_per_group(records: list[dict[str, Any]], sweep: Sweep, pick: Pick) -> dict[tuple, AxisValue]:
    """Per group of ``pick.by`` tags, the value of ``pick.axis`` whose runs score the best mean ``pick.metric``
    (the first in axis order on ties)."""
    by_label = {v.label: v for v in sweep.axes[pick.axis]}
    scores: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        group = tuple(r["tags"].get(k) for k in pick.by)
        scores.setdefault(group, {}).setdefault(r["labels"][pick.axis], []).append(r["summary"][pick.metric])
    best = {}
    for group, per_label in scores.items():
        order = [v.label for v in sweep.axes[pick.axis] if v.label in per_label]
        best[group] = by_label[max(order, key=lambda label: statistics.fmean(per_label[label]))]
    return best


def run_sweep(sweep: Sweep, data_dir: Path, out: Path, console: Console, stages: list[str] | None = None,
              jobs: int = 1, only: dict[str, set[str]] | None = None
              ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Run (or reuse) every stage's cells in order; returns each stage's records (its finished runs) and how many
    cells each stage has. ``stages`` and ``only`` (axis -> labels, see :func:`parse_only`) limit which missing cells
    run; finished ones are reused either way."""
    from fedcustom.bench.cells import run_cells  # torch and transformers load only when runs start

    records: dict[str, list[dict[str, Any]]] = {}
    planned: dict[str, int] = {}
    for stage in sweep.stages:
        picked = None
        if stage.pick:
            if stage.pick.source not in records:
                raise ConfigError(f"stage {stage.name!r} picks from stage {stage.pick.source!r}, which has not run")
            picked = best_per_group(records[stage.pick.source], sweep, stage.pick)
        todo = cells(sweep, stage, picked)
        planned[stage.name] = stage_size(sweep, stage)
        run_now = [(stages is None or stage.name in stages) and selected(cell, only) for cell in todo]
        source = stage.pick.source if stage.pick else None
        if source and any(run_now) and len(records[source]) < planned[source]:
            raise ConfigError(f"stage {stage.name!r} picks from stage {source!r}, of which {len(records[source])} of "
                              f"{planned[source]} runs have finished: its pick could still change, so finish it first "
                              f"(--stage {source}); what has finished can be reported with --stage none")
        for cell, runs in zip(todo, run_now):
            if runs:
                check_data(cell.values, data_dir)
            cell.values = substitute(cell.values, data_dir, Path(sweep.source).parent if sweep.source else None)
        start = time.perf_counter()
        limited = "" if all(run_now) else (" (only reused results)" if not any(run_now) else
                                           f" ({sum(run_now)} selected to run, the rest only reused)")
        console.print(f"stage {stage.name!r}: {len(todo)} runs" + limited)
        records[stage.name] = run_cells(todo, out / "runs" / stage.name, console, run_now, jobs, sweep.report)
        console.print(f"stage {stage.name!r} done in {(time.perf_counter() - start) / 60:.1f} min")
    return records, planned


def parse_only(sweep: Sweep, specs: list[str] | None) -> dict[str, set[str]] | None:
    """``--only AXIS=LABEL[,LABEL...]`` options (repeatable; a cell runs when every named axis has one of the labels):
    axis -> labels, checked against the sweep's axes."""
    if not specs:
        return None
    only: dict[str, set[str]] = {}
    for spec in specs:
        axis, sep, labels = spec.partition("=")
        if not sep or not labels or axis not in sweep.axes:
            raise ConfigError(f"--only {spec!r}: expected AXIS=LABEL[,LABEL...] with AXIS one of "
                              f"{', '.join(sweep.axes)}")
        wanted, known = set(labels.split(",")), {v.label for v in sweep.axes[axis]}
        if wanted - known:
            raise ConfigError(f"--only {spec!r}: axis {axis!r} has no value {sorted(wanted - known)}; "
                              f"it has {', '.join(sorted(known))}")
        only[axis] = only.get(axis, set()) | wanted
    return only


def selected(cell: Cell, only: dict[str, set[str]] | None) -> bool:
    """Whether ``cell`` has one of the wanted labels on every axis ``only`` names (a picked axis included)."""
    return not only or all(cell.labels.get(axis) in labels for axis, labels in only.items())


def picks_table(records: list[dict[str, Any]], pick: Pick) -> list[dict[str, Any]]:
    """What a stage picked for each group, with every candidate's mean metric (for the report)."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        group = tuple(r["tags"].get(k) for k in pick.by)
        groups.setdefault(group, {}).setdefault(r["labels"][pick.axis], []).append(r["summary"][pick.metric])
    rows = []
    for group, per_label in groups.items():
        means = {label: statistics.fmean(v) for label, v in per_label.items()}
        rows.append({**dict(zip(pick.by, group)), "scores": means, "picked": max(means, key=means.get)})
    return rows


def as_json(sweep: Sweep) -> dict[str, Any]:
    """The sweep itself, for results.json."""
    return json.loads(json.dumps({"name": sweep.name, "source": sweep.source, "base": sweep.base,
                                  "axes": {a: [v.__dict__ for v in vs] for a, vs in sweep.axes.items()},
                                  "stages": [s.__dict__ | {"pick": s.pick.__dict__ if s.pick else None}
                                             for s in sweep.stages]}, default=str))


def preamble(sweep: Sweep, result: dict[str, Any]) -> list[str]:
    """A sweep report's first lines: title, description, command, machine and how many runs took how long."""
    m = result["machine"]
    part_way = result.get("part_way", 0)
    partial = ([f"**Partial report: {result['runs']} of the sweep's {result['planned']} runs have finished**"
                + (f" and {part_way} more {'is' if part_way == 1 else 'are'} part-way (running, or cut off: the next "
                   f"invocation that reaches {'it' if part_way == 1 else 'them'} resumes from the last checkpointed "
                   f"round)" if part_way else "")
                + "; what has no run yet is left out or shown as n/a, and the numbers below will move as the rest "
                  "finish.", ""]
               if result["runs"] < result["planned"] else [])
    return [f"# fedcustom bench — preset `{sweep.name}`", "", sweep.description, "",
            f"Command: `{result['command']}`  ",
            f"Machine: {m['processor']}, {m['cpus']} CPUs; torch threads per run: {threads_line(result)}; "
            f"{result['runs']} runs "
            f"({result['reused']} reused from earlier invocations), {result['cells_wall_seconds'] / 3600:.1f} h of "
            f"run time in all; finished {result['finished']}.  ",
            f"Code: {code_line(result)}.", "", *partial]


def threads_line(result: dict[str, Any]) -> str:
    """How many torch threads the runs used, as their summaries recorded (a bench's worker processes each get a
    share of the cores, so the calling process's own setting says nothing about them): runs per thread count."""
    counts = collections.Counter(r["summary"].get("torch_threads")
                                 for stage in result["stages"].values() for r in stage)
    parts = [f"{threads} ({n} run{'s' * (n != 1)})" for threads, n in sorted(
        ((t, n) for t, n in counts.items() if t is not None), key=lambda tn: -tn[1])]
    if counts.get(None):
        parts.append(f"not recorded ({counts[None]} older run{'s' * (counts[None] != 1)})")
    return ", ".join(parts) or "no runs"


def code_line(result: dict[str, Any]) -> str:
    """Which source commits the runs came from (a sweep reuses runs across invocations, and so across commits):
    runs per commit, most first; runs whose summary recorded none are counted apart."""
    commits = collections.Counter(r["summary"].get("versions", {}).get("fedcustom_commit")
                                  for stage in result["stages"].values() for r in stage)

    def runs(n: int) -> str:
        return f"{n} run{'s' * (n != 1)}"

    parts = [f"{runs(n)} at `{commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''}`"
             for commit, n in commits.most_common() if commit]
    if commits.get(None):
        parts.append(f"{runs(commits[None])} that recorded no commit")
    return "; ".join(parts) or "no runs"


def base_value(sweep: Sweep, key: str) -> Any:
    """A setting every run of the sweep shares (``section.key`` of its base config), for a report's setup lines;
    None where the base does not set it."""
    section, _, name = key.partition(".")
    return sweep.base.get(section, {}).get(name)
