"""Progress reporting without a UI dependency: steps ask ``reporter()`` for bars, runs show them while steps run
(``reporting()``) and pass warnings on (``warn``); the CLI installs a rich reporter, the default one prints
warnings to stderr and draws nothing."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Protocol


class Bar(Protocol):
    def update(self, completed: float, total: float | None = None) -> None: ...
    def advance(self, amount: float) -> None: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    def bar(self, label: str, total: float | None = None, unit: str = "") -> Bar: ...
    def warn(self, message: str) -> None: ...
    def showing(self) -> AbstractContextManager[None]: ...


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

    def warn(self, message: str) -> None:
        print(message, file=sys.stderr)

    def showing(self) -> AbstractContextManager[None]:
        return nullcontext()


_current: Reporter = NullReporter()


def reporter() -> Reporter:
    return _current


def reporting() -> AbstractContextManager[None]:
    """While inside, the installed reporter shows progress (steps are running)."""
    return _current.showing()


def warn(message: str) -> None:
    """A warning for the person running the command (stderr: stdout carries reports that must parse)."""
    _current.warn(message)


@contextmanager
def using(r: Reporter) -> Iterator[Reporter]:
    """Install ``r`` as the reporter for the duration of the block."""
    global _current
    previous, _current = _current, r
    try:
        yield r
    finally:
        _current = previous
