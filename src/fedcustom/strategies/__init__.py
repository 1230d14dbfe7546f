"""Aggregation strategies, by name."""

from fedcustom.errors import FedCustomError
from fedcustom.strategies.base import ClientUpdate, Strategy
from fedcustom.strategies.fedavg import FedAvg, weighted_average

STRATEGIES = {"fedavg": FedAvg}


def get_strategy(name: str) -> Strategy:
    """A fresh strategy instance by name."""
    if name not in STRATEGIES:
        raise FedCustomError(f"strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["ClientUpdate", "FedAvg", "Strategy", "get_strategy", "weighted_average"]
