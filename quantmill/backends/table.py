"""One table per kind of backend; each backend registers under the same key as its config file."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from quantmill.errors import ConfigError

T = TypeVar("T")


class BackendTable(Generic[T]):
    """Name -> backend. Duplicate keys are refused; unknown keys fail with the list of known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        def add(backend: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered by {self._items[key]!r}")
            self._items[key] = backend
            return backend

        return add

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {key!r}; known: {', '.join(sorted(self._items))}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
