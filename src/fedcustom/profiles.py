"""Client profiles (``--client-profiles FILE``): what each simulated client's device can do, from an IoT board to a
server, so that an embedded run shows stragglers, deadlines and the wall-clock time a real federation would take.

A CSV (header row) or TOML (``[[client]]`` tables) file; its rows are cycled over the clients in id order (three
rows for ten clients: 0, 3, 6, 9 take the first). Columns / keys, all optional:

- ``name``: a label (e.g. ``phone``);
- ``compute``: speed relative to the machine running the simulation (0.25: four times slower; default 1);
- ``bandwidth_mb_s``: the link's megabytes per second, both ways (default: unlimited);
- ``memory_mb``: the memory the device can give training (with ``--prefix-lengths adaptive``);
- ``lora_rank``: the LoRA rank this device trains (``--method lora``; replaces ``--lora-ranks``);
- ``prefix_length``: the virtual tokens this device uses (``--method prefix`` or ``prompt``; replaces
  ``--prefix-lengths``).

A client's simulated time for a round is its measured training time divided by ``compute`` plus the bytes it
receives and sends divided by its bandwidth. A client slower than ``--round-timeout`` is a straggler: its update
arrives too late and is left out of the round. The round lasts as long as its slowest client (at most the timeout).
"""

from __future__ import annotations

import csv
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedcustom.errors import ConfigError

WHERE = "federation.client_profiles (--client-profiles)"
COLUMNS = ("name", "compute", "bandwidth_mb_s", "memory_mb", "lora_rank", "prefix_length")


@dataclass(frozen=True)
class ClientProfile:
    name: str = ""
    compute: float = 1.0
    bandwidth_mb_s: float = math.inf
    memory_mb: float | None = None
    lora_rank: int | None = None
    prefix_length: int | None = None

    def seconds(self, train_seconds: float, bytes_moved: int) -> float:
        """Simulated seconds of one round on this device."""
        return train_seconds / self.compute + bytes_moved / (self.bandwidth_mb_s * 1e6)


def _row(raw: dict, where: str) -> ClientProfile:
    unknown = sorted(set(raw) - set(COLUMNS))
    if unknown:
        raise ConfigError(f"{where}: unknown column(s) {', '.join(map(str, unknown))}; expected {', '.join(COLUMNS)}")
    values = {k: v for k, v in raw.items() if v not in (None, "")}
    try:
        profile = ClientProfile(
            name=str(values.get("name", "")), compute=float(values.get("compute", 1.0)),
            bandwidth_mb_s=float(values.get("bandwidth_mb_s", math.inf)),
            memory_mb=float(values["memory_mb"]) if "memory_mb" in values else None,
            lora_rank=int(values["lora_rank"]) if "lora_rank" in values else None,
            prefix_length=int(values["prefix_length"]) if "prefix_length" in values else None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}; compute, bandwidth_mb_s and memory_mb are numbers, lora_rank and "
                          f"prefix_length integers") from None
    if not (profile.compute > 0 and math.isfinite(profile.compute)) or not profile.bandwidth_mb_s > 0:
        raise ConfigError(f"{where}: compute must be a finite number > 0 and bandwidth_mb_s > 0, got "
                          f"{profile.compute} and {profile.bandwidth_mb_s}")
    if profile.memory_mb is not None and not (profile.memory_mb > 0 and math.isfinite(profile.memory_mb)):
        raise ConfigError(f"{where}: memory_mb must be a finite number > 0, got {profile.memory_mb}")
    for column in ("lora_rank", "prefix_length"):
        if getattr(profile, column) is not None and getattr(profile, column) < 1:
            raise ConfigError(f"{where}: {column} must be >= 1, got {getattr(profile, column)}")
    return profile


def _shown(path: str | Path) -> str:
    """``path`` as an error message shows it: quoted when it holds a newline or another unprintable character."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def load_profiles(path: str | Path) -> list[ClientProfile]:
    """The profiles of ``path`` (CSV or TOML), in order; a clear error for a missing or malformed file."""
    file = Path(path).expanduser()
    path = _shown(path)
    if not file.is_file():
        raise ConfigError(f"{WHERE}: {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".toml":
            rows = tomllib.loads(text).get("client", [])
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{WHERE}: {path}: {exc}") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{WHERE}: {path}: no profiles; expected a CSV with a header ({', '.join(COLUMNS)}) or "
                          f"TOML [[client]] tables")
    return [_row(r, f"{WHERE}: {path}, profile {i + 1}") for i, r in enumerate(rows)]


def profile_column(path: str | None, column: str) -> list[int]:
    """Each profile's integer ``column`` (lora_rank, prefix_length), or [] when there are no profiles or they name
    none."""
    if not path:
        return []
    values = [getattr(p, column) for p in load_profiles(path)]
    if all(v is None for v in values):
        return []
    if any(v is None for v in values):
        raise ConfigError(f"{WHERE}: {path}: {column} is set for some profiles and not others; give every profile one")
    return values


def profile_ranks(path: str | None) -> list[int]:
    """Each profile's LoRA rank (a ``lora_rank`` column), or [] when there are no profiles or they name none."""
    return profile_column(path, "lora_rank")


def profile_of(profiles: list[ClientProfile], client: int) -> ClientProfile:
    """Client ``client``'s profile (rows cycled over the clients)."""
    return profiles[client % len(profiles)]
