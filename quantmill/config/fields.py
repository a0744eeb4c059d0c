"""Field helpers shared by the config schemas."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def bounded(default: Any, *, least: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A field whose value composition checks: at least ``least``, or one of ``choices`` (one line otherwise)."""
    return field(default=default, metadata={"least": least, "choices": choices})
