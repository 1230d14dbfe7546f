"""Reusing finished benchmark runs: a run whose recorded config equals the one asked for is not run again, so a
long preset can run in parts and a committed result regenerates from its command (bench/cells.py runs or reuses
every sweep's runs through :func:`same_config`)."""

from __future__ import annotations

import json
import os
from typing import Any

from fedcustom.config import RunConfig


# What every preset measured before the convergence work ran with, where the defaults have moved since (a constant
# client rate, PEFT's random prefix and prompt initialisation). Those presets pin these settings in their sweep
# files, so that their committed results still regenerate from their commands; a recorded config that predates a key
# had this value.
LEGACY: dict[str, dict[str, Any]] = {"train": {"lr_schedule": "constant"},
                                     "method": {"prefix_init": "random", "prompt_init": "random"},
                                     "federation": {"scaffold_weights": "uniform"}}


# Settings that change what a run writes or where, not what it measures: a finished run counts whatever they were
# (bench runs checkpoint every round so that an interrupted one resumes, the runs before that did not; the output
# folder is the run's own, spelled relative or absolute by whoever started the bench).
RESULT_NEUTRAL: dict[str, set[str]] = {"output": {"checkpoint", "dir", "quiet", "report", "trackers", "tracker_uri"}}


def _same_file(recorded: Any, value: Any) -> bool:
    """Two spellings of one existing file or folder (``../shared/data/x.csv`` and ``/work/shared/data/x.csv``: the
    data folder a bench was started with, relative or absolute)."""
    if not isinstance(recorded, str) or not isinstance(value, str):
        return False
    try:
        return os.path.samefile(os.path.expanduser(recorded), os.path.expanduser(value))
    except OSError:  # either does not exist (here, now): only an identical spelling is the same
        return False


def same_config(previous: dict[str, Any] | None, cfg: RunConfig) -> bool:
    """Whether a finished run's recorded config is ``cfg``. Keys added to the config since that run count as the
    same when ``cfg`` sets them to what the run did without them: their default, or their LEGACY value; the
    RESULT_NEUTRAL ones are not compared, and two spellings of one existing file (a data path) are the same."""
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
            if (section, key) == ("federation", "scaffold_weights"):  # a rule the run resolved: compare what it ran
                if _scaffold_weights({**defaults[section], **recorded, key: recorded.get(key, missing)}) != \
                        _scaffold_weights(values):
                    return False
            elif recorded.get(key, missing) != value and not _same_file(recorded.get(key), value):
                return False
    return not set(previous) - set(current)


def _scaffold_weights(federation: dict[str, Any]) -> str:
    """The SCAFFOLD weighting a federation section resolves to (``auto``, the default since 2026-12-08, names the
    rule by the run's participation: a run recorded with ``uniform`` before is the same run if that is the rule)."""
    from fedcustom.convergence import resolve_scaffold_weights

    return resolve_scaffold_weights(federation.get("scaffold_weights", "uniform"), federation["scaffold"],
                                    federation["clients"], federation["clients_per_round"], federation["fraction"])


def same_settings(recorded: dict[str, Any] | None, cfg: RunConfig) -> bool:
    """Whether the training settings a finished run resolved (summary.json's ``settings``: client rate, epochs,
    server optimizer ... after the method's recommended defaults filled what its config left unset) are what
    ``cfg`` resolves to now (:func:`fedcustom.convergence.moved_settings`)."""
    from fedcustom.convergence import moved_settings

    return not moved_settings(recorded, cfg)
