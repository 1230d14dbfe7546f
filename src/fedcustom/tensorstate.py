"""Named tensors of several owners in one flat dict (what a checkpoint stores): each owner's tensors under its own
prefix, ``prefix|name`` (parameter names contain dots, never bars)."""

from __future__ import annotations

import torch

SEP = "|"  # between a tensor's group and its name
Tensors = dict[str, torch.Tensor]


def put(tensors: Tensors, prefix: str, state: Tensors) -> None:
    """Store ``state`` in ``tensors`` under ``prefix``."""
    tensors.update({f"{prefix}{SEP}{name}": value for name, value in state.items()})


def group(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors stored under ``prefix``, with their own names."""
    start = prefix + SEP
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
