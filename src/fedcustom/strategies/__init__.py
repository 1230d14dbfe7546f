"""Aggregation strategies, built from a spec string such as ``fedavg`` or ``trimmed-mean:0.2``."""

from __future__ import annotations

import math
from typing import Callable

from fedcustom.errors import FedCustomError
from fedcustom.strategies.base import ClientUpdate, Strategy
from fedcustom.strategies.fedavg import FedAvg, weighted_average
from fedcustom.strategies.robust import Krum, Median, MultiKrum, NormBound, TrimmedMean

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg, "median": Median, "trimmed-mean": TrimmedMean,
    "krum": Krum, "multi-krum": MultiKrum, "norm-bound": NormBound,
}
# The accepted spec forms, in the order the config help lists them.
STRATEGY_FORMS: tuple[str, ...] = (
    "fedavg", "median", "trimmed-mean:BETA", "krum:F", "multi-krum:F[:M]", "norm-bound:C",
)
_RANGES = "BETA a number with 0 <= BETA < 0.5, F an integer >= 0, M an integer >= 1, C a number > 0"


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _build(name: str, args: list[str]) -> Strategy:
    """The strategy for an already split spec; ValueError/TypeError when the arguments do not fit."""
    builders: dict[str, tuple[int, int, Callable[..., Strategy]]] = {  # (min args, max args, build)
        "fedavg": (0, 0, FedAvg),
        "median": (0, 0, Median),
        "trimmed-mean": (1, 1, lambda b: TrimmedMean(_number(b))),
        "krum": (1, 1, lambda f: Krum(_integer(f))),
        "multi-krum": (1, 2, lambda f, m=None: MultiKrum(_integer(f), None if m is None else _integer(m))),
        "norm-bound": (1, 1, lambda c: NormBound(_number(c))),
    }
    low, high, build = builders[name]
    if not low <= len(args) <= high:
        wanted = "no parameters" if high == 0 else f"{low}" + ("" if low == high else f" or {high}") + " parameter(s)"
        raise ValueError(f"{name} takes {wanted}, got {len(args)}")
    return build(*args)


def get_strategy(spec: str) -> Strategy:
    """A fresh strategy from a spec: one of ``STRATEGY_FORMS`` (e.g. ``krum:1``, ``multi-krum:1:3``)."""
    name, *args = [part.strip() for part in str(spec).strip().split(":")]
    expected = f"expected one of {', '.join(STRATEGY_FORMS)} ({_RANGES})"
    if name not in STRATEGIES:
        raise FedCustomError(f"strategy {spec!r}: unknown name {name!r}; {expected}")
    try:
        return _build(name, args)
    except (ValueError, TypeError) as exc:
        raise FedCustomError(f"strategy {spec!r}: {exc}; {expected}") from None


__all__ = [
    "STRATEGIES", "STRATEGY_FORMS", "ClientUpdate", "FedAvg", "Krum", "Median", "MultiKrum", "NormBound",
    "Strategy", "TrimmedMean", "get_strategy", "weighted_average",
]
