"""Server-side checks on a decoded client update before it may reach the strategy.

A bad update (wrong names, shapes or dtypes, NaN/Inf) is rejected with a reason; the round goes
on with the other clients and the global state is untouched.
"""

from __future__ import annotations

import torch

from fedcustom.errors import UpdateRejected


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Raise UpdateRejected unless ``update`` matches ``reference`` in names, shapes, dtypes, finiteness."""
    missing = sorted(reference.keys() - update.keys())
    unexpected = sorted(update.keys() - reference.keys())
    if missing or unexpected:
        raise UpdateRejected(f"tensor names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, expected in reference.items():
        got = update[name]
        if got.shape != expected.shape:
            raise UpdateRejected(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype != expected.dtype:
            raise UpdateRejected(f"{name}: dtype {got.dtype}, expected {expected.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UpdateRejected(f"{name}: contains NaN or Inf")
