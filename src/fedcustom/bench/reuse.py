"""Reusing finished benchmark runs: a run whose recorded config equals the one asked for is not run again, so a
long preset can run in parts and a committed result regenerates from its command (bench/cells.py runs or reuses
every sweep's runs through :func:`same_config`)."""

from __future__ import annotations

import json
from typing import Any

from fedcustom.config import RunConfig


# What every preset measured before the convergence work ran with, where the defaults have moved since (a constant
# client rate, PEFT's random prefix and prompt initialisation). Those presets pin these settings in their sweep
# files, so that their committed results still regenerate from their commands; a recorded config that predates a key
# had this value.
LEGACY: dict[str, dict[str, Any]] = {"train": {"lr_schedule": "constant"},
                                     "method": {"prefix_init": "random", "prompt_init": "random"}}


# Settings that change what a run writes, not what it measures: a finished run counts whatever they were (bench runs
# checkpoint every round so that an interrupted one resumes; the runs before that did not).
RESULT_NEUTRAL: dict[str, set[str]] = {"output": {"checkpoint"}}


def same_config(previous: dict[str, Any] | None, cfg: RunConfig) -> bool:
    """Whether a finished run's recorded config is ``cfg``. Keys added to the config since that run count as the
    same when ``cfg`` sets them to what the run did without them: their default, or their LEGACY value; the
    RESULT_NEUTRAL ones are not compared."""
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
            if key in RESULT_NEUTRAL.get(section, set()):
                continue
            missing = LEGACY.get(section, {}).get(key, defaults[section][key])  # the key did not exist yet
            if recorded.get(key, missing) != value:
                return False
    return not set(previous) - set(current)
