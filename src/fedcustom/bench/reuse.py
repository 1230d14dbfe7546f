"""Reusing finished benchmark runs: a run whose recorded config equals the one asked for is not run again, so a
long preset can run in parts and a committed result regenerates from its command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcustom.config import RunConfig, build_config


# What every preset measured before the convergence work ran with, where the defaults have moved since (a constant
# client rate, PEFT's random prefix and prompt initialisation). Those presets pin these settings, so that their
# committed results still regenerate from their commands; a recorded config that predates a key had this value.
LEGACY: dict[str, dict[str, Any]] = {"train": {"lr_schedule": "constant"},
                                     "method": {"prefix_init": "random", "prompt_init": "random"}}


def pinned(values: dict[str, dict[str, Any]]) -> RunConfig:
    """``build_config`` of a preset's values with the legacy settings above pinned (the values win)."""
    merged = {section: {**LEGACY.get(section, {}), **table} for section, table in values.items()}
    return build_config({**{s: dict(t) for s, t in LEGACY.items() if s not in merged}, **merged})


def same_config(previous: dict[str, Any] | None, cfg: RunConfig) -> bool:
    """Whether a finished run's recorded config is ``cfg``. Keys added to the config since that run count as the
    same when ``cfg`` sets them to what the run did without them: their default, or their LEGACY value."""
    if not isinstance(previous, dict):
        return False
    previous = json.loads(json.dumps(previous))
    plain = lambda c: json.loads(json.dumps(c.to_dict()))  # noqa: E731  (tuples as the JSON lists they were saved as)
    defaults, current = plain(RunConfig()), plain(cfg)
    for section, values in current.items():
        recorded = previous.get(section, {})
        if set(recorded) - set(values):
            return False
        for key, value in values.items():
            missing = LEGACY.get(section, {}).get(key, defaults[section][key])  # the key did not exist yet
            if recorded.get(key, missing) != value:
                return False
    return not set(previous) - set(current)


def run_or_reuse(cfg: RunConfig, complete: Callable[[dict[str, Any]], bool] = lambda _summary: True,
                 instrument: Callable[[Any], Callable[[dict[str, Any]], None]] | None = None,
                 ) -> tuple[dict[str, Any], bool]:
    """(summary, reused): the finished run's summary when its config is ``cfg`` and ``complete`` accepts it, else
    a fresh run. ``instrument(job)`` may hook into the built job before it runs and returns what to do with its
    summary afterwards (e.g. add a measurement and rewrite summary.json)."""
    from fedcustom.runner import build_job, execute  # torch loads with the first run

    path = Path(cfg.output.dir) / "summary.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous and same_config(previous.get("config"), cfg) and complete(previous):
        return previous, True
    job = build_job(cfg)
    finish = instrument(job) if instrument else None
    summary = execute(job, Console(quiet=True))
    if finish:
        finish(summary)
    return summary, False
