"""What happened to each spec in a run, for the summary table, the exit code and ``--json`` output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from quantmill import constants as C

RAN, CACHED, FAILED, SKIPPED = "ran", "cached", "failed", "skipped"


@dataclass(frozen=True)
class Outcome:
    spec_id: str
    step: str
    recipe: str | None
    status: str  # ran | cached | failed | skipped
    seconds: float = 0.0
    key: str | None = None
    digest: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Ran or cached, and (for validation) passed."""
        return self.status in (RAN, CACHED) and self.result.get("status") != C.FAILED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Outcome":
        return cls(**data)
