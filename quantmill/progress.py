"""Progress reporting without a UI dependency: steps ask ``reporter()`` for bars; the CLI installs a rich one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Bar(Protocol):
    def update(self, completed: float, total: float | None = None) -> None: ...
    def advance(self, amount: float) -> None: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    def bar(self, label: str, total: float | None = None, unit: str = "") -> Bar: ...


class _NullBar:
    def update(self, completed: float, total: float | None = None) -> None:
        pass

    def advance(self, amount: float) -> None:
        pass

    def close(self) -> None:
        pass


class NullReporter:
    def bar(self, label: str, total: float | None = None, unit: str = "") -> Bar:
        return _NullBar()


_current: Reporter = NullReporter()


def reporter() -> Reporter:
    return _current


@contextmanager
def using(r: Reporter) -> Iterator[Reporter]:
    """Install ``r`` as the reporter for the duration of the block."""
    global _current
    previous, _current = _current, r
    try:
        yield r
    finally:
        _current = previous
