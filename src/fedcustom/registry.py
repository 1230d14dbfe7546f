"""A name -> plug-in table: what methods, protocols and tasks are registered in (one call per plug-in module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from fedcustom.errors import FedCustomError

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind by name; an unknown name is a clear error listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise FedCustomError(f"{self.kind} {name!r}: expected one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())
