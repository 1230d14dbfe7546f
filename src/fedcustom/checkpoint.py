"""Checkpoint and resume: everything a run needs to continue after a crash, in one file per run.

``DIR/checkpoint.safetensors`` holds the tensors (the global state and both ends of every codec
link) and, in its metadata, the round reached, the config, the round log so far, the accountant's
history and the torch RNG state. It is written to a temporary file, flushed to disk and renamed
over the old one, so a crash at any instant leaves either the previous round's checkpoint or this
round's — never half of one. Every other seed is derived from (seed, round, client), so restoring
this state makes a resumed run reproduce the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedcustom.errors import FedCustomError
from fedcustom.tensorstate import Tensors

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
@runtime_checkable
class Checkpointable(Protocol):
    """A part of the run with state of its own: the server, or the in-process clients."""

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]: ...

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None: ...


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    round: int
    config: dict[str, Any]
    records: list[dict[str, Any]]  # the round log up to ``round`` (index 0: the initial evaluation)
    wall_seconds: float  # time already spent before the interruption
    parts: dict[str, tuple[Tensors, dict[str, Any]]]
    rng_state: torch.Tensor  # torch's global generator after the checkpoint's round
    resumed_after: list[int]  # the rounds after which this run was already cut off and resumed (oldest first)
    settings: dict[str, Any] | None = None  # the training settings the run resolved (None: an older checkpoint)


def save_checkpoint(out: Path, rnd: int, config: dict[str, Any], records: list[dict[str, Any]], wall: float,
                    parts: dict[str, Checkpointable], resumed_after: list[int] | None = None,
                    settings: dict[str, Any] | None = None) -> Path:
    """Atomically replace ``out/checkpoint.safetensors`` with the state after round ``rnd`` (``resumed_after``: the
    rounds after which the run was cut off and resumed so far; ``settings``: the training settings the run resolved
    from its config, which a resume must resolve to again)."""
    tensors: Tensors = {}
    part_meta = {}
    for name, part in parts.items():
        own, meta = part.state_dict()
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in own.items()})
        part_meta[name] = meta
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": FORMAT, "round": rnd, "config": config, "records": records, "wall_seconds": wall,
            "parts": part_meta, "resumed_after": resumed_after or [], "settings": settings}
    path = out / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"fedcustom": json.dumps(meta, default=str)})
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(out: Path) -> Checkpoint:
    """Read ``out/checkpoint.safetensors``; clear errors for what is missing or malformed."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise FedCustomError(f"--resume {out}: no {CHECKPOINT} there (a run writes one after each round)")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as fh:
            meta = json.loads((fh.metadata() or {})["fedcustom"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise FedCustomError(f"--resume {out}: {CHECKPOINT} is not a fedcustom checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise FedCustomError(f"--resume {out}: checkpoint format {meta.get('format')}, expected {FORMAT}")
    rng_state = tensors.pop("rng.torch")
    parts = {name: (group_dot(tensors, name), part) for name, part in meta["parts"].items()}
    return Checkpoint(int(meta["round"]), meta["config"], meta["records"], float(meta["wall_seconds"]), parts,
                      rng_state, [int(r) for r in meta.get("resumed_after", [])],  # (older checkpoints lack it)
                      meta.get("settings"))


def group_dot(tensors: Tensors, name: str) -> Tensors:
    """The tensors of one part (stored as ``name.KEY``)."""
    start = name + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
